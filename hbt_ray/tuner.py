"""Ray Tune over the cross:mono ratio α and the temperature τ (and any other training key).

Each trial trains on Ray Train workers (``hbt_ray.trainer.train``), reporting its intermediate evaluations
to Tune (so ASHA can stop bad trials), then evaluates the exported model with the distributed evaluator.
Results go to a CSV + markdown table, PNG plots, W&B runs (offline without ``WANDB_API_KEY``) and the best
model is exported. The user's entry point is ``python -m hbt_ray.tune`` (see :mod:`hbt_ray.tune`)::

    cfg = load_config(TuneConfig, None, ["space=tune_spaces/quick.yaml", "train.model.name=tiny"])
    summary = run_sweep(cfg)
    print(summary.best["objective"], summary.untuned_objective)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hbt_ray.cluster import init_ray
from hbt_ray.config import _build, _merge, _set_dotted, to_dict
from hbt_ray.evaluator import EvalConfig
from hbt_ray.trainer import TrainConfig
from hbt_ray.tune_report import (
    ALPHA,
    TAU,
    pareto_front,
    plot_alpha_tau_heatmap,
    plot_metrics_vs_alpha,
    write_table,
)
from hbt_ray.tune_space import SearchSpace, load_space

log = logging.getLogger("hbt_ray.tune")

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
#: Metrics the objective can name, all maximised except the bias.
METRICS_MODE = {"mono_map": "max", "cross_map": "max", "multi_map": "max", "mean_map": "max", "bias": "min"}
SECRET_RE = re.compile(r"(api[_-]?key|secret|password|token)", re.I)


@dataclass
class WandbConfig:
    project: str = "hbt_ray"
    entity: str | None = None
    #: auto: online when WANDB_API_KEY is set (falling back to offline if W&B is unreachable), else offline
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    init_timeout: float = 30.0


@dataclass
class TuneConfig:
    """The sweep. ``train`` is the base training config every trial starts from."""

    space: str = "tune_spaces/quick.yaml"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: eval set spec (hbt_ray.data.sources.load_eval_set) for intermediate and final evaluations
    eval_data: str = "xquad-r"
    eval_langs: list[str] | None = None
    eval_max_paragraphs: int | None = 10
    #: one metric (multi_map, mean_map, bias, …) or several comma-separated (Pareto front reported)
    objective: str = "multi_map"
    num_samples: int | None = None  # overrides the space file's
    scheduler: Literal["space", "none", "asha"] = "space"
    max_concurrent_trials: int = 1
    trial_cpus: float = 0.01  # the trial driver itself (Ray needs > 0); the Train workers ask for their own
    out_dir: str = "runs/tune"
    name: str = ""  # default: <space>-<timestamp>
    resume: bool = False
    evaluate_untuned: bool = True
    export_best: bool = True
    seed: int = 0
    #: Ray to use: "" = $RAY_ADDRESS (set by `ray job submit`) else a new local instance; "auto" = the
    #: cluster this machine belongs to (e.g. on a `ray up` head node); or an explicit address
    ray_address: str = ""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    #: testing aid: make the trial with this index (0-based, in start order) raise
    inject_failure_trial: int = -1

    def validate(self) -> None:
        for metric in self.objectives:
            if metric not in METRICS_MODE:
                raise ValueError(f"objective: {metric!r} is not one of {sorted(METRICS_MODE)}")

    @property
    def objectives(self) -> list[str]:
        return [m.strip() for m in self.objective.split(",") if m.strip()]


def resolve_space_path(space: str) -> Path:
    """A space given as a path, or by name from ``tune_spaces/`` (``quick`` → tune_spaces/quick.yaml)."""
    path = Path(space)
    candidates = [path, REPO_ROOT / path, REPO_ROOT / "tune_spaces" / path, REPO_ROOT / "tune_spaces" / f"{space}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return path


def objective_value(summary: dict[str, Any], objectives: list[str]) -> float | None:
    """The scalar the sweep ranks by: one metric, or for several the mean (bias counts negatively)."""
    values = []
    for metric in objectives:
        value = summary.get(metric)
        if value is None:
            return None
        values.append(-float(value) if METRICS_MODE[metric] == "min" else float(value))
    return sum(values) / len(values)


def trial_train_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The base training config with a trial's dotted-key parameters applied (type-checked)."""
    tree: dict[str, Any] = {}
    for key, value in params.items():
        _set_dotted(tree, key, value)
    return _build(TrainConfig, _merge(to_dict(base), tree))


def scrub_secrets(data: Any) -> Any:
    """A copy with the values of secret-looking keys replaced, for logs and W&B configs."""
    if isinstance(data, dict):
        return {k: ("<redacted>" if SECRET_RE.search(str(k)) else scrub_secrets(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [scrub_secrets(v) for v in data]
    return data


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------------------------- W&B


class WandbSweepLogger:
    """One W&B run per trial, grouped by sweep, plus a summary run with the results table.

    Runs offline (``wandb sync`` later) when there is no ``WANDB_API_KEY`` or W&B cannot be reached; any W&B
    failure is logged and never fails the sweep. The key itself is never written anywhere.
    """

    def __init__(self, cfg: WandbConfig, group: str, out_dir: Path, base_config: dict[str, Any]):
        self.cfg = cfg
        self.group = group
        self.dir = out_dir
        self.base_config = scrub_secrets(base_config)
        self.runs: dict[str, Any] = {}
        self.failures = 0
        if cfg.mode == "disabled":
            self.mode = "disabled"
        elif cfg.mode == "auto":
            self.mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        else:
            self.mode = cfg.mode

    def _init(self, name: str, config: dict[str, Any], job_type: str):
        if self.mode == "disabled":
            return None
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.group,
            name=name,
            job_type=job_type,
            config=scrub_secrets(config),
            dir=str(self.dir),
            reinit="create_new",
            settings=wandb.Settings(init_timeout=self.cfg.init_timeout, silent=True, console="off"),
        )
        try:
            return wandb.init(mode=self.mode, **kwargs)
        except Exception as err:  # noqa: BLE001 — W&B must never fail the sweep
            if self.mode == "online":
                log.warning("W&B online init failed (%s); logging offline from now on", type(err).__name__)
                self.mode = "offline"
                try:
                    return wandb.init(mode="offline", **kwargs)
                except Exception as err2:  # noqa: BLE001
                    err = err2
            self.failures += 1
            log.warning("W&B init failed for %s: %s", name, type(err).__name__)
            return None

    def start_trial(self, trial_id: str, params: dict[str, Any]) -> None:
        run = self._init(trial_id, {**_flat(self.base_config), **params, "trial_id": trial_id}, "trial")
        if run is not None:
            self.runs[trial_id] = run

    def log(self, trial_id: str, metrics: dict[str, Any]) -> None:
        run = self.runs.get(trial_id)
        if run is None:
            return
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            run.log(numeric)
        except Exception as err:  # noqa: BLE001
            self.failures += 1
            log.warning("W&B log failed for %s: %s", trial_id, err)

    def end_trial(self, trial_id: str, status: str, summary: dict[str, Any] | None = None) -> None:
        run = self.runs.pop(trial_id, None)
        if run is None:
            return
        try:
            run.summary.update({"status": status, **{k: v for k, v in (summary or {}).items() if _scalar(v)}})
            run.finish(exit_code=0 if status == "TERMINATED" else 1)
        except Exception as err:  # noqa: BLE001
            self.failures += 1
            log.warning("W&B finish failed for %s: %s", trial_id, err)

    def log_summary(self, rows: list[dict[str, Any]], images: list[Path], summary: dict[str, Any]) -> None:
        run = self._init(f"{self.group}-summary", {"sweep": self.group}, "sweep-summary")
        if run is None:
            return
        import wandb

        try:
            keys: list[str] = []
            for row in rows:
                keys.extend(k for k in row if k not in keys)
            table = wandb.Table(columns=keys, data=[[_cell(row.get(k)) for k in keys] for row in rows])
            run.log({"results": table, **{p.stem: wandb.Image(str(p)) for p in images}})
            run.summary.update({k: v for k, v in summary.items() if _scalar(v)})
            run.finish()
        except Exception as err:  # noqa: BLE001
            self.failures += 1
            log.warning("W&B summary failed: %s", err)


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _cell(value: Any) -> Any:
    return value if _scalar(value) else json.dumps(value, default=str)


def make_tune_callback(logger: WandbSweepLogger, swept_keys: list[str]):
    """A Tune callback that mirrors trial starts, results and ends into ``logger``."""
    from ray import tune

    class _WandbCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            params = {k: trial.config.get(k) for k in swept_keys}
            logger.start_trial(trial.trial_id, params)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            logger.log(trial.trial_id, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            logger.end_trial(trial.trial_id, "TERMINATED", trial.last_result)

        def on_trial_error(self, iteration, trials, trial, **info):
            logger.end_trial(trial.trial_id, "ERROR", trial.last_result)

    return _WandbCallback()


# ------------------------------------------------------------------------------------------ trials


def _eval_set(cfg: TuneConfig):
    from hbt_ray.data.sources import load_eval_set

    return load_eval_set(cfg.eval_data, langs=cfg.eval_langs, max_paragraphs=cfg.eval_max_paragraphs)


def evaluate_model(model: Any, cfg: TuneConfig) -> dict[str, Any]:
    """Evaluate a model (spec, ModelConfig or exported dir) on the sweep's eval set; the summary dict."""
    from hbt_ray.evaluator import evaluate

    result = evaluate(model, _eval_set(cfg), cfg.eval)
    summary = dict(result.summary)
    summary["objective"] = objective_value(summary, cfg.objectives)
    return summary


def trial_index(trial_name: str) -> int:
    """The 0-based creation index Tune puts in a trial name (``run_trial_1a2b3_00002`` → 2), after the
    sweep's 5-hex-digit id, which can be all decimal digits (``run_trial_86183_00003`` → 3, not 86183)."""
    match = re.search(r"_[0-9a-f]{5}_(\d{5})(?:_|$)", trial_name)
    return int(match.group(1)) if match else -1


def _mean_pairs_per_s(history: list[dict[str, Any]]) -> float | None:
    """Steady-state throughput: the mean over the second half of the logged steps."""
    values = [h["pairs_per_s"] for h in history if isinstance(h.get("pairs_per_s"), (int, float))]
    values = values[len(values) // 2 :]
    return sum(values) / len(values) if values else None


def run_trial(params: dict[str, Any], cfg: TuneConfig) -> None:
    """The Tune function trainable: train with this trial's parameters, evaluate, report."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hbt_ray.trainer import train

    ctx = tune.get_context()
    trial_dir = Path(ctx.get_trial_dir())
    if cfg.inject_failure_trial >= 0 and trial_index(ctx.get_trial_name()) == cfg.inject_failure_trial:
        raise RuntimeError(f"injected failure in trial {ctx.get_trial_name()} (inject_failure_trial)")
    train_cfg = trial_train_config(cfg.train, params)
    train_cfg.run.name = ctx.get_trial_id()
    train_cfg.run.storage_path = str(trial_dir / "train")
    train_cfg.run.export = True
    start = time.time()
    result = train(train_cfg, callbacks=[TuneReportCallback()])
    if result.model_path is None:
        raise RuntimeError(f"trial {ctx.get_trial_name()}: training exported no model ({result.run_dir})")
    summary = evaluate_model(result.model_path, cfg)
    final = {
        **{k: v for k, v in summary.items() if _scalar(v)},
        "pairs_per_s": _mean_pairs_per_s(result.history) or result.metrics.get("pairs_per_s"),
        "train_steps": result.steps,
        "train_seconds": time.time() - start,
        "export_dir": str(result.model_path),
        "final": 1,
    }
    final.update({f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    tune.report(final)


# ------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepSummary:
    out_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]]
    untuned: dict[str, Any] | None
    images: list[Path]
    best_model_dir: Path | None

    @property
    def untuned_objective(self) -> float | None:
        return None if self.untuned is None else self.untuned.get("objective")


def _search_alg(space: SearchSpace, cfg: TuneConfig):
    if space.search != "optuna":
        return None  # grid / random: Tune's basic variant generator
    from ray.tune.search.optuna import OptunaSearch

    objectives = cfg.objectives
    modes = [METRICS_MODE[m] for m in objectives]
    if len(objectives) == 1:
        return OptunaSearch(metric=objectives[0], mode=modes[0], seed=cfg.seed)
    return OptunaSearch(metric=objectives, mode=modes, seed=cfg.seed)


def _scheduler(space: SearchSpace, cfg: TuneConfig):
    name = space.scheduler if cfg.scheduler == "space" else cfg.scheduler
    if name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    metric = cfg.objectives[0]
    eval_every = int(space.fixed.get("run.eval_every") or cfg.train.run.eval_every)
    if eval_every <= 0:
        raise ValueError("scheduler asha needs intermediate evaluations: set train.run.eval_every > 0")
    # Rungs in training steps (reports are time-throttled, so their count is not a clock): a trial
    # runs at least two evaluations before it can be stopped.
    max_steps = int(space.fixed.get("run.max_steps") or cfg.train.run.max_steps)
    return ASHAScheduler(
        metric=f"eval/{metric}",
        mode=METRICS_MODE[metric],
        time_attr="step",
        max_t=max(max_steps, 2 * eval_every),
        grace_period=2 * eval_every,
        reduction_factor=2,
    )


def _rows_from_results(result_grid, swept: list[str], cfg: TuneConfig) -> list[dict[str, Any]]:
    rows = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        config = result.config or {}
        row: dict[str, Any] = {
            "trial": metrics.get("trial_id") or Path(result.path).name,
            "status": "ERROR" if result.error else ("TERMINATED" if metrics.get("final") else "STOPPED"),
        }
        for key in swept:
            row[key] = config.get(key)
        for key in (ALPHA, TAU):
            if key not in row:
                value = config.get(key)
                row[key] = value if value is not None else _dotted_get(cfg.train, key)
        for key in ("mono_map", "cross_map", "multi_map", "mean_map", "bias", "pairs_per_s", "train_steps"):
            if key in metrics:
                row[key] = metrics[key]
        if result.error is None and metrics.get("final"):
            row["objective"] = objective_value(metrics, cfg.objectives)
        if metrics.get("export_dir"):
            row["export_dir"] = metrics["export_dir"]
        if result.error is not None:
            row["error"] = describe_error(result.error)
        rows.append(row)
    rows.sort(key=lambda r: (r.get(ALPHA) is None, r.get(ALPHA) or 0.0, r.get(TAU) or 0.0, r["trial"]))
    return rows


def describe_error(error: BaseException) -> str:
    """``Type: message`` of the original exception inside Ray's wrappers (one line, no colour codes)."""
    cause = error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).splitlines() if ln.strip()]
    message = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {message.strip()[:300]}"


def _dotted_get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return obj


def prepare_base_train_config(cfg: TuneConfig, space: SearchSpace, out_root: Path) -> TrainConfig:
    """The config every trial starts from: the space's fixed keys applied, the pair shards written once
    (trials share them; paths made absolute, since Tune runs trials in their own directories), and the
    intermediate evaluations pointed at the sweep's eval set."""
    from hbt_ray.trainer import prepare_shards

    base = trial_train_config(cfg.train, space.fixed)
    shard_dir = Path(base.data.shard_dir or out_root / f"shards-{'+'.join(base.data.train)}-{base.data.limit_groups}")
    base.data.shard_dir = str(shard_dir.expanduser().resolve())
    base.run.storage_path = str(Path(base.run.storage_path).expanduser().resolve())
    prepare_shards(base, Path(base.data.shard_dir))
    if base.run.eval is None:
        base.run.eval = cfg.eval_data
        base.run.eval_langs = list(cfg.eval_langs or [])
        base.run.eval_max_paragraphs = cfg.eval_max_paragraphs
    return base


def check_trial_fits(cfg: TuneConfig, base: TrainConfig, resources: dict[str, float]) -> None:
    """Fail fast, naming the keys, when a trial's CPUs leave none for Ray Data's shard reads (Ray would
    otherwise wait forever for a CPU that never frees up)."""
    if base.run.use_gpu == "true" or resources.get("GPU", 0) > 0:
        return
    total = resources.get("CPU", 0.0)
    per_trial = cfg.trial_cpus + base.run.num_workers * base.run.cpus_per_worker
    need = cfg.max_concurrent_trials * per_trial + 1.0  # + one CPU for Ray Data's read tasks
    if need > total + 1e-9:
        raise ValueError(
            f"trials need {need:g} CPUs (max_concurrent_trials={cfg.max_concurrent_trials} × (trial_cpus="
            f"{cfg.trial_cpus:g} + train.run.num_workers={base.run.num_workers} × train.run.cpus_per_worker="
            f"{base.run.cpus_per_worker:g}) + 1 for Ray Data) but the Ray cluster has {total:g}: lower "
            "train.run.cpus_per_worker (threads: train.run.torch_threads) or max_concurrent_trials"
        )


def run_sweep(cfg: TuneConfig) -> SweepSummary:
    """Run (or resume) the sweep described by ``cfg``; write table, plots, W&B runs and the best model."""
    import ray
    from ray import tune

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    space = load_space(resolve_space_path(cfg.space))
    name = cfg.name or f"{Path(space.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_root = Path(cfg.out_dir).resolve()
    out_dir = out_root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    base = prepare_base_train_config(cfg, space, out_root)
    if cfg.eval.cache_dir:  # trials run in their own directories: make the cache path absolute
        cfg.eval.cache_dir = str(Path(cfg.eval.cache_dir).expanduser().resolve())
    (out_dir / "sweep_config.json").write_text(
        json.dumps(scrub_secrets({**to_dict(cfg), "train": to_dict(base), "space_file": space.source}), indent=2)
    )
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        init_ray(address)

    check_trial_fits(cfg, base, ray.cluster_resources())
    untuned = None
    if cfg.evaluate_untuned:
        print(f"[hbt_ray.tune] evaluating the untuned model {base.model.name} on {cfg.eval_data} …", flush=True)
        untuned = evaluate_model(base.model, cfg)
        (out_dir / "untuned.json").write_text(json.dumps(untuned, indent=2, default=str))

    wandb_logger = WandbSweepLogger(cfg.wandb, name, out_dir, {"train": to_dict(base)})
    callbacks = [make_tune_callback(wandb_logger, space.swept_keys)]
    tuned_cfg = copy.deepcopy(cfg)
    tuned_cfg.train = base
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=tuned_cfg), {"CPU": cfg.trial_cpus}
    )
    storage = str(out_root)
    exp_dir = out_root / name / "tune"
    if cfg.resume and tune.Tuner.can_restore(str(exp_dir)):
        print(f"[hbt_ray.tune] resuming {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        objectives = cfg.objectives
        single = len(objectives) == 1
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                search_alg=_search_alg(space, cfg),
                scheduler=_scheduler(space, cfg),
                num_samples=cfg.num_samples or space.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials,
                metric=objectives[0] if single and space.search != "optuna" else None,
                mode=METRICS_MODE[objectives[0]] if single and space.search != "optuna" else None,
            ),
            run_config=tune.RunConfig(
                name=f"{name}/tune",
                storage_path=storage,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    result_grid = tuner.fit()
    rows = _rows_from_results(result_grid, space.swept_keys, cfg)
    write_table(rows, out_dir)
    images = plot_metrics_vs_alpha(rows, out_dir)
    for metric in cfg.objectives:
        heat = plot_alpha_tau_heatmap(rows, metric, out_dir)
        if heat is not None:
            images.append(heat)

    finished = [r for r in rows if r.get("objective") is not None]
    best = max(finished, key=lambda r: r["objective"]) if finished else None
    front_idx = pareto_front(finished, cfg.objectives, [METRICS_MODE[m] for m in cfg.objectives])
    pareto = [finished[i] for i in front_idx]
    best_model_dir = None
    if best is not None and cfg.export_best and best.get("export_dir"):
        best_model_dir = out_dir / "best_model"
        if best_model_dir.exists():
            shutil.rmtree(best_model_dir)
        shutil.copytree(best["export_dir"], best_model_dir)

    summary = SweepSummary(out_dir, rows, best, pareto, untuned, images, best_model_dir)
    report = {
        "sweep": name,
        "objective": cfg.objective,
        "untuned_objective": summary.untuned_objective,
        "best_objective": None if best is None else best["objective"],
        "best_trial": None if best is None else best["trial"],
        "trials": len(rows),
        "errored": sum(r["status"] == "ERROR" for r in rows),
        "pareto": [r["trial"] for r in pareto],
        "best_model_dir": None if best_model_dir is None else str(best_model_dir),
    }
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    wandb_logger.log_summary(rows, images, report)
    return summary
