"""Per-source sampling weights (``sampler.source_weights``, issue 34 item 1): each source of the data gets
its weight's share of the pairs, languages follow the mixture p(L) = Σ_S w_S p(L | S), the shards'
manifest carries the per-source language counts it needs, and a resumed sampler continues exactly."""

from __future__ import annotations

import numpy as np
import pytest

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.lareqa import read_lareqa_pairs
from hbt_ray.data.pairs import read_pairs
from hbt_ray.data.records import Pair, PairGroup
from hbt_ray.data.shards import read_manifest, write_shards
from hbt_ray.sampler import HybridBatchSampler, SamplerConfig, count_pairs
from hbt_ray.train import TrainConfig

#: MLQA-R's seven languages and three DDTP has beside them
TEN = ["ar", "de", "en", "es", "hi", "vi", "zh", "fr", "it", "ja"]


@pytest.fixture(scope="module")
def two_sources(shared_data) -> list[dict]:
    """MLQA-R's groups (source ``mlqa-r``) then DDTP's first 3,000 (source ``pairs``), in TEN only."""
    mlqa = [g.to_row() for g in read_lareqa_pairs(shared_data / "lareqa" / "mlqa-r")]
    ddtp = [g.to_row() for g in read_pairs(shared_data / "ddtp" / "pairs.jsonl.gz", progress=False, limit=3000)]
    out = []
    for row in mlqa + ddtp:
        keep = [i for i, lang in enumerate(row["langs"]) if lang in TEN]
        if keep:
            out.append({**row, **{k: [row[k][i] for i in keep] for k in ("langs", "queries", "passages", "negatives")}})
    return out


def _source_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        per = out.setdefault(row["source"], {})
        for lang in row["langs"]:
            per[lang] = per.get(lang, 0) + 1
    return out


def _samplers(rows, cfg, world=2):
    counts, n_groups = count_pairs(rows)
    splits = [rows[r::world] for r in range(world)]
    return [HybridBatchSampler(cfg, (lambda n, r=r: iter(splits[r])), r, world, counts, num_groups=n_groups,
                               source_lang_counts=_source_counts(rows)) for r in range(world)]  # fmt: skip


def _tolerance(p: float, n: int) -> float:
    return 4 * np.sqrt(p * (1 - p) / n) + 0.005


@pytest.mark.parametrize("strategy", ["hybrid", "x-y", "x-x"])
def test_each_source_gets_its_weights_share_and_languages_follow_the_mixture(two_sources, strategy):
    weights = {"mlqa-r": 0.8, "pairs": 0.2}
    steps, batch = 300, 32
    cfg = SamplerConfig(strategy=strategy, batch_size=batch, buffer_groups=2048, lang_temperature=2.0,
                        source_weights=weights)  # fmt: skip
    ranks = _samplers(two_sources, cfg)
    for _ in range(steps):
        slices = [s.next_batch() for s in ranks]
        if slices[0].strategy == "x-x-mono":  # weighting the sources keeps a mono batch monolingual
            assert {lang for b in slices for lang in (*b.query_langs, *b.passage_langs)} == {slices[0].lang}
    n = steps * batch
    by_source: dict[str, int] = {}
    by_lang: dict[str, int] = {}
    for s in ranks:
        st = s.stats()
        assert st["fallback_share"] < 0.001
        for src, c in st["pairs_by_source"].items():
            by_source[src] = by_source.get(src, 0) + c
        for lang, c in st["query_pairs_by_lang"].items():
            by_lang[lang] = by_lang.get(lang, 0) + c
    assert sum(by_source.values()) == n
    for src, w in weights.items():
        assert abs(by_source[src] / n - w) < _tolerance(w, n), (strategy, by_source)
    if strategy != "hybrid":  # per pair, query languages at the mixture's p(L)
        for lang, p in ranks[0].stats()["lang_p"].items():
            assert abs(by_lang.get(lang, 0) / n - p) < _tolerance(p, n), (strategy, lang, by_lang.get(lang, 0) / n, p)


def test_without_weights_the_sources_share_is_the_datas_not_the_weights(two_sources):
    """The test above can fail: unweighted, MLQA-R's share is far from 0.8."""
    counts, n_groups = count_pairs(two_sources)
    s = HybridBatchSampler(SamplerConfig(strategy="x-x", batch_size=32, buffer_groups=2048, lang_temperature=2.0),
                           lambda n: iter(two_sources), 0, 1, counts, num_groups=n_groups)  # fmt: skip
    for _ in range(300):
        s.next_batch()
    share = s.stats()["pairs_by_source"]["mlqa-r"] / (300 * 32)
    assert abs(share - 0.8) > 0.1, share


def test_the_mixture_puts_a_language_of_one_source_at_that_sources_weight():
    """Source b alone has fr: p(fr) = w_b p(fr | b); every fr pair comes from b, every pair of a from a."""
    rows = [PairGroup(f"a{i}", "a", {"en": Pair(f"q{i}", f"p{i}"), "de": Pair(f"Q{i}", f"P{i}")}).to_row()
            for i in range(400)]  # fmt: skip
    rows += [PairGroup(f"b{i}", "b", {"en": Pair(f"x{i}", f"y{i}"), "fr": Pair(f"X{i}", f"Y{i}")}).to_row()
             for i in range(400)]  # fmt: skip
    cfg = SamplerConfig(strategy="x-x", batch_size=16, buffer_groups=800, source_weights={"a": 3, "b": 1})
    (s,) = _samplers(rows, cfg, world=1)
    assert dict(zip(s.langs, s.p.round(4))) == {"de": 0.375, "en": 0.5, "fr": 0.125}
    seen = []
    for _ in range(200):
        b = s.next_batch()
        seen += list(zip(b.query_langs, b.sources))
    assert {src for lang, src in seen if lang == "fr"} == {"b"} and {src for lang, src in seen if lang == "de"} == {"a"}
    n = len(seen)
    share_b = sum(src == "b" for _, src in seen) / n
    assert abs(share_b - 0.25) < _tolerance(0.25, n)


def test_resume_with_source_weights_is_exact_and_changed_weights_are_refused(two_sources):
    cfg = SamplerConfig(strategy="hybrid", batch_size=16, buffer_groups=512, source_weights={"mlqa-r": 1, "pairs": 3})
    (a,) = _samplers(two_sources, cfg, world=1)
    for _ in range(20):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch().group_ids for _ in range(10)]
    (b,) = _samplers(two_sources, cfg, world=1)
    b.load_state_dict(state)
    assert [b.next_batch().group_ids for _ in range(10)] == expected
    other = SamplerConfig(strategy="hybrid", batch_size=16, buffer_groups=512, source_weights={"mlqa-r": 1, "pairs": 1})
    (c,) = _samplers(two_sources, other, world=1)
    with pytest.raises(ValueError, match="sampler.source_weights was"):
        c.load_state_dict(state)


def test_source_weights_errors_name_the_key(two_sources):
    counts, n_groups = count_pairs(two_sources)
    per_source = _source_counts(two_sources)

    def build(weights, source_counts=per_source):
        cfg = SamplerConfig(batch_size=16, buffer_groups=512, source_weights=weights)
        return HybridBatchSampler(cfg, lambda n: iter(()), 0, 1, counts, num_groups=n_groups,
                                  source_lang_counts=source_counts)  # fmt: skip

    with pytest.raises(ConfigError, match=r"sampler.source_weights: names \['ddtp'\], not a source of the data"):
        build({"mlqa-r": 1, "pairs": 1, "ddtp": 1})
    with pytest.raises(ConfigError, match=r"sampler.source_weights: leaves out \['pairs'\]"):
        build({"mlqa-r": 1})
    with pytest.raises(ConfigError, match="sampler.source_weights: the data's pairs per source and language"):
        build({"mlqa-r": 1, "pairs": 1}, None)
    with pytest.raises(ConfigError, match=r"sampler.source_weights.pairs: the source has no pairs"):
        cfg = SamplerConfig(batch_size=16, buffer_groups=512, languages=["ar", "hi"],
                            source_weights={"mlqa-r": 1, "pairs": 1})  # fmt: skip
        HybridBatchSampler(cfg, lambda n: iter(()), 0, 1, counts, num_groups=n_groups, source_lang_counts=per_source)
    with pytest.raises(ConfigError, match=r"train.sampler.source_weights.ddtp: 0.0 is not a number > 0|"
                                          r"sampler.source_weights.ddtp: 0.0 is not a number > 0"):  # fmt: skip
        load_config(TrainConfig, None, ["sampler.source_weights={mlqa-r: 1, ddtp: 0}"])
    with pytest.raises(ConfigError, match=r"sampler.source_weights.ddtp: 'x' is not a float"):
        load_config(TrainConfig, None, ["sampler.source_weights={mlqa-r: 1, ddtp: x}"])
    with pytest.raises(ConfigError, match=r"sampler.source_weights: empty"):
        load_config(TrainConfig, None, ["sampler.source_weights={}"])


def test_the_manifest_counts_pairs_per_source_and_language(two_sources, tmp_path):
    groups = [PairGroup(r["group_id"], r["source"], {lang: Pair(q, p) for lang, q, p in
                                                     zip(r["langs"], r["queries"], r["passages"])})
              for r in two_sources[:50] + two_sources[-50:]]  # fmt: skip
    manifest = write_shards(groups, tmp_path / "shards", rows_per_shard=40)
    assert manifest.pairs_per_source_lang == _source_counts(two_sources[:50] + two_sources[-50:])
    assert read_manifest(tmp_path / "shards").pairs_per_source_lang == manifest.pairs_per_source_lang
    assert sum(sum(c.values()) for c in manifest.pairs_per_source_lang.values()) == manifest.pairs


def test_a_sweep_sets_one_sources_weight_beside_the_others():
    """As a Tune trial's parameters arrive (dotted keys: one searched, one fixed by the space)."""
    from hbt_ray.config import override

    cfg = override(TrainConfig(), {"sampler.source_weights.mlqa-r": 0.8, "sampler.source_weights.ddtp": 1})
    assert cfg.sampler.source_weights == {"mlqa-r": 0.8, "ddtp": 1.0}
    cfg = override(cfg, ["sampler.source_weights.mlqa-r=2"])
    assert cfg.sampler.source_weights == {"mlqa-r": 2.0, "ddtp": 1.0}
