"""Evaluate: search + metrics on embeddings (:func:`evaluate_embeddings`), encode + search + metrics for a
model (:func:`evaluate`), and the eval set an :class:`EvalConfig` names (:func:`load_eval_data`).

Settings as LAReQA (Roy et al., 2020) and arXiv 2408.10536 define them, for an :class:`EvalSet`:

- **mono**: queries in X against the candidates in X; macro average over languages.
- **cross**: queries in X against the candidates in Y, for every ordered pair X≠Y; the relevant
  candidates are those of the parallel query in Y (same ``link``); macro average over pairs.
- **multi**: queries in X against the pooled candidates of all languages; relevant = every parallel
  answer; macro average over query languages. **Language bias** (rank distance, Huang et al., SIGIR
  2023) = per query, the highest minus the lowest rank of its relevant candidates in the pooled
  ranking; mean per query language, macro over languages (lower is less biased).

A :class:`~hbt_ray.data.records.BitextSet` (``data: tatoeba``) is evaluated by bitext retrieval instead
(:mod:`hbt_ray.evaluate.bitext`): :func:`evaluate` dispatches on the kind of set.

Example on hand-made embeddings (2 languages, 2 parallel questions)::

    >>> from hbt_ray.data.records import Candidate, EvalQuery
    >>> es = EvalSet("demo",
    ...     {l: [EvalQuery("q1", "?", "L1", ("c1",)), EvalQuery("q2", "?", "L2", ("c2",))] for l in ("en", "de")},
    ...     {l: [Candidate("c1", "a"), Candidate("c2", "b")] for l in ("en", "de")})
    >>> e = np.eye(2, dtype=np.float32)
    >>> emb = EvalEmbeddings({"en": e, "de": e}, {"en": e, "de": e})
    >>> res = evaluate_embeddings(es, emb, EvalConfig(show_progress=False))
    >>> res.summary["mono_map"], res.summary["cross_map"], res.summary["multi_map"]
    (1.0, 1.0, 1.0)
    >>> res.summary["bias"]  # the two parallel answers of a query rank 1st and 2nd in the pool
    1.0
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from hbt_ray.config import ConfigError, bars_off
from hbt_ray.data.records import BitextSet, DataError, EvalSet
from hbt_ray.data.sources import load_eval_set
from hbt_ray.evaluate.bitext import evaluate_bitext, subset_bitext
from hbt_ray.evaluate.bitext_result import BitextResult
from hbt_ray.evaluate.config import SETTINGS, EvalConfig, parse_metric
from hbt_ray.evaluate.encode import (
    EvalEmbeddings,
    ModelSpec,
    TextEncoder,
    encode_eval_set,
    is_model_spec,
    model_config,
)
from hbt_ray.evaluate.metrics import metrics_from_ranks, rank_distance, relevant_ranks
from hbt_ray.evaluate.placement import encode_eval_set_model
from hbt_ray.evaluate.result import EvalResult
from hbt_ray.evaluate.search import LocalSearcher, RaySearcher, make_searcher


def load_eval_data(cfg: EvalConfig) -> EvalSet | BitextSet:
    """The eval set ``cfg`` names: ``cfg.data`` restricted to ``cfg.langs`` and subset to
    ``cfg.max_paragraphs`` whole parallel paragraphs (drawn with ``cfg.subset_seed``, else the first);
    for ``tatoeba[:PATH]`` a BitextSet of the first ``cfg.max_pairs`` pairs per language (after the first
    ``cfg.skip_pairs``).

    >>> load_eval_data(EvalConfig(langs=["en", "de"], max_paragraphs=2)).langs
    ['de', 'en']
    >>> load_eval_data(EvalConfig(data="tatoeba", langs=["deu"], max_pairs=2)).counts()
    {'deu': 2}
    """
    eval_set = load_eval_set(
        cfg.data, langs=cfg.langs or None, max_paragraphs=cfg.max_paragraphs, seed=cfg.subset_seed,
        download=cfg.download, max_pairs=cfg.max_pairs, miracl_pool=cfg.miracl_pool,
        skip_paragraphs=cfg.skip_paragraphs, skip_pairs=cfg.skip_pairs,
    )  # fmt: skip
    check_settings(eval_set, cfg)
    return eval_set


def check_settings(eval_set: EvalSet | BitextSet, cfg: EvalConfig) -> None:
    """Cross-lingual and multilingual retrieval need two languages: with one, ``cross`` has no pairs and
    the language bias nothing to compare (they were reported as NaN); ConfigError naming the key."""
    if isinstance(eval_set, BitextSet) or len(eval_set.langs) > 1:
        return
    needs_two = [s for s in cfg.settings if s != "mono"]
    if needs_two:
        raise ConfigError(f"settings: {needs_two} need at least two languages; {cfg.data} with langs "
                          f"{eval_set.langs} has one: settings=[mono], or more langs")  # fmt: skip


def _macro(table: dict[str, dict[str, float]], metric: str) -> float:
    values = [row[metric] for row in table.values() if metric in row]
    return float(np.mean(values)) if values else float("nan")


def _check_relevant(eval_set: EvalSet) -> dict[str, dict[str, int]]:
    """Candidate id → row per language; every relevant id must be a candidate of its language."""
    index: dict[str, dict[str, int]] = {}
    for lang in eval_set.langs:
        cands = eval_set.candidates.get(lang, [])
        index[lang] = {c.cid: i for i, c in enumerate(cands)}
        if len(index[lang]) != len(cands):
            raise DataError(f"duplicate candidate ids in language {lang}", eval_set.name)
        for q in eval_set.queries[lang]:
            missing = [cid for cid in q.relevant if cid not in index[lang]]
            if missing or not q.relevant:
                why = f"relevant ids {missing} are not candidates" if missing else "no relevant candidate"
                raise DataError(f"{why} in {lang}", eval_set.name, f"{lang}/{q.qid}")
    return index


def evaluate_embeddings(
    eval_set: EvalSet,
    embeddings: EvalEmbeddings,
    cfg: EvalConfig,
    searcher_factory: Callable[[EvalConfig], LocalSearcher | RaySearcher] = make_searcher,
) -> EvalResult:
    """Search + metrics for the configured settings on precomputed embeddings."""
    t0 = time.perf_counter()
    langs = eval_set.langs
    cand_index = _check_relevant(eval_set)
    # link → lang → relevant candidate rows
    by_link: dict[str, dict[str, list[int]]] = {}
    for lang in langs:
        for q in eval_set.queries[lang]:
            by_link.setdefault(q.link, {}).setdefault(lang, []).extend(
                cand_index[lang][c] for c in q.relevant
            )
    for lang in langs:
        n_q, n_c = len(eval_set.queries[lang]), len(eval_set.candidates.get(lang, []))
        if embeddings.queries[lang].shape[0] != n_q or embeddings.candidates[lang].shape[0] != n_c:
            raise ValueError(
                f"{eval_set.name}/{lang}: embeddings do not match {n_q} queries / {n_c} candidates"
            )

    want_cut = max([parse_metric(m)[1] or 0 for m in cfg.metrics] + [1])
    full = "map" in cfg.metrics
    searcher = searcher_factory(cfg)
    result = EvalResult(eval_set.name, {}, config=asdict(cfg))
    pairs = [(x, y) for x in langs for y in langs if (x == y and "mono" in cfg.settings)]
    pairs += [(x, y) for x in langs for y in langs if x != y and "cross" in cfg.settings]
    steps = len(pairs) + (len(langs) if "multi" in cfg.settings else 0)
    bar = tqdm(total=steps, desc=f"search {eval_set.name}", disable=bars_off(cfg.show_progress))
    skipped: dict[str, int] = {}
    try:
        for y in langs:
            if any(p[1] == y for p in pairs):
                searcher.add_pool(y, embeddings.candidates[y])
        for x, y in pairs:
            n_pool = len(eval_set.candidates[y])
            qrows, relevant = [], []
            for i, q in enumerate(eval_set.queries[x]):
                rel = q.relevant if x == y else None
                rows = [cand_index[y][c] for c in rel] if rel is not None else by_link[q.link].get(y, [])
                if rows:
                    qrows.append(i)
                    relevant.append(np.unique(np.asarray(rows, dtype=np.int64)))
            skipped[f"{x}→{y}"] = len(eval_set.queries[x]) - len(qrows)
            if not qrows:
                bar.update()
                continue
            k = n_pool if full else min(want_cut, n_pool)
            _, ids = searcher.search(y, embeddings.queries[x][qrows], k)
            per_query = metrics_from_ranks(relevant_ranks(ids, relevant), cfg.metrics)
            row = {m: float(v.mean()) for m, v in per_query.items()}
            (result.mono if x == y else result.cross)[x if x == y else f"{x}→{y}"] = row
            bar.update()
        if "multi" in cfg.settings:
            offsets = np.cumsum([0] + [len(eval_set.candidates[y]) for y in langs])
            start = dict(zip(langs, offsets[:-1].tolist()))
            pool = np.concatenate([embeddings.candidates[y] for y in langs]).astype(np.float32)
            searcher.add_pool("*multi*", pool)
            for x in langs:
                if not eval_set.queries[x]:  # a subset may keep a language's candidates only (MLQA-R)
                    bar.update()
                    continue
                relevant = [
                    np.asarray(
                        sorted(start[y] + r for y, rows in by_link[q.link].items() for r in rows),
                        dtype=np.int64,
                    )
                    for q in eval_set.queries[x]
                ]
                _, ids = searcher.search("*multi*", embeddings.queries[x], len(pool))
                ranks = relevant_ranks(ids, relevant)
                per_query = metrics_from_ranks(ranks, cfg.metrics)
                row = {m: float(v.mean()) for m, v in per_query.items()}
                multi_rel = np.sum(~np.isnan(ranks), axis=1) > 1
                if multi_rel.any():  # else no query has parallel answers: no bias to measure (not NaN)
                    row["bias"] = float(rank_distance(ranks[multi_rel]).mean())
                result.multi[x] = row
                bar.update()
    finally:
        bar.close()
        searcher.close()

    for setting, table in (("mono", result.mono), ("cross", result.cross), ("multi", result.multi)):
        if table:
            for metric in cfg.metrics:
                result.summary[f"{setting}_{metric}"] = _macro(table, metric)
    low = [lang for lang in eval_set.meta.get("low_resource", []) if lang in result.mono]
    if low:  # MIRACL: the low-resource languages' average beside all languages'
        for metric in cfg.metrics:
            result.summary[f"mono_low_resource_{metric}"] = _macro({k: result.mono[k] for k in low}, metric)
    if any("bias" in row for row in result.multi.values()):
        result.summary["bias"] = _macro(result.multi, "bias")
    if "map" in cfg.metrics:
        maps = [result.summary[f"{s}_map"] for s in SETTINGS if f"{s}_map" in result.summary]
        result.summary["mean_map"] = float(np.mean(maps))
    result.counts = {
        "langs": langs,
        "queries": {lang: len(eval_set.queries[lang]) for lang in langs},
        "candidates": {lang: len(eval_set.candidates[lang]) for lang in langs},
        "skipped_cross_queries": {k: v for k, v in skipped.items() if v},
    }
    result.timings["search_metrics_s"] = time.perf_counter() - t0
    return result


def subset_eval_set(eval_set: EvalSet | BitextSet, cfg: EvalConfig) -> EvalSet | BitextSet:
    """Apply ``cfg.langs``, ``cfg.max_paragraphs`` and ``cfg.subset_seed`` (via ``EvalSet.subset``) to an
    eval set loaded elsewhere (a BitextSet: ``cfg.langs`` and ``cfg.max_pairs``). A no-op on the set
    :func:`load_eval_data` returns for the same ``cfg``."""
    if isinstance(eval_set, BitextSet):
        return subset_bitext(eval_set, cfg)
    if cfg.langs:
        eval_set = eval_set.select_langs(cfg.langs)
    if cfg.max_paragraphs is not None:
        # a set load_eval_data already subset has had its skip: skipping again would empty it
        skip = 0 if "subset" in eval_set.meta else cfg.skip_paragraphs
        eval_set = eval_set.subset(cfg.max_paragraphs, seed=cfg.subset_seed, skip=skip)
    return eval_set


def evaluate(
    model: ModelSpec | TextEncoder, eval_set: EvalSet | BitextSet, cfg: EvalConfig
) -> EvalResult | BitextResult:
    """Encode + search + metrics. ``model``: a spec / model dir / ModelConfig (encoded on Ray Data by a pool of
    ``cfg.concurrency`` actors, or in this process: ``cfg.encode_on``) or an in-memory encoder (encoded in
    this process, as the trainer does).
    ``eval_set`` is usually ``load_eval_data(cfg)``; it is subset by ``cfg`` (:func:`subset_eval_set`).
    A BitextSet gives a :class:`BitextResult` (:func:`hbt_ray.evaluate.bitext.evaluate_bitext`); both
    results have the flat ``summary`` the trainer and the tuner read."""
    if isinstance(eval_set, BitextSet):
        return evaluate_bitext(model, eval_set, cfg)
    t0 = time.perf_counter()
    eval_set = subset_eval_set(eval_set, cfg)
    if is_model_spec(model):
        embeddings = encode_eval_set_model(model, eval_set, cfg)
    else:
        embeddings = encode_eval_set(
            model, eval_set, cfg.batch_size, cfg.float16, cfg.cache_dir, show_progress=cfg.show_progress
        )
    encode_s = time.perf_counter() - t0
    result = evaluate_embeddings(eval_set, embeddings, cfg)
    result.timings = {"encode_s": encode_s, **result.timings, "total_s": time.perf_counter() - t0}
    result.config["model"] = model_config(model).name if is_model_spec(model) else type(model).__name__
    return result
