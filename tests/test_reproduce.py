"""scripts/reproduce.py: the α sweep end to end on the tiny preset, and its statistics / verdict logic."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up
_spec.loader.exec_module(reproduce)  # type: ignore[union-attr]

TINY_YAML = """
alphas: [0.0, 1.0]
seeds: 2
seen_langs: [de, en, es]
heldout_langs: [vi, zh]
train:
  model: {name: tiny}
  sampler: {batch_size: 16, buffer_groups: 64}
  data: {train: [ddtp], limit_groups: 400, rows_per_shard: 500}
  optim: {lr: 1.0e-3, warmup_steps: 0, schedule: constant}
  deepspeed: {zero_stage: 2, precision: fp32}
  run: {num_workers: 2, cpus_per_worker: 0.5, max_steps: 6, checkpoint_every: 0, keep_checkpoints: 1,
        progress: false}
  eval: {data: xquad-r, max_paragraphs: 3, subset_seed: 0, show_progress: false, batch_size: 64}
"""


def _record(alpha: float, seed: int, seen: float, heldout: float) -> dict:
    summary = {"mono_map": seen, "cross_map": seen, "multi_map": seen, "mean_map": seen, "bias": 1 - seen}
    held = {"mono_map": heldout, "cross_map": heldout, "multi_map": heldout, "mean_map": heldout, "bias": 0.1}
    return {"alpha": alpha, "seed": seed, "train_s": 1.0, "eval_s": 1.0, "seen": summary, "heldout": held}


def test_mean_ci95_is_the_t_interval() -> None:
    values = [0.31, 0.35, 0.29]
    m, h = reproduce.mean_ci95(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / 2)
    assert m == pytest.approx(sum(values) / 3)
    assert h == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert math.isnan(reproduce.mean_ci95([0.5])[1])


def test_verdict_hybrid_beats_both_only_when_computed_so(tmp_path: Path) -> None:
    # seen: α=0.5 best and its interval apart from both baselines; held-out: α=1 best → hybrid loses
    records = []
    for s, jitter in enumerate((0.0, 0.002, -0.002)):
        records += [
            _record(0.0, s, 0.30 + jitter, 0.20 + jitter),
            _record(0.5, s, 0.40 + jitter, 0.25 + jitter),
            _record(1.0, s, 0.32 + jitter, 0.30 + jitter),
        ]
    table = reproduce.aggregate(records)
    assert table["seen"]["multi_map"]["0.5"]["n"] == 3
    v = reproduce.verdict(table, "seen", "multi_map")
    assert v["beats"] and v["significant"] and v["best_hybrid_alpha"] == 0.5
    assert v["alpha0"] == pytest.approx(0.30) and v["alpha1"] == pytest.approx(0.32)
    v = reproduce.verdict(table, "heldout", "multi_map")
    assert v["beats"] is False and v["significant"] is False
    # bias: lower is better — seen bias of α=0.5 (0.60) is the lowest
    assert reproduce.verdict(table, "seen", "bias")["beats"] is True
    # overlapping intervals: beats on the mean, not significant
    noisy = [
        _record(a, s, base + (0.05 if s else -0.05), 0.2)
        for s in range(2)
        for a, base in ((0, 0.3), (0.5, 0.31), (1, 0.3))
    ]
    v = reproduce.verdict(reproduce.aggregate(noisy), "seen", "multi_map")
    assert v["beats"] is True and v["significant"] is False
    # no hybrid α in the sweep: no verdict
    only_baselines = [r for r in records if r["alpha"] != 0.5]
    assert reproduce.verdict(reproduce.aggregate(only_baselines), "seen", "multi_map")["beats"] is None

    cfg = reproduce.ReproduceConfig()
    reproduce.write_report(cfg, records, tmp_path, "python scripts/reproduce.py --config x")
    text = (tmp_path / "report.md").read_text()
    assert "| seen | multi_map | 0.5 | 0.4000 | 0.3000 | 0.3200 | yes | yes |" in text
    assert "| heldout | multi_map | 0.5 | 0.2500 | 0.2000 | 0.3000 | no | no |" in text
    assert "**Verdict:** a hybrid α beats both baselines on 3 of 6" in text and "not reproduced" in text
    assert all((tmp_path / f"{m}.png").stat().st_size > 1000 for m in reproduce.METRICS)


@pytest.mark.slow
def test_reproduce_end_to_end_tiny_and_resume(ray_local, tmp_path: Path, shared_data: Path, capsys) -> None:
    cfg_path = tmp_path / "reproduce_tiny.yaml"
    cfg_path.write_text(TINY_YAML)
    out = tmp_path / "out"
    args = ["--config", str(cfg_path), "--out", str(out)]
    assert reproduce.main(args) == 0
    results = sorted(p.name for p in (out / "results").glob("*.json"))
    assert results == ["alpha0_seed0.json", "alpha0_seed1.json", "alpha1_seed0.json", "alpha1_seed1.json"]
    records = [json.loads((out / "results" / name).read_text()) for name in results]
    for r in records:
        assert r["steps"] == 6
        for split in ("seen", "heldout"):
            assert 0.0 < r[split]["multi_map"] <= 1.0 and 0.0 < r[split]["mono_map"] <= 1.0
    # the runs trained on seen languages only (DDTP shards written once, shared by all runs)
    (manifest_path,) = (out / "shards").glob("*/manifest.json")  # one fingerprint: the same data for every run
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["pairs_per_lang"]) <= {"de", "en", "es"}
    # the two seeds differ (different sampler streams / init)
    a0 = [r for r in records if r["alpha"] == 0.0]
    assert a0[0]["seen"]["multi_map"] != a0[1]["seen"]["multi_map"]

    summary = json.loads((out / "summary.json").read_text())
    cell = summary["table"]["heldout"]["cross_map"]["0"]
    m, h = reproduce.mean_ci95([r["heldout"]["cross_map"] for r in a0])
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(m) and cell["ci95"] == pytest.approx(h)
    report = (out / "report.md").read_text()
    heldout_section = report.split("## Held-out languages")[1].split("## Does hybrid")[0]
    row0 = summary["table"]["heldout"]
    expected = "| 0 | " + " | ".join(
        f"{row0[k]['0']['mean']:.4f} ± {row0[k]['0']['ci95']:.4f}" for k in reproduce.METRICS
    )
    assert expected + " |" in heldout_section
    assert "## Held-out languages" in report and "not computable" in report  # no hybrid α in this sweep
    assert all((out / f"{m}.png").exists() for m in reproduce.METRICS)

    # resumable: a second call trains nothing and rebuilds the same table
    capsys.readouterr()
    assert reproduce.main(args) == 0
    assert "0 runs to do, 4 already done" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["table"] == summary["table"]


@pytest.mark.parametrize("name", ["reproduce_cpu", "reproduce_gpu"])
def test_each_split_is_evaluated_with_train_eval_on_its_own_languages(name: str) -> None:
    from hbt_ray.config import load_config

    cfg = load_config(reproduce.ReproduceConfig, REPO / "hbt_ray" / "configs" / f"{name}.yaml")
    splits = reproduce.split_eval_configs(cfg)
    assert splits["seen"].langs == cfg.seen_langs and splits["heldout"].langs == cfg.heldout_langs
    for split in splits.values():  # the same seeded paragraph sample for every run
        assert (split.data, split.subset_seed) == ("xquad-r", 0)
        assert split.max_paragraphs == cfg.train.eval.max_paragraphs
    assert cfg.train.eval.langs is None  # the training run's own section is left as configured
