"""The search / metrics / bias core of hbt_ray.evaluate on synthetic embeddings, checked against ranx."""

from __future__ import annotations

import numpy as np
import pytest
from ranx import Qrels, Run
from ranx import evaluate as ranx_evaluate

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.records import Candidate, DataError, EvalQuery, EvalSet
from hbt_ray.evaluate import (
    DEFAULT_METRICS,
    METRIC_MODES,
    EvalConfig,
    EvalEmbeddings,
    LocalSearcher,
    RaySearcher,
    evaluate_embeddings,
    merge_topk,
    metrics_from_ranks,
    rank_distance,
    relevant_ranks,
)

LANGS = ["de", "en", "zh"]


def synthetic(n_par: int = 12, seed: int = 0, dim: int = 16) -> tuple[EvalSet, EvalEmbeddings]:
    """3 languages; per paragraph 3 candidate sentences and 2 questions. Some questions exist in only
    some languages (cross skips them), one question has 2 relevant sentences; query = noisy answer."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_par, 3, dim))
    queries: dict[str, list[EvalQuery]] = {}
    candidates: dict[str, list[Candidate]] = {}
    q_emb: dict[str, list[np.ndarray]] = {}
    c_emb: dict[str, np.ndarray] = {}
    for li, lang in enumerate(LANGS):
        cands, qs, qe = [], [], []
        lang_shift = rng.normal(size=dim) * 0.8  # a language component: makes cross/multi harder than mono
        vecs = []
        for p in range(n_par):
            for s in range(3):
                cands.append(Candidate(f"{lang}-p{p}-s{s}", f"sentence {s} of {p}", f"p{p}"))
                vecs.append(base[p, s] + lang_shift + rng.normal(size=dim) * 0.3)
            for j in range(2):
                if (p + j + li) % 5 == 0 and j == 1:
                    continue  # missing in this language
                rel = (
                    (f"{lang}-p{p}-s{j}",) if not (p == 0 and j == 0) else (f"{lang}-p0-s0", f"{lang}-p0-s2")
                )
                qs.append(EvalQuery(f"{lang}-q{p}-{j}", f"question {j} of {p}", f"q{p}-{j}", rel, f"p{p}"))
                qe.append(base[p, j] + lang_shift * 0.5 + rng.normal(size=dim) * 1.2)
        candidates[lang], queries[lang], q_emb[lang] = cands, qs, qe
        c_emb[lang] = np.asarray(vecs)
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    emb = EvalEmbeddings(
        {k: norm(np.asarray(v)) for k, v in q_emb.items()}, {k: norm(v) for k, v in c_emb.items()}
    )
    return EvalSet("synthetic", queries, candidates), emb


def ranx_scores(qrels: dict, run: dict, metrics: list[str]) -> dict[str, float]:
    out = ranx_evaluate(Qrels(qrels), Run(run), metrics)
    return {m: float(out[m]) for m in metrics} if len(metrics) > 1 else {metrics[0]: float(out)}


def reference_with_ranx(es: EvalSet, emb: EvalEmbeddings, metrics: list[str]) -> dict[str, float]:
    """The three settings written out plainly with numpy scores + ranx."""

    def run_of(x: str, pool_ids: list[str], pool: np.ndarray, qrels: dict) -> dict:
        scores = emb.queries[x] @ pool.T
        return {
            q.qid: {cid: float(s) for cid, s in zip(pool_ids, row)}
            for q, row in zip(es.queries[x], scores)
            if q.qid in qrels
        }

    by_link = {
        (lang, q.link): q.relevant for lang in es.langs for q in es.queries[lang]
    }  # (lang, link) → relevant cids
    out: dict[str, list[dict[str, float]]] = {"mono": [], "cross": [], "multi": []}
    for x in es.langs:
        for y in es.langs:
            qrels = {}
            for q in es.queries[x]:
                rel = q.relevant if x == y else by_link.get((y, q.link))
                if rel:
                    qrels[q.qid] = {c: 1 for c in rel}
            ids = [c.cid for c in es.candidates[y]]
            out["mono" if x == y else "cross"].append(
                ranx_scores(qrels, run_of(x, ids, emb.candidates[y], qrels), metrics)
            )
        pool_ids = [c.cid for y in es.langs for c in es.candidates[y]]
        pool = np.concatenate([emb.candidates[y] for y in es.langs])
        qrels = {q.qid: {c: 1 for y in es.langs for c in by_link.get((y, q.link), ())} for q in es.queries[x]}
        out["multi"].append(ranx_scores(qrels, run_of(x, pool_ids, pool, qrels), metrics))
    return {f"{s}_{m}": float(np.mean([row[m] for row in rows])) for s, rows in out.items() for m in metrics}


def test_settings_and_metrics_match_ranx():
    es, emb = synthetic()
    cfg = EvalConfig(show_progress=False)
    res = evaluate_embeddings(es, emb, cfg)
    ref = reference_with_ranx(es, emb, DEFAULT_METRICS)
    for key, value in ref.items():
        assert res.summary[key] == pytest.approx(value, abs=1e-9), key
    # not trivial: the constructed set is neither solved nor random
    assert 0.2 < res.summary["cross_map"] < res.summary["mono_map"] < 1.0
    assert len(res.cross) == 6 and len(res.mono) == 3 and len(res.multi) == 3
    assert res.counts["skipped_cross_queries"]  # questions missing in a language are skipped, and counted
    assert res.summary["mean_map"] == pytest.approx(
        np.mean([res.summary["mono_map"], res.summary["cross_map"], res.summary["multi_map"]])
    )


def test_per_query_metrics_match_ranx_with_cutoffs():
    rng = np.random.default_rng(3)
    n_q, n_c = 40, 150
    scores = rng.normal(size=(n_q, n_c))
    relevant = [np.sort(rng.choice(n_c, size=rng.integers(1, 6), replace=False)) for _ in range(n_q)]
    ids = np.argsort(-scores, axis=1)
    metrics = ["map", "recall@1", "recall@10", "recall@100", "ndcg@3", "ndcg@10", "mrr@10", "mrr@100"]
    ours = metrics_from_ranks(relevant_ranks(ids, relevant), metrics)
    qrels = {f"q{i:03d}": {f"c{c}": 1 for c in rel} for i, rel in enumerate(relevant)}
    run = {f"q{i:03d}": {f"c{c}": float(s) for c, s in enumerate(row)} for i, row in enumerate(scores)}
    for m in metrics:
        theirs = ranx_evaluate(Qrels(qrels), Run(run), m, return_mean=False)
        np.testing.assert_allclose(ours[m], theirs, atol=1e-12, err_msg=m)
    # a truncated ranking (top 20): map is AP@20 over all relevant, as ranx computes map@20
    ours20 = metrics_from_ranks(relevant_ranks(ids[:, :20], relevant), ["map"])["map"]
    theirs20 = ranx_evaluate(Qrels(qrels), Run(run), "map@20", return_mean=False)
    np.testing.assert_allclose(ours20, theirs20, atol=1e-12)


def test_rank_distance_on_known_ranks():
    # query 0: relevant at ranks 1, 4, 9 → 8; query 1: at 2 and 3 → 1; query 2: one relevant → 0
    ids = np.array([[5, 0, 1, 6, 2, 3, 4, 8, 7, 9]] * 3)
    relevant = [np.array([5, 6, 7]), np.array([0, 1]), np.array([9])]
    ranks = relevant_ranks(ids, relevant)
    np.testing.assert_array_equal(ranks[0], [1, 4, 9])
    np.testing.assert_array_equal(rank_distance(ranks), [8, 1, 0])
    with pytest.raises(ValueError, match="full ranking"):
        rank_distance(relevant_ranks(ids[:, :5], relevant))


def test_bias_in_multi_setting_on_constructed_embeddings():
    # 2 languages, 2 parallel questions. en query q1 ranks: en-c1 (1), en-c2 (2), de-c1 (3), de-c2 (4)
    # → rank distance 3 - 1 = 2. de query q1 ranks de-c1 (1), en-c1 (2) → 1. q2: symmetric.
    es = EvalSet(
        "bias",
        {
            lang: [EvalQuery("q1", "", "L1", ("c1",)), EvalQuery("q2", "", "L2", ("c2",))]
            for lang in ("en", "de")
        },
        {lang: [Candidate("c1", ""), Candidate("c2", "")] for lang in ("en", "de")},
    )
    cand = {
        "en": np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        "de": np.array([[0.6, 0.0, 0.8], [0.0, 0.6, 0.8]]),
    }
    queries = {
        "en": np.array([[0.9, 0.6, 0.0], [0.6, 0.9, 0.0]]),  # en-c1 .9, en-c2 .6, de-c1 .54, de-c2 .36
        "de": np.array([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]),  # de-c1 .7, en-c1 .5, de-c2 .4, en-c2 0
    }
    res = evaluate_embeddings(
        es,
        EvalEmbeddings(queries, cand),
        EvalConfig(settings=["multi"], metrics=["map"], show_progress=False),
    )
    assert res.multi["en"]["bias"] == 2.0 and res.multi["de"]["bias"] == 1.0
    assert res.summary["bias"] == 1.5
    assert res.multi["en"]["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_sharded_search_equals_single_index(ray_local):
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(301, 24)).astype(np.float32)
    queries = rng.normal(size=(37, 24)).astype(np.float32)
    single = LocalSearcher(EvalConfig().index)
    single.add_pool("p", pool)
    ref_scores, ref_ids = single.search("p", queries, 301)
    for mode in ("shard_candidates", "split_queries"):
        for k in (10, 301):
            searcher = RaySearcher(EvalConfig().index, num_shards=2, mode=mode, num_cpus=0.5)
            try:
                searcher.add_pool("p", pool)
                scores, ids = searcher.search("p", queries, k)
            finally:
                searcher.close()
            np.testing.assert_array_equal(ids, ref_ids[:, :k], err_msg=f"{mode} k={k}")
            np.testing.assert_allclose(scores, ref_scores[:, :k], rtol=1e-6)


def test_evaluate_embeddings_sharded_equals_local(ray_local):
    es, emb = synthetic(n_par=8, seed=5)
    local = evaluate_embeddings(es, emb, EvalConfig(show_progress=False))
    sharded = evaluate_embeddings(es, emb, EvalConfig(show_progress=False, num_shards=2, shard_num_cpus=0.5))
    assert sharded.summary == local.summary
    assert sharded.cross == local.cross


def test_merge_topk_handles_empty_and_short_shards():
    s1, i1 = np.array([[0.9, 0.1]], np.float32), np.array([[4, 2]])
    s2, i2 = np.array([[0.5, -1.0]], np.float32), np.array([[7, -1]])  # shard returned one hit only
    empty = (np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64))
    scores, ids = merge_topk([(s1, i1), empty, (s2, i2)], 3)
    np.testing.assert_array_equal(ids, [[4, 7, 2]])
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.1]])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_are_close_to_flat(kind):
    es, emb = synthetic(n_par=60, seed=2)
    flat = evaluate_embeddings(es, emb, EvalConfig(show_progress=False))
    approx = evaluate_embeddings(
        es, emb, load_config(EvalConfig, None, [f"index.kind={kind}", "show_progress=false"])
    )
    # full rankings (k = pool size): HNSW/IVF may misorder a few items, never lose the mono ranking
    assert approx.summary["mono_map"] == pytest.approx(flat.summary["mono_map"], abs=0.05)
    assert approx.summary["multi_recall@10"] == pytest.approx(flat.summary["multi_recall@10"], abs=0.1)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="metrics: unknown metric 'precision@3'"):
        load_config(EvalConfig, None, ["metrics=map,precision@3"])
    with pytest.raises(ConfigError, match="settings"):
        load_config(EvalConfig, None, ["settings=mono,bilingual"])
    with pytest.raises(ConfigError, match="index.kind"):
        load_config(EvalConfig, None, ["index.kind=pq"])
    with pytest.raises(ConfigError, match="unknown config key index.nprob"):
        load_config(EvalConfig, None, ["index.nprob=3"])
    cfg = load_config(EvalConfig, None, ["settings=cross", "num_shards=3", "langs=en,de"])
    assert cfg.settings == ["cross"] and cfg.num_shards == 3 and cfg.langs == ["en", "de"]
    with pytest.raises(ConfigError, match="data: unknown eval set spec 'squad'"):
        load_config(EvalConfig, None, ["data=squad"])
    with pytest.raises(ConfigError, match="^max_paragraphs: must be >= 1, got 0"):  # relative to the section
        load_config(EvalConfig, None, ["max_paragraphs=0"])
    cfg = load_config(EvalConfig, None, ["data=miracl:/tmp/m:sw", "subset_seed=3"])
    assert cfg.data == "miracl:/tmp/m:sw" and cfg.subset_seed == 3


def test_metric_modes_maximise_every_map_and_minimise_the_bias():
    lareqa = {k: v for k, v in METRIC_MODES.items() if not k.startswith("tatoeba_") and "@" not in k}
    assert lareqa == {"mono_map": "max", "cross_map": "max", "multi_map": "max", "mean_map": "max", "bias": "min"}
    miracl = {k: v for k, v in METRIC_MODES.items() if "@" in k and not k.startswith("tatoeba_")}
    assert set(miracl) == {"mono_ndcg@10", "mono_recall@100", "mono_low_resource_ndcg@10",
                           "mono_low_resource_recall@100"} and set(miracl.values()) == {"max"}  # fmt: skip
    tatoeba = {k: v for k, v in METRIC_MODES.items() if k.startswith("tatoeba_")}
    assert "tatoeba_outside_xlmr_acc" in tatoeba and set(tatoeba.values()) == {"max"}  # accuracies, F1, MRR


def test_bad_relevance_names_the_record():
    es, emb = synthetic(n_par=3)
    q = es.queries["en"][1]
    es.queries["en"][1] = EvalQuery(q.qid, q.text, q.link, ("nope",), q.paragraph)
    with pytest.raises(DataError, match=r"synthetic \[en/en-q0-1\]: relevant ids \['nope'\]"):
        evaluate_embeddings(es, emb, EvalConfig(show_progress=False))
