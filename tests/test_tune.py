"""End to end: a sweep on the tiny preset (train → evaluate → table + plots + offline W&B runs), with one
injected failing trial that must not stop the sweep, and a W&B key that must not leak anywhere."""

import json
import os
from pathlib import Path

import pytest

from hbt_ray.config import load_config
from hbt_ray.tune import main as tune_main
from hbt_ray.tuner import TuneConfig, run_sweep, trial_index

FAKE_KEY = "hbtfake0123456789abcdef0123456789abcdef01"


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        "search: grid\n"
        "params:\n"
        "  sampler.alpha: {type: grid, values: [0.0, 0.5, 1.0, 0.25]}\n"
        "fixed:\n"
        "  sampler.strategy: hybrid\n"
        "  loss.temperature: 0.05\n"
    )
    return path


def _overrides(tmp_path: Path) -> list[str]:
    return [
        f"space={_space(tmp_path)}",
        f"out_dir={tmp_path / 'sweeps'}",
        "name=ci",
        "eval_langs=[en,de,es]",
        "eval_max_paragraphs=4",
        "eval.show_progress=false",
        "eval.batch_size=64",
        "inject_failure_trial=3",  # the 4th trial (α=0.25) raises; the other three must finish
        "wandb.mode=offline",
        "train.model.name=tiny",
        "train.model.query_max_len=24",
        "train.model.passage_max_len=64",
        "train.data.train=[ddtp]",
        "train.data.limit_groups=600",
        "train.data.rows_per_shard=200",
        f"train.data.shard_dir={tmp_path / 'shards'}",
        "train.sampler.batch_size=16",
        "train.sampler.buffer_groups=128",
        "train.optim.lr=1e-3",
        "train.run.num_workers=1",
        "train.run.cpus_per_worker=0.5",
        "train.run.max_steps=6",
        "train.run.checkpoint_every=0",
        "train.run.log_every=2",
        "train.run.progress=false",
    ]


def test_trial_index_from_trial_name():
    assert trial_index("run_trial_1a2b3_00002") == 2
    assert trial_index("run_trial_1a2b3_00000_0_sampler.alpha=0.5") == 0
    assert trial_index("run_trial_86183_00003") == 3  # an all-digit sweep id (CI failed on this one)
    assert trial_index("run_trial_86183_00003_3_sampler_alpha=0.2500_2026-11-22_12-46-36") == 3
    assert trial_index("nothing") == -1


def test_bad_objective_names_key():
    with pytest.raises(ValueError, match="objective"):
        load_config(TuneConfig, None, ["objective=accuracy"])


def test_sweep_end_to_end_tiny(tmp_path, ray_local, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    cfg = load_config(TuneConfig, None, _overrides(tmp_path))
    summary = run_sweep(cfg)
    out = summary.out_dir
    rows = {r["sampler.alpha"]: r for r in summary.rows}
    assert set(rows) == {0.0, 0.25, 0.5, 1.0}
    assert rows[0.25]["status"] == "ERROR" and "injected failure" in rows[0.25]["error"]
    for alpha in (0.0, 0.5, 1.0):
        row = rows[alpha]
        assert row["status"] == "TERMINATED", row
        for key in ("mono_map", "cross_map", "multi_map", "bias", "pairs_per_s"):
            assert isinstance(row[key], float), (alpha, key, row)
        assert 0.0 < row["multi_map"] <= 1.0 and row["train_steps"] == 6
    assert summary.best is not None and summary.best["status"] == "TERMINATED"
    assert summary.untuned is not None and "multi_map" in summary.untuned
    assert (summary.best_model_dir / "modules.json").exists()

    # table + plots
    md = (out / "results.md").read_text()
    assert md.count("\n") == 2 + 4 and "ERROR" in md
    assert (out / "results.csv").exists()
    for name in ("multi_map_vs_alpha.png", "bias_vs_alpha.png", "multi_map_alpha_tau_heatmap.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "summary.json").read_text())
    assert report["errored"] == 1 and report["trials"] == 4

    # offline W&B: one run per trial (incl. the failed one) + the summary run, grouped by sweep
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 5, runs
    assert all(any(r.rglob("*.wandb")) for r in runs)

    # the key never appears in any artifact or log line
    captured = capfd.readouterr()
    assert FAKE_KEY not in captured.out + captured.err
    # Ray without a dashboard has no State API: init_ray's worker hook keeps Ray Train's
    # PlacementGroupCleaner from warning about it every few seconds (this fails without the hook)
    assert "Failed to query Ray Train Controller" not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_bad_space_file_is_a_clear_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: grid\nparams: {sampler.alpha: {type: uniform, low: 0, high: 1}}\n")
    from hbt_ray.tune_space import SpaceError

    with pytest.raises(SpaceError, match=str(bad)):
        tune_main(["--space", str(bad), f"out_dir={tmp_path}", "evaluate_untuned=false"])
    assert os.environ.get("WANDB_API_KEY") != FAKE_KEY


def test_trials_that_starve_ray_data_fail_fast():
    from hbt_ray.tuner import check_trial_fits

    cfg = load_config(TuneConfig, None, ["train.run.num_workers=1", "train.run.cpus_per_worker=1"])
    with pytest.raises(ValueError, match=r"train.run.cpus_per_worker=1\).* has 2"):
        check_trial_fits(cfg, cfg.train, {"CPU": 2.0})
    ok = load_config(TuneConfig, None, ["train.run.num_workers=1", "train.run.cpus_per_worker=0.5"])
    check_trial_fits(ok, ok.train, {"CPU": 2.0})
    check_trial_fits(cfg, cfg.train, {"CPU": 2.0, "GPU": 1.0})


def test_asha_rungs_count_training_steps():
    """Reports are time-throttled, so ASHA's clock is the training step: the first rung is after two
    evaluations, the last at max_steps; without intermediate evaluations ASHA is refused."""
    from hbt_ray.tune_space import load_space
    from hbt_ray.tuner import _scheduler, resolve_space_path

    space = load_space(resolve_space_path("ratio_temperature"))
    cfg = load_config(TuneConfig, None, ["train.run.eval_every=10", "train.run.eval=xquad-r", "train.run.max_steps=100"])
    asha = _scheduler(space, cfg)
    assert asha._time_attr == "step" and asha._max_t == 100
    assert min(milestone for milestone, _ in asha._brackets[0]._rungs) == 20
    with pytest.raises(ValueError, match="eval_every"):
        _scheduler(space, load_config(TuneConfig, None, ["train.run.eval_every=0"]))
