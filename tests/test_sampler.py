"""Hybrid batch sampler on real pair groups (DDTP, MLQA-R), in memory and streamed from Ray Data."""

from __future__ import annotations

import json
import pickle
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.lareqa import read_lareqa_pairs
from hbt_ray.data.pairs import read_pairs
from hbt_ray.data.records import DataError, PairGroup
from hbt_ray.data.shards import Manifest, write_shards
from hbt_ray.data.streams import count_pairs_dataset, shard_streams
from hbt_ray.sampler import HybridBatchSampler, SamplerConfig, count_pairs, lang_weights, parse_lang_pair

# ---------------------------------------------------------------------------- real data as rows


def _mlqa_with_negatives(root: Path) -> list[dict]:
    """MLQA-R rows like ``read_lareqa_pairs`` gives, plus hard negatives (the paragraph's other
    sentences), which that reader does not produce."""
    groups: dict[str, dict] = {}
    for path in sorted(root.glob("*.json")):
        lang = path.stem
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for para in article["paragraphs"]:
                sents, breaks = para["sentences"], para["sentence_breaks"]
                for qa in para["qas"]:
                    start = qa["answers"][0]["answer_start"]
                    hit = next((i for i, (a, b) in enumerate(breaks) if a <= start < b), None)
                    if hit is None:
                        continue
                    g = groups.setdefault(
                        qa["id"],
                        {
                            "group_id": qa["id"],
                            "source": "mlqa-r",
                            "langs": [],
                            "queries": [],
                            "passages": [],
                        },
                    )
                    g.setdefault("negatives", [])
                    g["langs"].append(lang)
                    g["queries"].append(qa["question"])
                    g["passages"].append(sents[hit])
                    g["negatives"].append([s for i, s in enumerate(sents) if i != hit])
    return list(groups.values())


@pytest.fixture(scope="module")
def ddtp_rows(shared_data) -> list[dict]:
    groups = read_pairs(shared_data / "ddtp" / "pairs.jsonl.gz", progress=False)
    return [g.to_row() for g in groups]


@pytest.fixture(scope="module")
def mlqa_rows(shared_data) -> list[dict]:
    return [g.to_row() for g in read_lareqa_pairs(shared_data / "lareqa" / "mlqa-r")]


@pytest.fixture(scope="module")
def mlqa_negative_rows(shared_data) -> list[dict]:
    return _mlqa_with_negatives(shared_data / "lareqa" / "mlqa-r")


def _split(rows: list[dict], world_size: int, weights: list[float] | None = None) -> list[list[dict]]:
    """Disjoint splits by a hash of group_id (optionally uneven)."""
    cuts = np.cumsum(weights or [1.0] * world_size) / sum(weights or [1.0] * world_size)
    parts: list[list[dict]] = [[] for _ in range(world_size)]
    for row in rows:
        u = (zlib.crc32(row["group_id"].encode()) % 10_000) / 10_000
        parts[int(np.searchsorted(cuts, u, side="right"))].append(row)
    return parts


def _sampler(rows, cfg, rank=0, world_size=1, counts_rows=None):
    counts, n = count_pairs(counts_rows if counts_rows is not None else rows)
    return HybridBatchSampler(cfg, lambda n_pass: iter(rows), rank, world_size, counts, num_groups=n)


def _check_batch(batch, per_rank):
    assert len(batch.queries) == len(batch.passages) == len(batch.group_ids) == per_rank
    assert len(batch.query_langs) == len(batch.passage_langs) == len(batch.negatives) == per_rank
    assert len(set(batch.group_ids)) == per_rank, "a group twice in one batch"


# ---------------------------------------------------------------------------- config


def test_config_errors_name_the_key():
    cfg = load_config(SamplerConfig, None, ["alpha=0.25", "lang_pairs=en-de,de>pt-br:2", "strategy=x-y"])
    assert cfg.alpha == 0.25 and cfg.lang_pairs == ["en-de", "de>pt-br:2"]
    with pytest.raises(ConfigError, match="alpha"):
        load_config(SamplerConfig, None, ["alpha=1.5"])
    with pytest.raises(ConfigError, match="strategy"):
        load_config(SamplerConfig, None, ["strategy=mono"])
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(SamplerConfig, None, ["lang_pairs=en-pt-br"])
    with pytest.raises(ConfigError, match="lang_temperature"):
        load_config(SamplerConfig, None, ["lang_temperature=0"])
    assert parse_lang_pair("en>pt-br:2") == ("en", "pt-br", 2.0)
    assert parse_lang_pair("zh-tw>en") == ("zh-tw", "en", 1.0)
    with pytest.raises(ConfigError, match="not a cross-lingual"):
        parse_lang_pair("en-en")
    with pytest.raises(ConfigError, match="batch_size"):
        HybridBatchSampler(SamplerConfig(batch_size=10), lambda n: iter([]), 0, 3, {"en": 1}, num_groups=1)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        HybridBatchSampler(SamplerConfig(), lambda n: iter([]), 0, 1, {"en": 1})
    with pytest.raises(ConfigError, match="languages"):
        HybridBatchSampler(SamplerConfig(languages=["xx"]), lambda n: iter([]), 0, 1, {"en": 1}, num_groups=1)


def test_lang_weights_temperature():
    p1 = lang_weights({"en": 900, "de": 100}, 1.0)
    assert p1 == pytest.approx({"en": 0.9, "de": 0.1})
    p2 = lang_weights({"en": 900, "de": 100}, 2.0)
    assert p2 == pytest.approx({"en": 0.75, "de": 0.25})
    big = lang_weights({"en": 900, "de": 100}, 1e6)
    assert big["en"] == pytest.approx(0.5, abs=1e-4)


# ---------------------------------------------------------------------------- statistics on DDTP


def test_hybrid_alpha_and_language_shares_over_10k_batches(ddtp_rows):
    alpha = 0.3
    cfg = SamplerConfig(strategy="hybrid", alpha=alpha, batch_size=16, lang_temperature=2.0, seed=7)
    sampler = _sampler(ddtp_rows, cfg)
    kinds = Counter()
    for batch in sampler.batches(10_000):
        _check_batch(batch, 16)
        kinds[batch.strategy] += 1
        if batch.strategy == "x-x-mono":
            main = [q == p == batch.lang for q, p in zip(batch.query_langs, batch.passage_langs)]
            assert sum(main) == 16 - batch.fallback_pairs
            assert all(q == p for q, p in zip(batch.query_langs, batch.passage_langs))
        else:
            assert batch.strategy == "x-y"
            assert all(q != p for q, p in zip(batch.query_langs, batch.passage_langs))
    st = sampler.stats()
    assert st["steps"] == 10_000 and kinds["x-x-mono"] == st["steps_by_strategy"]["x-x-mono"]
    assert abs(st["mono_step_share"] - alpha) < 0.02
    n_mono = st["steps_by_strategy"]["x-x-mono"]
    p = st["lang_p"]
    counts, _ = count_pairs(ddtp_rows)
    expected = lang_weights({k: v for k, v in counts.items() if v >= 16}, 2.0)  # min_lang_groups = batch_size
    assert p == pytest.approx(expected)
    for lang, p_lang in p.items():
        share = st["mono_steps_by_lang"].get(lang, 0) / n_mono
        assert abs(share - p_lang) < 4 * np.sqrt(p_lang * (1 - p_lang) / n_mono) + 1e-3, lang
    assert st["pairs"] == 160_000
    assert sum(st["pairs_by_lang_pair"].values()) == 160_000
    # every fallback is counted; rare languages drawn at their tempered p(L) come back from the
    # reservoirs of used groups, so fallbacks stay rare (languages with < batch_size groups get no mono step)
    assert st["fallback_pairs"] == (
        sum(st["mono_fallback_pairs_by_lang"].values()) + st["cross_fallback_pairs"] + st["xx_fallback_pairs"]
    )
    assert st["fallback_share"] < 0.01 and st["recycled_pairs"] > 0
    assert st["stream_passes"] >= 1  # 160k pairs drawn from 49,790 groups: the stream was re-opened
    table = sampler.format_stats()
    assert "mono step share" in table and "\nen " in table


def test_lang_pairs_restrict_and_weight(ddtp_rows):
    cfg = SamplerConfig(strategy="x-y", batch_size=32, lang_pairs=["en-de", "de-en:3"], lang_temperature=1.0)
    sampler = _sampler(ddtp_rows, cfg)
    for batch in sampler.batches(300):
        _check_batch(batch, 32)
        assert {f"{q}-{p}" for q, p in zip(batch.query_langs, batch.passage_langs)} <= {"en-de", "de-en"}
    st = sampler.stats()
    en_de, de_en = st["pairs_by_lang_pair"]["en-de"], st["pairs_by_lang_pair"]["de-en"]
    assert en_de + de_en == 300 * 32
    assert 0.70 < de_en / (en_de + de_en) < 0.80  # weight 3:1


def test_x_x_and_hybrid_sample_per_pair(ddtp_rows):
    xx = _sampler(ddtp_rows, SamplerConfig(strategy="x-x", batch_size=32, lang_temperature=1e6))
    langs_seen = Counter()
    for batch in xx.batches(200):
        _check_batch(batch, 32)
        assert batch.strategy == "x-x" and all(q == p for q, p in zip(batch.query_langs, batch.passage_langs))
        langs_seen.update(batch.query_langs)
    assert len(langs_seen) > 20  # languages mixed within batches (uniform weights over the group's languages)

    alpha = 0.4
    hs = _sampler(ddtp_rows, SamplerConfig(strategy="hybrid-sample", alpha=alpha, batch_size=64, seed=3))
    for batch in hs.batches(500):
        _check_batch(batch, 64)
        assert batch.strategy == "hybrid-sample"
    st = hs.stats()
    assert st["steps_by_strategy"] == {"x-x-mono": 0, "x-y": 0, "x-x": 0, "hybrid-sample": 500}
    assert abs(st["mono_pair_share"] - alpha) < 0.02


# ---------------------------------------------------------------------------- distribution


def test_ranks_agree_and_global_batches_are_unique(ddtp_rows):
    world = 4
    splits = _split(ddtp_rows, world, weights=[0.4, 0.2, 0.2, 0.2])  # uneven splits
    counts, n = count_pairs(ddtp_rows)
    cfg = SamplerConfig(strategy="hybrid", alpha=0.5, batch_size=128, buffer_groups=1024, steps_per_epoch=150)
    samplers = [
        HybridBatchSampler(cfg, (lambda n_pass, r=r: iter(splits[r])), r, world, counts, num_groups=n)
        for r in range(world)
    ]
    for epoch in range(2):
        per_rank = [list(s) for s in samplers]  # one epoch each
        assert [len(b) for b in per_rank] == [150] * world  # every rank runs the same number of steps
        for slices in zip(*per_rank):
            assert len({(b.step, b.epoch, b.strategy, b.lang) for b in slices}) == 1
            assert slices[0].epoch == epoch
            union = [g for b in slices for g in b.group_ids]
            assert len(union) == 128 and len(set(union)) == 128
    # splits of ~19,900 and ~9,960 groups: whatever a rank's split holds, all ran the same steps
    assert [s.stats()["steps"] for s in samplers] == [300] * world


def test_shortage_fallback_policies(mlqa_rows):
    # tiny buffer: a rank holds 40 groups, 32 per step; Hindi's groups come last in the stream, so a Hindi
    # step before they arrive (neither the buffer nor the used groups hold any) is short
    base = dict(strategy="x-x-mono", batch_size=32, buffer_groups=40, seed=1, lang_temperature=1e6)
    mlqa_rows = [r for r in mlqa_rows if "hi" not in r["langs"]] + [r for r in mlqa_rows if "hi" in r["langs"]]
    s = _sampler(mlqa_rows, SamplerConfig(**base, on_short="next-lang"))
    for batch in s.batches(200):
        _check_batch(batch, 32)
        assert all(q == p for q, p in zip(batch.query_langs, batch.passage_langs))
        assert sum(q == batch.lang for q in batch.query_langs) == 32 - batch.fallback_pairs
    st = s.stats()
    assert st["fallback_pairs"] > 0 and st["short_steps"] > 0
    assert st["fallback_pairs"] == sum(b[3] for b in s.step_log())

    s = _sampler(mlqa_rows, SamplerConfig(**base, on_short="x-x"))
    for batch in s.batches(50):
        _check_batch(batch, 32)
    assert s.stats()["fallback_pairs"] > 0

    s = _sampler(mlqa_rows, SamplerConfig(**base, on_short="error"))
    with pytest.raises(DataError, match="too few groups"):
        for _ in s.batches(200):
            pass

    # cross steps short of multilingual groups fall back to x-x pairs, counted
    mono_only = [
        dict(r, langs=r["langs"][:1], queries=r["queries"][:1], passages=r["passages"][:1]) for r in mlqa_rows
    ]
    mixed = [r if i % 20 == 0 else m for i, (r, m) in enumerate(zip(mlqa_rows, mono_only))]
    s = _sampler(mixed, SamplerConfig(strategy="x-y", batch_size=16, buffer_groups=64))
    for batch in s.batches(50):
        _check_batch(batch, 16)
    assert s.stats()["cross_fallback_pairs"] > 0


def test_negatives_from_the_group(mlqa_negative_rows):
    s = _sampler(mlqa_negative_rows, SamplerConfig(strategy="x-y", batch_size=8, max_negatives=2))
    batch = s.next_batch()
    by_id = {r["group_id"]: r for r in mlqa_negative_rows}
    for gid, plang, passage, negs in zip(
        batch.group_ids, batch.passage_langs, batch.passages, batch.negatives
    ):
        row = by_id[gid]
        i = row["langs"].index(plang)
        assert passage == row["passages"][i]
        assert negs == row["negatives"][i][:2] and len(negs) == min(2, len(row["negatives"][i]))
        assert passage not in negs


# ---------------------------------------------------------------------------- determinism and resume


@pytest.mark.parametrize("strategy", ["hybrid", "hybrid-sample"])
def test_same_seed_same_stream_and_exact_resume(mlqa_rows, strategy):
    cfg = SamplerConfig(strategy=strategy, alpha=0.5, batch_size=32, buffer_groups=256, seed=11)

    def key(b):
        return (b.step, b.epoch, b.strategy, b.lang, b.group_ids, b.query_langs, b.passage_langs, b.queries)

    full = _sampler(mlqa_rows, cfg)
    reference = [key(b) for b in full.batches(400)]  # 12,800 groups > 1 pass of MLQA-R (~1,150)
    assert full.stats()["stream_passes"] >= 2
    again = _sampler(mlqa_rows, cfg)
    assert [key(b) for b in again.batches(400)] == reference
    other = _sampler(mlqa_rows, SamplerConfig(**{**cfg.__dict__, "seed": 12}))
    assert [key(b) for b in other.batches(20)] != reference[:20]

    for k in (0, 37, 250):
        first = _sampler(mlqa_rows, cfg)
        for _ in first.batches(k):
            pass
        state = pickle.loads(pickle.dumps(first.state_dict()))
        resumed = _sampler(mlqa_rows, cfg)
        resumed.load_state_dict(state)
        assert [key(b) for b in resumed.batches(400 - k)] == reference[k:]
        assert resumed.stats()["steps"] == full.stats()["steps"]
        assert resumed.stats()["pairs_by_lang_pair"] == full.stats()["pairs_by_lang_pair"]

    with pytest.raises(ValueError, match="seed"):
        _sampler(mlqa_rows, SamplerConfig(**{**cfg.__dict__, "seed": 5})).load_state_dict(state)


@pytest.mark.parametrize("strategy", ["x-y", "hybrid-sample"])
def test_the_reservoir_log_changes_no_batch(ddtp_rows, monkeypatch, strategy):
    """Used groups reach the reservoirs through a log (flushed when full, read per language when a draw
    recycles): a log of a few groups, flushed every step or two and checkpointed mid-way, gives the
    batches and counters of the default one."""
    import hbt_ray.sampler.buffer as buffer_mod

    cfg = SamplerConfig(strategy=strategy, alpha=0.5, batch_size=32, buffer_groups=512, lang_temperature=2.0)
    rows = ddtp_rows[:3000]

    def key(b):
        return (b.step, b.strategy, b.group_ids, b.query_langs, b.passage_langs)

    default = _sampler(rows, cfg)
    reference = [key(b) for b in default.batches(300)]
    assert default.stats()["recycled_pairs"] > 0  # the reservoirs were read
    monkeypatch.setattr(buffer_mod, "RESERVOIR_LOG", 40)
    small = _sampler(rows, cfg)
    got = [key(b) for b in small.batches(150)]
    resumed = _sampler(rows, cfg)
    resumed.load_state_dict(pickle.loads(pickle.dumps(small.state_dict())))
    got += [key(b) for b in resumed.batches(150)]
    assert got == reference
    assert resumed.stats()["pairs_by_lang_pair"] == default.stats()["pairs_by_lang_pair"]


def test_unshuffled_is_fifo(mlqa_rows):
    # every MLQA-R group holds English: English-only steps take the groups in stream order
    cfg = SamplerConfig(strategy="x-x-mono", languages=["en"], batch_size=8, buffer_groups=8, shuffle=False)
    s = _sampler(mlqa_rows, cfg)
    ids = [g for b in s.batches(10) for g in b.group_ids]
    assert ids == [r["group_id"] for r in mlqa_rows[:80]]


# ---------------------------------------------------------------------------- bad input


def test_bad_rows_fail_naming_the_group():
    good = {
        "group_id": "g1",
        "source": "t",
        "langs": ["en", "de"],
        "queries": ["a", "b"],
        "passages": ["c", "d"],
    }
    bad = dict(good, group_id="g2", passages=["c"])
    cfg = SamplerConfig(strategy="x-y", batch_size=1, buffer_groups=4, steps_per_epoch=5)
    s = HybridBatchSampler(cfg, lambda n: iter([good, bad]), 0, 1, {"en": 2, "de": 2})
    with pytest.raises(DataError, match="g2.*differ in length"):
        s.next_batch()
    unknown = dict(good, group_id="g3", langs=["en", "xx"])
    s = HybridBatchSampler(cfg, lambda n: iter([unknown]), 0, 1, {"en": 2, "de": 2})
    with pytest.raises(DataError, match=r"g3.*'xx' is not in lang_counts"):
        s.next_batch()
    s = HybridBatchSampler(cfg, lambda n: iter([]), 0, 1, {"en": 2, "de": 2})
    with pytest.raises(DataError, match="stream of rank 0.*yielded no groups"):
        s.next_batch()
    # a split smaller than one per-rank batch: the group would repeat → clear error, no hang
    cfg2 = SamplerConfig(strategy="x-y", batch_size=2, buffer_groups=4, steps_per_epoch=5)
    s = HybridBatchSampler(cfg2, lambda n: iter([good]), 0, 1, {"en": 2, "de": 2})
    with pytest.raises(DataError, match="only 1 distinct groups"):
        s.next_batch()
    # allow-list: groups with no allowed language are skipped and counted
    only_fr = dict(good, group_id="g4", langs=["fr"], queries=["x"], passages=["y"])
    cfg3 = SamplerConfig(
        strategy="x-y", batch_size=1, buffer_groups=2, steps_per_epoch=5, languages=["en", "de"]
    )
    s = HybridBatchSampler(cfg3, lambda n: iter([only_fr, good]), 0, 1, {"en": 2, "de": 2, "fr": 1})
    assert s.next_batch().group_ids == ["g1"]
    assert s.stats()["groups_skipped_no_language"] >= 1


# ---------------------------------------------------------------------------- Ray Data


def _write_shards(rows: list[dict], out: Path, rows_per_shard: int) -> Manifest:
    return write_shards(
        (PairGroup.from_row(r) for r in rows), out, rows_per_shard=rows_per_shard, progress=False
    )


@pytest.mark.slow
def test_ray_data_shards_two_ranks_disjoint_over_passes_and_resume(ray_local, ddtp_rows, tmp_path):
    rows = ddtp_rows[::16]  # 3,112 groups, still every language
    manifest = _write_shards(rows, tmp_path / "shards", rows_per_shard=200)  # 16 files
    counts, n = manifest.pairs_per_lang, manifest.groups  # the production path: counts from the manifest
    assert (counts, n) == count_pairs(rows)
    world, batch_size = 2, 64
    cfg = SamplerConfig(strategy="hybrid", alpha=0.5, batch_size=batch_size, buffer_groups=256, seed=2)

    def make(rank, prefetch):
        stream = shard_streams(tmp_path / "shards", rank, world, seed=cfg.seed, prefetch_next_pass=prefetch)
        return HybridBatchSampler(cfg, stream, rank, world, counts, num_groups=n)

    samplers = [make(0, False), make(1, True)]  # both stream kinds; each pass is a Ray Data pipeline
    steps = n // batch_size
    results = [[list(samplers[0]) for _ in range(2)]]  # rank 0: two epochs
    k = steps + steps // 2  # rank 1: checkpoint in the middle of its second pass
    head = list(samplers[1].batches(k))
    state = pickle.loads(pickle.dumps(samplers[1].state_dict()))
    tail = list(samplers[1].batches(2 * steps - k))
    results.append([head[:steps], head[steps:] + tail])
    by_id = {r["group_id"]: r for r in rows}
    for epoch in range(2):
        assert len(results[0][epoch]) == len(results[1][epoch]) == steps
        for b0, b1 in zip(results[0][epoch], results[1][epoch]):
            assert (b0.step, b0.epoch, b0.strategy, b0.lang) == (b1.step, epoch, b1.strategy, b1.lang)
            union = b0.group_ids + b1.group_ids
            assert len(set(union)) == batch_size  # disjoint across ranks, also across pass boundaries
            for gid, ql, q in zip(b0.group_ids, b0.query_langs, b0.queries):
                assert by_id[gid]["queries"][list(by_id[gid]["langs"]).index(ql)] == q
    assert all(s.stats()["stream_passes"] >= 1 for s in samplers)
    resumed = make(1, False)
    resumed.load_state_dict(state)
    again = list(resumed.batches(20))
    assert [b.group_ids for b in again] == [b.group_ids for b in tail[:20]]
    assert [b.passages for b in again] == [b.passages for b in tail[:20]]
    for s in [*samplers, resumed]:
        s.close()


def test_shard_streams_fewer_files_than_ranks(ray_local, mlqa_rows, tmp_path):
    _write_shards(mlqa_rows, tmp_path / "one", rows_per_shard=10_000)  # a single file, 2 ranks
    factories = [shard_streams(tmp_path / "one", r, 2, prefetch_next_pass=False) for r in range(2)]
    seen = [[row["group_id"] for row in factory(0)] for factory in factories]
    assert sorted(g for ids in seen for g in ids) == sorted(r["group_id"] for r in mlqa_rows)
    import ray

    assert count_pairs_dataset(ray.data.read_parquet(str(tmp_path / "one"))) == count_pairs(mlqa_rows)
    assert all(ids for ids in seen)
    with pytest.raises(DataError, match="no such pair shard"):
        shard_streams(tmp_path / "does-not-exist", 0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet"):
        shard_streams(tmp_path / "empty", 0, 1)


@pytest.mark.slow
def test_stream_of_1m_generated_groups_bounded_memory(ray_local):
    import psutil
    import ray

    langs = ["en", "de", "fr", "es", "ja", "zh"]

    def make_groups(batch: dict) -> dict:
        ids = batch["id"]
        out = {"group_id": [], "source": [], "langs": [], "queries": [], "passages": [], "negatives": []}
        for i in ids.tolist():
            k = 2 + i % 4
            ls = [langs[(i + j) % 6] for j in range(k)]
            out["group_id"].append(f"g{i}")
            out["source"].append("gen")
            out["langs"].append(ls)
            out["queries"].append([f"q{i}-{lang}" for lang in ls])
            out["passages"].append([f"passage {i} in {lang} " * 8 for lang in ls])
            out["negatives"].append([[] for _ in ls])
        return out

    total = 1_000_000
    ds = ray.data.range(total, override_num_blocks=200).map_batches(make_groups, batch_size=1000)
    lang_counts = {lang: total * 7 // 12 for lang in langs}  # any positive counts work (T weighting)
    cfg = SamplerConfig(strategy="hybrid", alpha=0.5, batch_size=32, buffer_groups=2048)
    sampler = HybridBatchSampler(cfg, lambda n: ds.iter_rows(), 0, 1, lang_counts, num_groups=total)
    assert len(sampler) == total // 32
    proc = psutil.Process()
    it = sampler.batches(3000)
    for _ in range(200):
        next(it)
    rss0 = proc.memory_info().rss
    seen = 0
    for batch in it:
        seen += len(batch)
        assert sampler.stats()["buffer_groups"] <= 2048 if batch.step % 500 == 0 else True
    growth = proc.memory_info().rss - rss0
    st = sampler.stats()
    assert seen == 2800 * 32
    assert st["groups_read"] <= 3000 * 32 + 2048 + 1 and st["stream_passes"] == 0
    assert growth < 150 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB"


def test_an_open_sampler_collects_garbage_rarely_and_close_restores_the_thresholds(mlqa_rows):
    """From its first batch until close(), rows are read under the raised young-generation threshold; a
    caller's higher threshold is kept; close() puts back what the sampler replaced."""
    import gc

    from hbt_ray.sampler.hybrid import GC_YOUNG_THRESHOLD

    seen: list[int] = []

    def stream(_pass):
        for row in mlqa_rows:
            seen.append(gc.get_threshold()[0])
            yield row

    counts, n = count_pairs(mlqa_rows)
    cfg = SamplerConfig(strategy="hybrid", alpha=0.5, batch_size=16, buffer_groups=256)
    before = gc.get_threshold()
    try:
        gc.set_threshold(900, 7, 9)
        sampler = HybridBatchSampler(cfg, stream, 0, 1, counts, num_groups=n)
        assert gc.get_threshold() == (900, 7, 9)  # nothing changes before the first batch
        for _ in sampler.batches(40):
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 7, 9)
        assert seen and set(seen) == {GC_YOUNG_THRESHOLD}
        sampler.close()
        assert gc.get_threshold() == (900, 7, 9)

        gc.set_threshold(80_000, 7, 9)  # a caller's higher threshold is kept, and stays after close
        seen.clear()
        sampler = HybridBatchSampler(cfg, stream, 0, 1, counts, num_groups=n)
        sampler.next_batch()
        sampler.close()
        assert set(seen) == {80_000} and gc.get_threshold() == (80_000, 7, 9)
    finally:
        gc.set_threshold(*before)
