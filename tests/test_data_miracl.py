"""MIRACL reader on hand-written fixtures in the exact release layout (tests/fixtures/miracl)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hbt_ray.data.miracl import read_miracl_eval, read_miracl_pairs
from hbt_ray.data.records import DataError
from hbt_ray.data.sources import iter_pair_groups, load_eval_set

FIXTURES = Path(__file__).parent / "fixtures" / "miracl"


def test_miracl_eval_set():
    s = read_miracl_eval(FIXTURES)  # both languages of the dev split
    assert s.counts() == {"sw": (3, 10), "yo": (2, 3)}
    q = {q.qid: q for q in s.queries["sw"]}
    assert set(q) == {"sw:101", "sw:102", "sw:103"}  # 104 has no relevant document
    assert s.meta["topics_without_relevant"] == {"sw": 1, "yo": 0}
    assert (
        q["sw:102"].relevant == ("sw:2#0", "sw:2#1")
        and q["sw:102"].text == "Mlima mrefu zaidi Afrika ni upi?"
    )
    docs = {c.cid: c for c in s.candidates["sw"]}
    assert docs["sw:2#0"].text.startswith("Mlima Kilimanjaro Mlima Kilimanjaro ni mlima mrefu")
    assert docs["sw:6#0"].paragraph == "sw:101" and docs["sw:5#0"].paragraph == "sw:104"
    assert docs["sw:4#1"].text.endswith("mwaka 1922.")  # from the plain .jsonl shard
    # subset keeps a topic with all its judged documents
    sub = s.select_langs(["sw"]).subset(1)
    assert sub.counts() == {"sw": (1, 3)}
    assert {c.cid for c in sub.candidates["sw"]} == {"sw:1#0", "sw:1#1", "sw:6#0"}


def test_miracl_pairs_use_qrels_negatives():
    groups = list(read_miracl_pairs(FIXTURES, split="train"))
    assert [g.group_id for g in groups] == ["miracl-sw:201", "miracl-sw:202"]
    g = groups[0]
    assert g.langs == ["sw"] and g.source == "miracl"
    assert g.pairs["sw"].passage == "Ziwa Viktoria Ziwa Viktoria ni ziwa kubwa kuliko yote barani Afrika."
    assert g.pairs["sw"].negatives == (
        "Ziwa Viktoria Ziwa hili linashirikiwa na nchi za Tanzania, Uganda na Kenya.",
        "Mlima Kilimanjaro Mlima Kilimanjaro ni mlima mrefu kuliko yote barani Afrika, wenye urefu wa mita 5,895.",
    )
    assert [g.group_id for g in iter_pair_groups(f"miracl:{FIXTURES}:sw")] == [
        "miracl-sw:201",
        "miracl-sw:202",
    ]
    with pytest.raises(DataError, match=r"topics\.miracl-v1\.0-yo-train\.tsv: no such file"):
        list(iter_pair_groups(f"miracl:{FIXTURES}:yo"))  # yo has no train split


def test_miracl_specs():
    s = load_eval_set(f"miracl:{FIXTURES}:yo")
    assert s.counts() == {"yo": (2, 3)}
    with pytest.raises(DataError, match="no MIRACL language"):
        load_eval_set(f"miracl:{FIXTURES}:de")
