"""FAISS search over named candidate pools: in this process (:class:`LocalSearcher`) or across Ray actors
(:class:`RaySearcher`, pools sharded or queries split). Ids are rows of the pool; scores inner products.

    >>> s = make_searcher(EvalConfig(show_progress=False))
    >>> s.add_pool("en", np.eye(3, dtype=np.float32))
    >>> scores, ids = s.search("en", np.array([[0.1, 0.9, 0.5]], dtype=np.float32), k=2)
    >>> ids.tolist()
    [[1, 2]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hbt_ray.config import ConfigError
from hbt_ray.evaluate.config import EvalConfig, IndexConfig


def build_index(embeddings: np.ndarray, cfg: IndexConfig) -> Any:
    """A FAISS inner-product index over ``embeddings`` (rows = ids 0..n-1)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    if cfg.kind == "flat" or n < 2:
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "ivf":
        nlist = max(1, min(cfg.nlist, n // 39))  # FAISS wants >= 39 training points per cluster
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(cfg.nprobe, nlist)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        raise ConfigError(f"index.kind: unknown index {cfg.kind!r}")
    index.add(x)
    return index


def search_index(index: Any, queries: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query; ids are -1 where the index returned fewer than ``k``."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(index.hnsw.efSearch, k)  # HNSW returns at most efSearch hits
    scores = np.empty((len(q), k), dtype=np.float32)
    ids = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), chunk):
        scores[start : start + chunk], ids[start : start + chunk] = index.search(q[start : start + chunk], k)
    return scores, ids


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k (scores, global ids) into the global top-k; ties → lower id first.

    >>> a = (np.array([[0.9, 0.5]]), np.array([[0, 1]]))
    >>> b = (np.array([[0.5, 0.7]]), np.array([[2, 3]]))
    >>> merge_topk([b, a], k=3)[1].tolist()
    [[0, 3, 1]]
    """
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = _order_by_score_then_id(scores, ids)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _order_by_score_then_id(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    by_id = np.argsort(ids, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(scores, by_id, 1), axis=1, kind="stable")
    return np.take_along_axis(by_id, by_score, 1)


class LocalSearcher:
    """FAISS in this process: one index per named candidate pool."""

    def __init__(self, index_cfg: IndexConfig):
        self.index_cfg = index_cfg
        self.indexes: dict[str, Any] = {}

    def add_pool(self, name: str, embeddings: np.ndarray) -> None:
        self.indexes[name] = build_index(embeddings, self.index_cfg)

    def search(self, name: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_index(self.indexes[name], queries, k)

    def close(self) -> None:
        self.indexes.clear()


class SearchShard:
    """A Ray actor holding a slice (or all) of each candidate pool as FAISS indexes; ids are global."""

    def __init__(self, index_cfg: IndexConfig):
        self.local = LocalSearcher(index_cfg)
        self.offsets: dict[str, int] = {}

    def add_pool(self, name: str, embeddings: np.ndarray, offset: int) -> int:
        if len(embeddings):
            self.local.add_pool(name, embeddings)
            self.offsets[name] = offset
        return len(embeddings)

    def search(self, name: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.offsets:  # this shard got no candidates of the pool
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.local.search(name, queries, k)
        return scores, np.where(ids >= 0, ids + self.offsets[name], -1)


class RaySearcher:
    """FAISS across ``num_shards`` Ray actors (Ray must be running).

    ``shard_candidates``: every pool is cut into contiguous slices, one per actor; the queries are put
    in the object store once and broadcast; the per-shard top-k are merged (== one index, for flat).
    ``split_queries``: every actor holds whole pools; the queries are split across actors.
    """

    def __init__(self, index_cfg: IndexConfig, num_shards: int, mode: str, num_cpus: float = 1.0):
        import ray

        actor_cls = ray.remote(num_cpus=num_cpus)(SearchShard)
        self.ray = ray
        self.mode = mode
        self.shards = [actor_cls.remote(index_cfg) for _ in range(num_shards)]

    def add_pool(self, name: str, embeddings: np.ndarray) -> None:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if self.mode == "split_queries":
            ref = self.ray.put(x)
            self.ray.get([s.add_pool.remote(name, ref, 0) for s in self.shards])
            return
        bounds = np.linspace(0, len(x), len(self.shards) + 1).astype(int)
        self.ray.get(
            [s.add_pool.remote(name, x[a:b], int(a)) for s, a, b in zip(self.shards, bounds[:-1], bounds[1:])]
        )

    def search(self, name: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.mode == "split_queries":
            bounds = np.linspace(0, len(q), len(self.shards) + 1).astype(int)
            parts = self.ray.get(
                [s.search.remote(name, q[a:b], k) for s, a, b in zip(self.shards, bounds[:-1], bounds[1:])]
            )
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        ref = self.ray.put(q)
        parts = self.ray.get([s.search.remote(name, ref, k) for s in self.shards])
        return merge_topk(parts, k)

    def close(self) -> None:
        for shard in self.shards:
            self.ray.kill(shard)
        self.shards = []


def make_searcher(cfg: EvalConfig) -> LocalSearcher | RaySearcher:
    """The searcher ``cfg.num_shards`` asks for: in process for 1, else Ray actors."""
    if cfg.num_shards == 1:
        return LocalSearcher(cfg.index)
    return RaySearcher(cfg.index, cfg.num_shards, cfg.search_mode, cfg.shard_num_cpus)
