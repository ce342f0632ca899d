"""Per-query retrieval metrics from the ranks of the relevant candidates (binary relevance, ranx's
definitions; tests/test_evaluator.py checks them against ranx) and the language bias (rank distance,
Huang et al., SIGIR 2023).

    >>> ranks = relevant_ranks(np.array([[2, 0, 1], [1, 2, 0]]), [np.array([0, 1]), np.array([0])])
    >>> ranks.tolist()
    [[2.0, 3.0], [3.0, nan]]
    >>> {k: v.round(3).tolist() for k, v in metrics_from_ranks(ranks, ["map", "recall@2"]).items()}
    {'map': [0.583, 0.333], 'recall@2': [0.5, 0.0]}
    >>> rank_distance(ranks[:1]).tolist()
    [1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hbt_ray.evaluate.config import parse_metric


def relevant_ranks(ids: np.ndarray, relevant: Sequence[np.ndarray]) -> np.ndarray:
    """1-based rank of each relevant candidate per query, sorted; ``inf`` = not retrieved, ``nan`` = padding.

    ``ids``: (queries, k) ranked candidate indexes (-1 = none); ``relevant``: candidate indexes per query.
    """
    n_q, k = ids.shape
    width = max((len(r) for r in relevant), default=0)
    ranks = np.full((n_q, max(width, 1)), np.nan)
    if n_q == 0:
        return ranks
    n_cand = int(max(ids.max(initial=-1), max((r.max(initial=-1) for r in relevant), default=-1))) + 1
    position = np.full((n_q, n_cand + 1), np.inf)  # column n_cand absorbs the -1 ids
    rows = np.arange(n_q)[:, None]
    position[rows, np.where(ids >= 0, ids, n_cand)] = np.arange(1, k + 1, dtype=np.float64)[None, :]
    position[:, n_cand] = np.inf
    for qi, rel in enumerate(relevant):
        ranks[qi, : len(rel)] = np.sort(position[qi, rel])
    return ranks


def metrics_from_ranks(ranks: np.ndarray, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query metric values from :func:`relevant_ranks` (binary relevance, ranx's definitions)."""
    n_rel = np.sum(~np.isnan(ranks), axis=1)
    r = np.where(np.isnan(ranks), np.inf, ranks)  # padding counts as never retrieved
    out: dict[str, np.ndarray] = {}
    for name in metrics:
        family, cut = parse_metric(name)
        if family == "map":
            i = np.arange(1, r.shape[1] + 1)[None, :]
            out[name] = np.sum(np.where(np.isfinite(r), i / r, 0.0), axis=1) / np.maximum(n_rel, 1)
        elif family == "recall":
            out[name] = np.sum(r <= cut, axis=1) / np.maximum(n_rel, 1)
        elif family == "mrr":
            best = r[:, 0]
            out[name] = np.where(best <= cut, 1.0 / best, 0.0)
        elif family == "ndcg":
            dcg = np.sum(np.where(r <= cut, 1.0 / np.log2(r + 1.0), 0.0), axis=1)
            ideal_gains = 1.0 / np.log2(np.arange(2, cut + 2))
            idcg = np.cumsum(ideal_gains)[np.minimum(n_rel, cut) - 1]
            out[name] = np.where(n_rel > 0, dcg / idcg, 0.0)
    return out


def rank_distance(ranks: np.ndarray) -> np.ndarray:
    """Language bias per query: highest minus lowest rank of its relevant candidates (full ranking)."""
    if np.isinf(ranks).any():
        raise ValueError("rank distance needs the full ranking: some relevant candidates were not retrieved")
    return np.nanmax(ranks, axis=1) - np.nanmin(ranks, axis=1)
