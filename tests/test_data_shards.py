"""Pair shards: write → manifest → read back with Ray Data, identical content; schema checks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hbt_ray.data.records import PAIR_SCHEMA, DataError, Pair, PairGroup
from hbt_ray.data.shards import iter_shard_groups, read_manifest, read_shards, rows_to_groups, write_shards
from hbt_ray.data.sources import iter_pair_groups


def _key(groups):
    return sorted((g.group_id, g.source, tuple(sorted(g.pairs.items()))) for g in groups)


def test_ddtp_and_mlqa_shards_round_trip_through_ray_data(ray_local, shared_data, tmp_path):
    ddtp = list(iter_pair_groups("ddtp", limit=700))
    ddtp[0].pairs["en"] = Pair(ddtp[0].pairs["en"].query, ddtp[0].pairs["en"].passage, ("neg one", "neg two"))
    m = write_shards(ddtp, tmp_path / "ddtp", rows_per_shard=256, source="ddtp", progress=False)
    assert (m.groups, len(m.shards), [s["rows"] for s in m.shards]) == (700, 3, [256, 256, 188])
    assert m.pairs == sum(len(g.pairs) for g in ddtp)
    assert m.pairs_per_lang["en"] == 700 and len(m.pairs_per_lang) > 10
    assert sum(m.langs_per_group.values()) == 700 and min(int(k) for k in m.langs_per_group) >= 2
    assert read_manifest(tmp_path / "ddtp") == m

    ds = read_shards(tmp_path / "ddtp")
    assert ds.count() == 700
    assert ds.schema().names == PAIR_SCHEMA.names
    back_rows = rows_to_groups(ds.take_all())
    assert _key(back_rows) == _key(ddtp)
    # Ray Data's V1 read tasks, not 2.60's default ListFiles (a 32-actor footer pool per read; bench_data)
    assert "ReadParquet" in ds.stats() and "ListFiles" not in ds.stats(), ds.stats()
    back_batches = [
        g for b in ds.iter_batches(batch_size=100, batch_format="numpy") for g in rows_to_groups(b)
    ]
    assert _key(back_batches) == _key(ddtp)
    back_pandas = [
        g for b in ds.iter_batches(batch_size=300, batch_format="pandas") for g in rows_to_groups(b)
    ]
    assert _key(back_pandas) == _key(ddtp)
    assert [g.group_id for g in iter_shard_groups(tmp_path / "ddtp")] == [g.group_id for g in ddtp]
    with_negs = [g for g in back_rows if g.group_id == ddtp[0].group_id][0]
    assert with_negs.pairs["en"].negatives == ("neg one", "neg two")

    mlqa = list(iter_pair_groups("mlqa-r"))
    m2 = write_shards(mlqa, tmp_path / "mlqa", rows_per_shard=500, source="mlqa-r", progress=False)
    assert m2.groups == 1148 and m2.pairs_per_lang["en"] == 1148 and m2.pairs_per_lang["de"] == 512
    assert _key(rows_to_groups(read_shards(tmp_path / "mlqa").take_all())) == _key(mlqa)


def test_shard_with_wrong_schema_names_the_file(tmp_path):
    groups = [PairGroup(f"g{i}", "t", {"en": Pair("q", "p")}) for i in range(4)]
    write_shards(groups, tmp_path, rows_per_shard=2, progress=False)
    bad = tmp_path / "shard-00001.parquet"
    table = pa.table({"group_id": ["g2", "g3"], "source": ["t", "t"], "langs": [["en"], ["en"]]})
    pq.write_table(table, bad)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"][1]["file"] == bad.name
    with pytest.raises(DataError, match=r"shard-00001\.parquet: shard schema does not match PAIR_SCHEMA"):
        read_shards(tmp_path)
    with pytest.raises(DataError, match=r"shard-00001\.parquet"):
        list(iter_shard_groups(tmp_path))
    # a column with the right name but the wrong type is caught too
    wrong = pa.Table.from_pylist([g.to_row() for g in groups[2:]], schema=PAIR_SCHEMA).set_column(
        0, "group_id", pa.array([1, 2], pa.int64())
    )
    pq.write_table(wrong, bad)
    with pytest.raises(DataError, match=r"shard-00001\.parquet: .*group_id: int64"):
        list(iter_shard_groups(tmp_path))


def test_a_shard_replaced_by_hand_is_refused(tmp_path):
    """b5232a8 checked a shard's schema and row count only: another file with as many rows trained
    silently. The manifest keeps each shard's footer digest (byte sizes, column statistics)."""
    from hbt_ray.data.shards import shard_paths

    groups = [PairGroup(f"g{i}", "t", {"en": Pair(f"question {i}", f"passage {i}")}) for i in range(4)]
    write_shards(groups, tmp_path, rows_per_shard=2, progress=False)
    assert len(shard_paths(tmp_path)) == 2  # as written: accepted
    other = [PairGroup(f"g{i}", "t", {"en": Pair(f"another question {i}", f"passage {i}")}) for i in (2, 3)]
    pq.write_table(pa.Table.from_pylist([g.to_row() for g in other], schema=PAIR_SCHEMA),
                   tmp_path / "shard-00001.parquet", compression="zstd")  # fmt: skip
    with pytest.raises(DataError, match=r"shard-00001\.parquet: shard is not the file its manifest\.json was written"):
        shard_paths(tmp_path)


def test_write_shards_refuses_bad_groups_and_old_shards(tmp_path):
    g = PairGroup("g1", "t", {"en": Pair("q", "p")})
    with pytest.raises(DataError, match=r"\[group g1\]: duplicate group id"):
        write_shards([g, g], tmp_path / "a", progress=False)
    with pytest.raises(DataError, match=r"\[group g2\]: invalid language code 'EN'"):
        write_shards([PairGroup("g2", "t", {"EN": Pair("q", "p")})], tmp_path / "b", progress=False)
    write_shards([g], tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards([g], tmp_path / "c", progress=False)
    assert write_shards([g], tmp_path / "c", overwrite=True, progress=False).groups == 1
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(tmp_path / "b")
