"""End to end: a sweep on the tiny preset (train → evaluate → table + plots + offline W&B runs), with one
injected failing trial that must not stop the sweep, and a W&B key that must not leak anywhere."""

import json
import os
from pathlib import Path

import pytest

from hbt_ray.config import ConfigError, load_config
from hbt_ray.tune import (
    TuneConfig,
    check_trial_fits,
    load_space,
    make_scheduler,
    resolve_space_path,
    run_sweep,
    trial_index,
    trial_train_config,
)
from hbt_ray.tune.__main__ import main as tune_main
from hbt_ray.tune.checks import check_sweep, check_unchanged, resolve_base_paths, sweep_record
from hbt_ray.tune.progress import report_so_far

ROOT = Path(__file__).resolve().parents[1]

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
        "train.eval.langs=[en,de,es]",
        "train.eval.max_paragraphs=4",
        "train.eval.show_progress=false",
        "train.eval.batch_size=64",
        "inject_failure_trial=3",  # the 4th trial (α=0.25) raises; the other three must finish
        "interpolate=[0.5]",  # WiSE-FT: each trial also evaluates the halfway weights
        "train.run.wise_ft=0.25",  # and the recipe's own λ, from weights trained without it
        # a second eval set at the end of each trial (and for the untuned model): Tatoeba
        "extra_evals.tato.data=tatoeba", "extra_evals.tato.langs=[deu,kzj]", "extra_evals.tato.max_pairs=20",
        "extra_evals.tato.show_progress=false",
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
    with pytest.raises(ConfigError, match="^objective: 'accuracy' is not one of"):
        load_config(TuneConfig, None, ["objective=accuracy"])
    with pytest.raises(ConfigError, match=r"^objective: 'tato/tatoeba_acc': no extra_evals\.tato \(have \[\]\)"):
        load_config(TuneConfig, None, ["objective=tato/tatoeba_acc"])
    cfg = load_config(TuneConfig, None, ["objective=tato/tatoeba_outside_xlmr_acc", "extra_evals.tato.data=tatoeba"])
    assert cfg.modes == ["max"] and cfg.extra_evals["tato"].data == "tatoeba"
    with pytest.raises(ConfigError, match=r"^interpolate\[0\]: 1\.5 is not in \[0, 1\]"):
        load_config(TuneConfig, None, ["interpolate=[1.5]"])


def test_a_bad_training_key_names_its_full_path():
    with pytest.raises(ConfigError, match=r"^train\.sampler\.alpha: "):
        load_config(TuneConfig, None, ["train.sampler.alpha=2"])
    # a trial's parameters (or a space's fixed keys) are named as the user's config has them
    cfg = load_config(TuneConfig)
    with pytest.raises(ConfigError, match=r"^train\.sampler\.alpha: "):
        trial_train_config(cfg, {"sampler.alpha": 2.0})
    with pytest.raises(ConfigError, match=r"^unknown config key train\.sampler\.alpah "):
        trial_train_config(cfg, {"sampler.alpah": 0.5})


def test_the_embedded_default_loads_with_its_eval_section_under_train():
    from hbt_ray.tune.__main__ import DEFAULT_CONFIG

    cfg = load_config(TuneConfig, DEFAULT_CONFIG)
    assert (cfg.train.eval.data, cfg.train.eval.max_paragraphs, cfg.train.eval.actor_threads) == ("xquad-r", 30, 2)
    assert load_space(resolve_space_path(cfg.space)).params["sampler.alpha"].values == [0.0, 0.5, 1.0]


@pytest.mark.slow
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
    # "best" is the argmax of the objective over the finished trials
    finished = [r for r in summary.rows if r["status"] == "TERMINATED"]
    assert summary.best["objective"] == max(r["objective"] for r in finished)
    # α reaches the sampler of every trial: α = 0 trains on cross-lingual steps only, α = 1 on mono ones
    for alpha, allowed in ((0.0, {"x-y"}), (1.0, {"x-x-mono"}), (0.5, {"x-y", "x-x-mono"})):
        run_dir = Path(rows[alpha]["export_dir"]).parent
        strategies = {json.loads(line)["strategy"] for line in (run_dir / "steps.jsonl").read_text().splitlines()}
        assert strategies <= allowed and strategies, (alpha, strategies)
        # WiSE-FT: λ = 1, the recipe's 0.25 and interpolate's 0.5 evaluated; the row reports the best one
        tried = json.loads((run_dir / "interpolate.json").read_text())
        assert [t["interpolate"] for t in tried] == [1.0, 0.25, 0.5]
        assert Path(tried[0]["model"]).name == "model"  # λ = 1: the weights as trained, not interpolated
        assert rows[alpha]["interpolate"] == max(tried, key=lambda t: t["objective"])["interpolate"]
        assert rows[alpha]["fallback_share"] == 0.0
        assert 0.0 <= rows[alpha]["tato/tatoeba_outside_xlmr_acc"] <= 1.0
        # λ < 1 is ranked on train.eval alone; the extra evals score λ = 1 and the λ the row reports
        assert "tato/tatoeba_acc" in tried[0] and "tato/tatoeba_acc" not in tried[1]
    assert "tato/tatoeba_acc" in summary.untuned
    assert summary.untuned is not None and "multi_map" in summary.untuned
    assert (summary.best_model_dir / "modules.json").exists()
    # a sweep that fits on a disk: only the best model survives (best_model/); each trial keeps its small
    # files in the sweep's own folder (not in Ray's temporary session folder), no checkpoint, no model
    for alpha in (0.0, 0.5, 1.0):
        run_dir = Path(rows[alpha]["export_dir"]).parent
        assert run_dir.is_relative_to(out / "trials"), run_dir
        kept = sorted(p.name for p in run_dir.iterdir())
        assert {"steps.jsonl", "mix.json", "interpolate.json"} <= set(kept), kept
        assert not [k for k in kept if k.startswith(("checkpoint_", "model"))], kept
    assert json.loads((out / "summary.json").read_text())["kept_per_trial"] == ["metrics", "steps.jsonl", "mix.json"]

    # table + plots
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + 4 and "ERROR" in md
    assert table[2].startswith("| untuned (reference) | reference |")  # the untuned model first
    assert "- commit: `" in md and "- model: tiny" in md and "tato/tatoeba_outside_xlmr_acc" in table[0]
    assert (out / "results.csv").exists()
    for name in ("multi_map_vs_alpha.png", "bias_vs_alpha.png", "multi_map_alpha_tau_heatmap.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "summary.json").read_text())
    assert report["errored"] == 1 and report["trials"] == 4
    assert 0 < report["wall_s"] < 3600 and "- wall: " in md  # what the sweep cost, in the file it made
    assert report["provenance"]["command"] and report["model"].startswith("tiny")

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
    # nor in Ray's logs: Ray's own WandbLoggerCallback hands the key to its logging actors in their
    # runtime_env, and Ray's runtime-env agent writes runtime envs to its log (this fails with it)
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path

    # --report-only: the same table rebuilt from the trial records (what a sweep still running shows),
    # saying how many trials ended; the best model and the trials' files stay
    # (read with the settings the sweep recorded — here as an older hbt_ray wrote them, a setting scrubbed
    # as if it were a secret — so only its name is given, and resuming it is not refused for that value)
    record_file = out / "sweep_config.json"
    record = json.loads(record_file.read_text())
    record["train"]["run"]["balance_tokens"] = "<redacted>"
    record_file.write_text(json.dumps(record))
    check_unchanged(sweep_record(cfg, resolve_base_paths(check_sweep(cfg)[1], str(tmp_path / "sweeps")),
                                 check_sweep(cfg)[0]), str(out))  # fmt: skip
    (out / "results.md").unlink()
    assert tune_main(["--report-only", f"out_dir={tmp_path / 'sweeps'}", "name=ci"]) == 0
    report_dir, ended = report_so_far(cfg)
    md_so_far = (report_dir / "results.md").read_text()
    assert len(ended) == 4
    assert "# Sweep ci (in progress: 4 of 4 trials ended)" in md_so_far and "- commit: `" in md_so_far
    assert [line for line in md_so_far.splitlines() if line.startswith("|")] == table
    assert (summary.best_model_dir / "modules.json").exists()
    assert tune_main(["--report-only", f"out_dir={tmp_path / 'sweeps'}", "name=nosuch"]) == 2


@pytest.mark.slow
def test_optuna_with_asha_sweeps_on_intermediate_evaluations(tmp_path, ray_local):
    """Optuna + ASHA as the recipe sweep runs them: step results without the metric between the
    evaluations (OptunaSearch indexed them: a KeyError ended the experiment at the first logged step)."""
    space = tmp_path / "optuna.yaml"
    space.write_text(
        "search: optuna\nnum_samples: 3\nscheduler: asha\nparams:\n"
        "  sampler.alpha: {type: uniform, low: 0.0, high: 1.0}\n"
        "  loss.temperature: {type: loguniform, low: 0.01, high: 0.1}\n"
    )
    skip = ("space=", "inject_failure_trial=", "interpolate=", "extra_evals.", "train.run.max_steps=")
    overrides = [o for o in _overrides(tmp_path) if not o.startswith(skip)]
    overrides += [f"space={space}", "objective=mean_map", "train.run.max_steps=8", "train.run.eval_every=2",
                  "train.run.log_every=1", "evaluate_untuned=false"]  # fmt: skip
    summary = run_sweep(load_config(TuneConfig, None, overrides))
    assert len(summary.rows) == 3 and all(r["status"] in ("TERMINATED", "STOPPED") for r in summary.rows), summary.rows
    finished = [r for r in summary.rows if r.get("objective") is not None]
    assert finished and summary.best["objective"] == max(r["objective"] for r in finished)
    assert len({r["sampler.alpha"] for r in summary.rows}) == 3  # Optuna drew the values
    for row in summary.rows:  # a trial ASHA stopped still shows its last evaluation
        assert isinstance(row.get("multi_map"), float), row
    # no trial's training run left its placement group (ASHA's stops took the Train controller down)
    import ray

    states = {g["placement_group_id"]: g["state"] for g in ray.util.placement_group_table().values()}
    assert set(states.values()) <= {"REMOVED"}, states


def test_bad_space_file_is_a_clear_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: grid\nparams: {sampler.alpha: {type: uniform, low: 0, high: 1}}\n")
    assert tune_main(["--space", str(bad), f"out_dir={tmp_path / 'sweeps'}", "evaluate_untuned=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: params.sampler.alpha.type:") and err.count("\n") == 1, err
    assert not (tmp_path / "sweeps").exists()
    assert os.environ.get("WANDB_API_KEY") != FAKE_KEY


def test_trials_that_starve_ray_data_fail_fast():
    cfg = load_config(TuneConfig, None, ["train.run.num_workers=1", "train.run.cpus_per_worker=1"])
    with pytest.raises(ValueError, match=r"train.run.cpus_per_worker=1\).* has 2"):
        check_trial_fits(cfg, cfg.train, {"CPU": 2.0})
    ok = load_config(TuneConfig, None, ["train.run.num_workers=1", "train.run.cpus_per_worker=0.5"])
    check_trial_fits(ok, ok.train, {"CPU": 2.0})
    check_trial_fits(cfg, cfg.train, {"CPU": 2.0, "GPU": 1.0})


def test_asha_rungs_count_training_steps():
    """Reports are time-throttled, so ASHA's clock is the training step: the first rung is after two
    evaluations, the last at max_steps, and max_t is past it (ASHA stops whatever reaches max_t: at
    max_steps, every trial in its final evaluation); without intermediate evaluations ASHA is refused."""
    space = load_space(resolve_space_path("ratio_temperature"))
    cfg = load_config(TuneConfig, None, ["train.run.eval_every=10", "train.run.max_steps=100"])
    asha = make_scheduler(space, cfg)
    assert asha._time_attr == "step" and asha._max_t == 101
    milestones = sorted(milestone for milestone, _ in asha._brackets[0]._rungs)
    assert milestones[0] == 20 and milestones[-1] < 101
    with pytest.raises(ValueError, match="eval_every"):
        make_scheduler(space, load_config(TuneConfig, None, ["train.run.eval_every=0"]))


class _Trial:
    """What Ray's WandbLoggerCallback reads of a Tune trial."""

    def __init__(self, trial_id: str, local_path: Path):
        self.trial_id = trial_id
        self.config = {"sampler.alpha": 0.5}
        self.experiment_dir_name = "exp"
        self.local_path = str(local_path)

    def __str__(self) -> str:
        return f"run_trial_{self.trial_id}"


def _offline_run(out: Path, trial_id: str) -> bytes:
    """The records of a trial's offline run (its config and history are in this one file)."""
    (run,) = (out / "wandb").glob(f"offline-run-*-{trial_id}")
    return (run / f"run-{trial_id}.wandb").read_bytes()


def test_auto_mode_is_online_after_wandb_login_on_the_machine(tmp_path):
    """On a cluster the key is entered with ``wandb login`` on the head (never in a job's runtime env):
    ``wandb.mode=auto`` must then log online, and offline where no login exists."""
    from hbt_ray.tune.config import WandbConfig
    from hbt_ray.tune.wandb import initial_mode

    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert initial_mode(WandbConfig(), env={"NETRC": str(netrc_file)}) == "online"
    assert initial_mode(WandbConfig(), env={"NETRC": str(tmp_path / "none")}) == "offline"
    other = {"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.org"}
    assert initial_mode(WandbConfig(), env=other) == "offline"  # logged in elsewhere only
    assert initial_mode(WandbConfig(mode="offline"), env={"NETRC": str(netrc_file)}) == "offline"


@pytest.mark.slow
def test_trial_runs_without_a_key_log_offline_with_their_status(ray_local, monkeypatch, tmp_path):
    """Ray's own WandbLoggerCallback.setup raises without a key unless $WANDB_MODE says offline; ours
    runs offline, an online init that fails falls back to offline, and a failed trial says so."""
    from hbt_ray.tune.config import WandbConfig
    from hbt_ray.tune.wandb import initial_mode, trial_runs_callback

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = WandbConfig(init_timeout=5)
    assert initial_mode(cfg) == "offline"
    base = {"train": {"run": {"seed": 7}, "wandb": {"api_key": "not-a-key"}}}
    for mode, trial_id in (("offline", "t0"), ("online", "t1")):  # online: no key, so init fails
        callback = trial_runs_callback(cfg, mode, "sweep", tmp_path, base)
        callback.setup()
        trial = _Trial(trial_id, tmp_path)
        callback.log_trial_start(trial)
        callback.log_trial_result(1, trial, {"loss": 1.5, "training_iteration": 1, "trial_id": trial_id})
        callback.log_trial_end(trial, failed=True)
        callback.on_experiment_end([trial])
        records = _offline_run(tmp_path, trial_id)
        for expected in (b"train.run.seed", b"sampler.alpha", b"loss", b"trial_status", b"ERROR"):
            assert expected in records, (trial_id, expected)
        assert b"not-a-key" not in records


def test_a_trial_logging_actor_closes_wandb_before_it_ends(tmp_path):
    """W&B's exit hook, left to close the service connection when Ray ends the actor, found the service
    gone and printed a traceback into the sweep's log; the actor closes it itself when its run ends."""
    import subprocess
    import sys

    script = f"""
import queue
from ray.air.integrations.wandb import _QueueItem
import wandb.sdk.wandb_setup as setup
from hbt_ray.tune.wandb import TrialLoggingActor
q = queue.Queue()
q.put((_QueueItem.RESULT, {{"loss": 1.0, "training_iteration": 1}}))
q.put((_QueueItem.END, None))
actor = TrialLoggingActor({str(tmp_path)!r}, q, [], [], project="p", mode="offline", name="t0",
                          dir={str(tmp_path)!r}, id="t0")
actor.run()
print("service connection left open:", setup._singleton is not None)
"""
    env = {**os.environ, "WANDB_SILENT": "true", "NETRC": str(tmp_path / "no-netrc")}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "service connection left open: False" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _offline_run(tmp_path, "t0")  # and the run was written


def test_the_recipe_sweep_config_passes_every_driver_check():
    """``hbt_ray/configs/tune_recipe.yaml`` + ``tune_spaces/recipe.yaml`` (issue 19): every searched key at
    its bounds / values through the typed loader, the extra evals and the objective."""
    from hbt_ray.tune.sweep import check_sweep

    cfg = load_config(TuneConfig, ROOT / "hbt_ray" / "configs" / "tune_recipe.yaml", ["name=recipe-check"])
    space, base = check_sweep(cfg)
    assert {"loss.temperature", "optim.lr", "model.freeze_layers", "data.train", "sampler.alpha"} <= set(space.params)
    assert trial_train_config(cfg, {"data.train": "mlqa-r,ddtp"}).data.train == ["mlqa-r", "ddtp"]
    assert set(cfg.extra_evals) == {"mlqa", "tatoeba"} and 0.5 in cfg.interpolate
    assert base.eval.max_paragraphs >= 30  # a pool big enough to rank recipes
    # chosen on a dev pool disjoint from the one make run reports on (the first paragraphs)
    default = load_config(TuneConfig, ROOT / "hbt_ray" / "configs" / "tune_default.yaml", [])
    assert base.eval.skip_paragraphs >= (default.train.eval.max_paragraphs or 0) > 0
    # the second round (its command in tune_spaces/recipe_round2.yaml): the same base, its own space
    cfg2 = load_config(TuneConfig, ROOT / "hbt_ray" / "configs" / "tune_recipe.yaml",
                       ["name=recipe-check", "space=tune_spaces/recipe_round2.yaml", "interpolate=[0.7]"])  # fmt: skip
    space2, base2 = check_sweep(cfg2)
    assert {"run.max_steps", "optim.lr", "model.freeze_layers", "loss.temperature"} == set(space2.params)
    assert space2.scheduler == "none" and space2.fixed["sampler.alpha"] == 0.5 and cfg2.interpolate == [0.7]
    assert base2.eval == base.eval  # ranked on the same dev pool as round one
