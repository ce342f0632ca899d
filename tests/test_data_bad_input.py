"""Bad input: a DataError naming the file and the record, or skipped-and-counted with --skip-bad."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from hbt_ray.data.__main__ import main
from hbt_ray.data.lareqa import read_lareqa_eval
from hbt_ray.data.miracl import read_miracl_eval
from hbt_ray.data.pairs import read_pairs
from hbt_ray.data.records import BadRecords, DataError
from hbt_ray.data.shards import read_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "miracl"


def rec(gid="g1", lang="en", query="a query", passage="a passage", **extra) -> dict:
    return {"group_id": gid, "lang": lang, "query": query, "passage": passage, **extra}


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


GOOD = [rec("g0"), rec("g0", "de", "eine Anfrage", "ein Text")]

PAIR_CASES = [
    (
        "missing_field",
        {"group_id": "g1", "lang": "en", "query": "q"},
        r"\[line 3 group_id=g1\]: missing field 'passage'",
    ),
    ("empty_text", rec(query="   "), r"\[line 3 group_id=g1\]: empty text in field 'query'"),
    ("invalid_lang", rec(lang="English"), r"\[line 3 group_id=g1\]: invalid language code 'English'"),
    (
        "invalid_json",
        b'{"group_id": "g1", "lang": "en", "query": "q", "pass',
        r"\[line 3\]: invalid or truncated JSON",
    ),
    (
        "non_utf8",
        b'{"group_id": "g1", "lang": "en", "query": "caf\xe9", "passage": "p"}',
        r"\[line 3\]: not valid UTF-8 \(byte 0xe9",
    ),
]


@pytest.mark.parametrize("reason,bad_record,message", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_pairs_bad_record_raises_or_is_counted(tmp_path, reason, bad_record, message):
    path = write_jsonl(tmp_path / "pairs.jsonl.gz", [*GOOD, bad_record, rec("g2")], gz=True)
    with pytest.raises(DataError, match=r"pairs\.jsonl\.gz " + message):
        list(read_pairs(path, progress=False))
    bad = BadRecords(skip=True)
    groups = list(read_pairs(path, bad=bad, progress=False))
    assert [g.group_id for g in groups] == ["g0", "g2"] and dict(bad.counts) == {reason: 1}


def test_pairs_duplicate_conflicting_text_and_non_adjacent_groups(tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [*GOOD, rec("g0", passage="another passage")])
    with pytest.raises(DataError, match=r"dup\.jsonl \[line 3 group_id=g0\]: duplicate .*conflicting text"):
        list(read_pairs(dup, progress=False))
    same = write_jsonl(tmp_path / "same.jsonl", [*GOOD, GOOD[0]])  # identical repeat: harmless
    assert [len(g.pairs) for g in read_pairs(same, progress=False)] == [2]
    split = write_jsonl(tmp_path / "split.jsonl", [GOOD[0], rec("g1"), GOOD[1]])
    with pytest.raises(
        DataError, match=r"split\.jsonl \[line 3 group_id=g0\]: records of group 'g0' are not adjacent"
    ):
        list(read_pairs(split, progress=False))


def test_truncated_gzip_names_the_file(tmp_path):
    full = gzip.compress(b"\n".join(json.dumps(rec(f"g{i}")).encode() for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz \[after line \d+\]: truncated or corrupt gzip"):
        list(read_pairs(path, progress=False))


def lareqa_doc(question="Where?", answer_start=3, qid="q1", sentences=None, breaks=None) -> dict:
    para = {
        "context": "One. Two three.",
        "sentences": sentences or ["One.", "Two three."],
        "sentence_breaks": breaks or [[0, 4], [5, 15]],
        "qas": [{"id": qid, "question": question, "answers": [{"text": "x", "answer_start": answer_start}]}],
    }
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [para]}]}


def test_lareqa_good_file_and_bad_records(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / "en.json").write_text(json.dumps(lareqa_doc(answer_start=6)))
    s = read_lareqa_eval(d)
    assert s.queries["en"][0].relevant == ("en:p0.0.s1",) and s.counts() == {"en": (1, 2)}

    (d / "en.json").write_text(json.dumps(lareqa_doc(answer_start=4)))  # the gap between the two breaks
    with pytest.raises(
        DataError,
        match=r"en\.json \[data\[0\]\.paragraphs\[0\]\.qas\[0\] id=q1\]: answer_start \[4\] is outside every sentence break",
    ):
        read_lareqa_eval(d)
    bad = BadRecords(skip=True)
    assert read_lareqa_eval(d, bad=bad).counts() == {"en": (0, 2)} and dict(bad.counts) == {
        "answer_outside": 1
    }

    doc = lareqa_doc()
    del doc["data"][0]["paragraphs"][0]["sentences"]
    (d / "en.json").write_text(json.dumps(doc))
    with pytest.raises(
        DataError, match=r"en\.json \[data\[0\]\.paragraphs\[0\]\]: missing field 'sentences'"
    ):
        read_lareqa_eval(d)

    (d / "en.json").write_text(json.dumps(lareqa_doc(question=" ")))
    with pytest.raises(DataError, match=r"qas\[0\] id=q1\]: empty text in field 'question'"):
        read_lareqa_eval(d)
    (d / "en.json").write_text(json.dumps(lareqa_doc(sentences=["One.", ""])))
    with pytest.raises(DataError, match=r"paragraphs\[0\]\]: empty text in sentences\[1\]"):
        read_lareqa_eval(d)

    doc = lareqa_doc()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas.append({**qas[0], "question": "Something else?"})
    (d / "en.json").write_text(json.dumps(doc))
    with pytest.raises(
        DataError, match=r"qas\[1\] id=q1\]: duplicate question id 'q1' with conflicting text"
    ):
        read_lareqa_eval(d)

    (d / "en.json").write_text(json.dumps(lareqa_doc())[:-20])
    with pytest.raises(DataError, match=r"en\.json \[line 1, column \d+\]: invalid or truncated JSON"):
        read_lareqa_eval(d)
    (d / "en.json").write_bytes(json.dumps(lareqa_doc()).encode().replace(b"Where?", b"Wh\xffere?"))
    with pytest.raises(DataError, match=r"en\.json \[line 1\]: not valid UTF-8 \(byte 0xff"):
        read_lareqa_eval(d)

    (d / "en.json").unlink()
    (d / "english.json").write_text(json.dumps(lareqa_doc()))
    with pytest.raises(DataError, match=r"english\.json \[file name\]: invalid language code 'english'"):
        read_lareqa_eval(d)


def test_miracl_qrels_docid_absent_and_duplicate_docs(tmp_path):
    root = tmp_path / "miracl"
    shutil.copytree(FIXTURES, root)
    qrels = root / "miracl-v1.0-yo" / "qrels" / "qrels.miracl-v1.0-yo-dev.tsv"
    qrels.write_text(qrels.read_text() + "302\tQ0\t99#0\t1\n")
    with pytest.raises(
        DataError,
        match=r"qrels\.miracl-v1\.0-yo-dev\.tsv \[line 5 qid=302 docid=99#0\]: qrels names a docid absent from the corpus",
    ):
        read_miracl_eval(root, langs=["yo"])
    bad = BadRecords(skip=True)
    assert read_miracl_eval(root, langs=["yo"], bad=bad).counts() == {"yo": (2, 3)}
    assert dict(bad.counts) == {"docid_absent": 1}

    corpus = root / "miracl-corpus-v1.0-sw" / "docs-1.jsonl"
    corpus.write_text(
        corpus.read_text() + json.dumps({"docid": "4#0", "title": "X", "text": "Other text."}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"docs-1\.jsonl \[line 5 docid=4#0\]: duplicate docid '4#0' with conflicting text"
    ):
        read_miracl_eval(root, langs=["sw"])


def test_prepare_cli_errors_or_skips_and_counts(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [*GOOD, PAIR_CASES[0][1], rec("g2", lang="xx-yyyyyyyyyy"), rec("g3")]
    )
    out = tmp_path / "shards"
    assert main(["prepare", "--source", "pairs", "--in", str(path), "--out", str(out)]) == 2
    assert "mixed.jsonl [line 3 group_id=g1]: missing field 'passage'" in capsys.readouterr().err
    skip = ["prepare", "--source", "pairs", "--in", str(path), "--out", str(out), "--skip-bad", "--overwrite"]
    assert main(skip) == 2  # 2 of 4 records bad: over the default ceiling of 1 %
    assert "2 bad records skipped, 50.0% of the input, more than --max-bad-fraction 0.01" in capsys.readouterr().err
    assert not out.exists()
    code = main([*skip, "--max-bad-fraction", "0.5"])
    assert code == 0
    m = read_manifest(out)
    assert m.groups == 2 and m.skipped == {"invalid_lang": 1, "missing_field": 1}
    assert (
        len(m.skipped_examples) == 2 and "skipped: invalid_lang=1, missing_field=1" in capsys.readouterr().out
    )
