"""Generic pairs reader on the real DDTP file, and the prepare CLI on it."""

from __future__ import annotations

from hbt_ray.data.__main__ import main
from hbt_ray.data.shards import iter_shard_groups, read_manifest
from hbt_ray.data.sources import iter_pair_groups


def test_ddtp_groups_have_english_and_others(shared_data):
    groups = list(iter_pair_groups("ddtp", limit=300))
    assert len(groups) == 300 and len({g.group_id for g in groups}) == 300
    assert all(g.source == "ddtp" and "en" in g.pairs and len(g.pairs) >= 2 for g in groups)
    assert len(groups[0].pairs) == 31  # the file starts with its most multilingual group (en + 30)
    assert all(p.query.strip() and p.passage.strip() for g in groups for p in g.pairs.values())
    de_only = list(iter_pair_groups("ddtp", langs=["en", "de"], limit=50))
    assert all(set(g.pairs) <= {"en", "de"} and "en" in g.pairs for g in de_only)


def test_prepare_ddtp_cli(shared_data, tmp_path, capsys):
    out = tmp_path / "ddtp"
    args = ["prepare", "--source", "pairs", "--in", str(shared_data / "ddtp" / "pairs.jsonl.gz")]
    assert main([*args, "--out", str(out), "--limit", "250", "--rows-per-shard", "100"]) == 0
    m = read_manifest(out)
    assert (m.groups, [s["rows"] for s in m.shards], m.pairs_per_lang["en"]) == (250, [100, 100, 50], 250)
    assert "250 groups" in capsys.readouterr().out
    assert [g.group_id for g in iter_shard_groups(out)] == [
        g.group_id for g in iter_pair_groups("ddtp", limit=250)
    ]
