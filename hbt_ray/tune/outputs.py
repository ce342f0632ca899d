"""Where a sweep's outputs go: its folder in the configured storage (a local path or a URI, see
:mod:`hbt_ray.storage`). The report files are written on the driver's machine first
(:func:`local_report_dir`) and then published beside Tune's state (:func:`hbt_ray.storage.publish_files`); the best model is copied storage
to storage."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.evaluate import EvalConfig, load_eval_data
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
    target = storage.join(out_dir, "best_model")
    if not storage.exists(best["export_dir"]):  # a resumed sweep whose best trial is an earlier one: its
        # model was copied here when that run ended, then deleted from the trial (keep_trial_models)
        if not storage.exists(storage.join(target, "config.json")):
            return None
        best_model_dir = target
    else:
        best_model_dir = storage.copy_dir(best["export_dir"], target)
    return best_model_dir if storage.is_uri(best_model_dir) else Path(best_model_dir)


def describe_pool(eval_cfg: EvalConfig) -> str:
    """How big the evaluation is: ``xquad-r: 7 languages, 1,435 queries, 1,204 candidates (30 whole
    paragraphs per language)`` — differences between trials mean something only on a pool large enough."""
    counts = load_eval_data(eval_cfg).counts()
    if eval_cfg.max_pairs is not None or all(isinstance(c, int) for c in counts.values()):
        after = f" (after the first {eval_cfg.skip_pairs} of each)" if eval_cfg.skip_pairs else ""
        return f"{eval_cfg.data}: {len(counts)} languages, {sum(counts.values()):,} pairs{after}"
    queries, candidates = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    subset = f"{eval_cfg.max_paragraphs} whole paragraphs per language" if eval_cfg.max_paragraphs else "all"
    if eval_cfg.skip_paragraphs:
        subset += f", after the first {eval_cfg.skip_paragraphs}"
    return f"{eval_cfg.data}: {len(counts)} languages, {queries:,} queries, {candidates:,} candidates ({subset})"


def lighten_trial(run_dir: str, chosen: str, cfg: TuneConfig) -> list[str]:
    """What an ended trial no longer needs, deleted at once rather than at the sweep's end (a sweep's
    disk peak is then one model per trial): its training checkpoints unless ``keep_checkpoints``, and
    the models it did not choose (λ = 1 or a WiSE-FT variant) unless ``keep_trial_models``. → what went."""
    gone = []
    for name in storage.listdir(run_dir):
        location = storage.join(run_dir, name)
        checkpoint = name.startswith("checkpoint_") and not cfg.keep_checkpoints
        other_model = (name == "model" or name.startswith("model_wise_")) and not cfg.keep_trial_models
        if (checkpoint or other_model) and location.rstrip("/") != str(chosen).rstrip("/"):
            storage.remove(location)
            gone.append(name)
    return gone

