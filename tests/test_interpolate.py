"""WiSE-FT interpolation (issue 19): λ·tuned + (1 − λ)·start, exported as a loadable model directory."""

from __future__ import annotations

import pytest
import torch

from hbt_ray.model import ModelConfig, load_dual_encoder
from hbt_ray.model.interpolate import interpolate_model


def test_interpolated_weights_lie_between_start_and_tuned(tmp_path):
    start = ModelConfig(name="tiny", tiny_layers=1)
    tuned = load_dual_encoder(start)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned")
    initial = load_dual_encoder(start).backbone.state_dict()
    for lam in (0.0, 0.25, 1.0):
        out = interpolate_model(start, tmp_path / "tuned", lam, tmp_path / f"lam{lam}")
        mixed = load_dual_encoder(ModelConfig(name=str(out))).backbone.state_dict()
        for key, value in mixed.items():
            if value.is_floating_point() and key in initial:
                assert torch.allclose(value, initial[key] + lam, atol=1e-6), (lam, key)
    # the λ = 0 export encodes as the starting model does
    texts = ["ein kleiner Test", "a small test"]
    same = load_dual_encoder(ModelConfig(name=str(tmp_path / "lam0.0"))).encode(texts, kind="query")
    assert same == pytest.approx(load_dual_encoder(start).encode(texts, kind="query"), abs=1e-5)


def test_a_model_of_another_shape_is_refused(tmp_path):
    load_dual_encoder(ModelConfig(name="tiny", tiny_layers=2)).save_pretrained(tmp_path / "tuned")
    with pytest.raises(ValueError, match="not the same model"):
        interpolate_model(ModelConfig(name="tiny", tiny_layers=1), tmp_path / "tuned", 0.5, tmp_path / "out")
