"""What a sweep is asked for is what its trials run, and what its table says is what they ran.

One rule (``hbt_ray.tune.checks.PRECEDENCE``): defaults < config file < the space's ``fixed:`` < the
command line; a command-line key the space searches is refused. A resumed sweep keeps its settings."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
from tiny_sweep import TINY_SWEEP as TINY

from hbt_ray.config import load_config
from hbt_ray.tune import TuneConfig
from hbt_ray.tune.__main__ import main as tune_main
from hbt_ray.tune.checks import check_sweep


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text("search: grid\nparams:\n  sampler.alpha: {type: grid, values: [0.5]}\n"
                    "fixed:\n  sampler.strategy: hybrid\n  loss.temperature: 0.05\n")  # fmt: skip
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_the_command_line_beats_the_spaces_fixed_keys(tmp_path, capsys):
    cfg = load_config(TuneConfig, None, [f"space={_space(tmp_path)}", "train.loss.temperature=0.02", *TINY])
    space, base = check_sweep(cfg, command_line=["train.loss.temperature"])
    assert base.loss.temperature == 0.02 and base.sampler.strategy == "hybrid"
    assert "loss.temperature" not in space.fixed and space.fixed["sampler.strategy"] == "hybrid"
    assert "train.loss.temperature: the command line's value replaces" in capsys.readouterr().err
    # without it on the command line, the space's fixed value is the one every trial trains with
    space, base = check_sweep(load_config(TuneConfig, None, [f"space={_space(tmp_path)}", *TINY]))
    assert base.loss.temperature == 0.05


def test_a_searched_key_on_the_command_line_is_refused_naming_both(tmp_path, capsys):
    out = tmp_path / "sweeps"
    assert tune_main([f"space={_space(tmp_path)}", f"out_dir={out}", "train.sampler.alpha=0.9", *TINY]) == 2
    line = _error_line(capsys)
    assert "train.sampler.alpha: set on the command line" in line and "params.sampler.alpha" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.run.storage_path=/elsewhere", "train.run.storage_path: a sweep keeps each trial's run"),
        ("train.run.name=mine", "train.run.name: a sweep keeps each trial's run"),
        ("train.run.export=false", "train.run.export: every trial exports its model"),
        ("num_samples=0", "num_samples: must be >= 1"),
        ("num_samples=-1", "num_samples: must be >= 1"),
    ],
)
def test_settings_a_sweep_would_ignore_are_refused(tmp_path, capsys, override, needle):
    out = tmp_path / "sweeps"
    assert tune_main(["--space", "quick", f"out_dir={out}", override, *TINY]) == 2
    assert needle in _error_line(capsys)
    assert not out.exists()


@pytest.mark.slow
def test_the_table_reports_what_trained_and_a_resume_keeps_its_settings(tmp_path, ray_local, capsys, shared_data):
    out = tmp_path / "sweeps"
    common = [f"out_dir={out}", "name=s", "wandb.mode=disabled", "train.run.num_workers=1",
              "train.run.cpus_per_worker=0.5", "train.run.max_steps=2", "train.run.checkpoint_every=0",
              "train.run.progress=false", "train.eval.langs=[en,de]", "train.eval.max_paragraphs=2",
              "train.eval.show_progress=false", "interpolate=[]", "keep_checkpoints=true", *TINY]  # fmt: skip
    # the space fixes hybrid and τ 0.05; the command line asks for x-y: x-y trains, τ 0.05 is reported
    assert tune_main([f"space={_space(tmp_path)}", *common, "train.sampler.strategy=x-y"]) == 0, \
        capsys.readouterr().err[-3000:]
    sweep = out / "s"
    trained = [json.loads(x) for x in next(sweep.glob("trials/*/steps.jsonl")).read_text().splitlines()]
    assert {s["strategy"] for s in trained} == {"x-y"} and all(s["temperature"] == pytest.approx(0.05, rel=1e-6) for s in trained)
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [float(r["loss.temperature"]) for r in rows] == [0.05]
    recorded = json.loads((sweep / "sweep_config.json").read_text())
    assert recorded["train"]["sampler"]["strategy"] == "x-y" and recorded["train"]["loss"]["temperature"] == 0.05
    capsys.readouterr()

    # resumed with another τ: refused naming the key, nothing rewritten
    before = {p: p.read_bytes() for p in sweep.iterdir() if p.is_file()}
    assert tune_main(["--resume", f"space={_space(tmp_path)}", *common, "train.sampler.strategy=x-y",
                      "train.loss.temperature=0.02"]) == 2  # fmt: skip
    line = _error_line(capsys)
    assert line.startswith("error: train.loss.temperature: the sweep in ") and "0.05" in line and "0.02" in line
    assert {p: p.read_bytes() for p in sweep.iterdir() if p.is_file()} == before

    # Interrupted while the trial ran, and a pickle planted in every pickle Ray keeps in the sweep folder
    # (tuner.pkl, the searcher's state): the resume reads only the JSON trial records, the trial continues
    # its own run from that run's checkpoint, and the planted code never runs.
    marker = tmp_path / "pwned"
    planted = pickle.dumps(_Planted(str(marker)))
    pickles = [p for p in (sweep / "tune").rglob("*.pkl")]
    assert any(p.name == "tuner.pkl" for p in pickles), pickles
    for path in pickles:
        path.write_bytes(planted)
    (record_file,) = (sweep / "trial_records").glob("*.json")
    old = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**old, "status": "RUNNING", "metrics": {}}))
    run_steps = (sweep / "trials" / old["trial"] / "steps.jsonl").read_text()
    assert tune_main(["--resume", f"space={_space(tmp_path)}", *common, "train.sampler.strategy=x-y"]) == 0, \
        capsys.readouterr().err[-3000:]
    assert not marker.exists()
    records = {p.stem: json.loads(p.read_text()) for p in (sweep / "trial_records").glob("*.json")}
    (new,) = [r for r in records.values() if r["trial"] != old["trial"]]
    assert new["resumes"] == old["trial"] and new["status"] == "TERMINATED" and new["params"] == old["params"]
    # the run continued, at its last step: no step trained twice, the same model exported again
    assert (sweep / "trials" / old["trial"] / "steps.jsonl").read_text() == run_steps
    assert new["metrics"]["export_dir"].startswith(str(sweep / "trials" / old["trial"]))
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(r["trial"], r["status"]) for r in rows] == [(new["trial"], "TERMINATED")]
    assert float(rows[0]["multi_map"]) == pytest.approx(old["metrics"]["eval/multi_map"])

    # a finished sweep resumed runs no trial; a damaged record is one line naming its file, before Ray
    capsys.readouterr()
    assert tune_main(["--resume", f"space={_space(tmp_path)}", *common, "train.sampler.strategy=x-y"]) == 0
    assert "[hbt_ray.tune] resuming" not in capsys.readouterr().out and len(list((sweep / "trial_records").iterdir())) == 2
    record_file.write_text("{not json")
    assert tune_main(["--resume", f"space={_space(tmp_path)}", *common, "train.sampler.strategy=x-y"]) == 2
    assert _error_line(capsys).startswith(f"error: {record_file}: not a trial record")


class _Planted:
    """Unpickling it makes a folder: proof that code from the sweep folder ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))
