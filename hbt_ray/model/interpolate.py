"""WiSE-FT (Wortsman et al. 2022): the weights ``λ·θ_tuned + (1 − λ)·θ_start`` of a fine-tuned encoder
and the encoder it started from, exported as a model directory — a recipe knob that costs an
evaluation, not a retraining (λ = 1: the fine-tuned model, 0: the starting one).

    >>> interpolate_model(ModelConfig(name="tiny"), "runs/x/model", 1.5, "out")
    Traceback (most recent call last):
    ...
    ValueError: interpolate: λ=1.5 is not in [0, 1]

``tests/test_interpolate.py`` checks the weights; :mod:`hbt_ray.tune` evaluates a list of λ per trial.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hbt_ray import storage
from hbt_ray.model.config import ModelConfig
from hbt_ray.model.encoder import export_from_state_dict, load_dual_encoder


def interpolate_model(
    start: ModelConfig, tuned_dir: str | os.PathLike, lam: float, out_dir: str | os.PathLike
) -> Path:
    """Export ``λ·tuned + (1 − λ)·start`` (floating-point weights; others, e.g. position ids, from the
    tuned model) to ``out_dir``. ``start`` is the config training began from: ``load_dual_encoder(start)``
    must give the weights it started with (pretrained weights; for ``tiny``, the same seed)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"interpolate: λ={lam} is not in [0, 1]")
    tuned = load_dual_encoder(ModelConfig(name=str(tuned_dir)))
    initial = load_dual_encoder(start).backbone.state_dict()
    mixed = {}
    for key, value in tuned.backbone.state_dict().items():
        base = initial.get(key)
        if base is None or base.shape != value.shape:
            raise ValueError(f"interpolate: {tuned_dir} and {start.name} differ at {key}: not the same model")
        mixed[key] = torch.lerp(base.to(value.dtype), value, lam) if value.is_floating_point() else value
    return export_from_state_dict(tuned.cfg, mixed, out_dir, backbone=tuned.backbone, tokenizer=tuned.tokenizer)


def publish_interpolation(start: ModelConfig, tuned: str, lam: float, run_dir: str | Path) -> str:
    """WiSE-FT's λ model of ``tuned`` written to ``run_dir/model_wise_<λ>`` → that location. ``run_dir``
    and ``tuned`` may be in remote storage: the model is built on this node and published there."""
    staging = Path(tempfile.mkdtemp(prefix="hbt_wise_"))
    try:
        interpolate_model(start, tuned, lam, staging / "model")
        return storage.publish_dir(staging / "model", storage.join(run_dir, f"model_wise_{lam:g}"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def wise_ft_run_model(start: ModelConfig, run_dir: str | Path, lam: float) -> str:
    """A training run's model becomes WiSE-FT's λ model: the tuned weights are kept in
    ``run_dir/model_tuned`` and ``run_dir/model`` is replaced by λ·tuned + (1 − λ)·start; → ``run_dir/model``.
    Run again on a re-exported ``model`` (a resumed run that ended), it gives the same result."""
    model, tuned = storage.join(run_dir, "model"), storage.join(run_dir, "model_tuned")
    storage.copy_dir(model, tuned)
    staging = Path(tempfile.mkdtemp(prefix="hbt_wise_"))
    try:
        interpolate_model(start, tuned, lam, staging / "model")
        return storage.publish_dir(staging / "model", model)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def best_interpolation(
    start: ModelConfig,
    tuned: str,
    tuned_scores: dict[str, Any],
    lams: Sequence[float],
    run_dir: str | Path,
    evaluate: Callable[[str], dict[str, Any]],
) -> tuple[float, str, dict[str, Any]]:
    """Evaluate each λ of ``lams`` (``evaluate(model dir)`` → scores with an ``objective``, higher is
    better) beside λ = 1 (``tuned``, ``tuned_scores``); → the best (λ, model dir, scores). Every λ's
    scores go to ``run_dir/interpolate.json``, the models to ``run_dir/model_wise_<λ>``. ``run_dir`` and
    ``tuned`` may be in remote storage (:mod:`hbt_ray.storage`): each model is written on this node and
    published there, so whichever node evaluates it finds it."""
    tried = [(1.0, tuned, tuned_scores)]
    for lam in sorted(set(lams) - {1.0}):
        out = publish_interpolation(start, tuned, lam, run_dir)
        tried.append((lam, out, evaluate(out)))
    storage.write_text(storage.join(run_dir, "interpolate.json"), json.dumps(
        [{"interpolate": lam, "model": path, **s} for lam, path, s in tried], indent=1, default=str))  # fmt: skip
    scored = [t for t in tried if t[2].get("objective") is not None]
    return max(scored, key=lambda t: t[2]["objective"]) if scored else tried[0]
