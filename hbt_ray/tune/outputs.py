"""Where a sweep's outputs go: its folder in the configured storage (a local path or a URI, see
:mod:`hbt_ray.storage`). The report files are written on the driver's machine first
(:func:`local_report_dir`) and then published beside Tune's state (:func:`hbt_ray.storage.publish_files`); the best model is copied storage
to storage."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.tune.config import TuneConfig


def local_report_dir(out_dir: str) -> Path:
    """Where this machine writes the sweep's report files: the sweep folder itself on a local disk, else
    a folder of this node's cache, uploaded to ``out_dir`` when the report is complete."""
    if not storage.is_uri(out_dir):
        path = Path(out_dir)
    else:
        path = storage.cache_root() / "sweeps" / hashlib.sha256(out_dir.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def copy_best_model(best: dict[str, Any] | None, cfg: TuneConfig, out_dir: str) -> Any:
    """The best trial's model copied to ``<out_dir>/best_model`` (storage to storage); → its location."""
    if best is None or not cfg.export_best or not best.get("export_dir"):
        return None
    best_model_dir = storage.copy_dir(best["export_dir"], storage.join(out_dir, "best_model"))
    return best_model_dir if storage.is_uri(best_model_dir) else Path(best_model_dir)
