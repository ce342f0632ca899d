"""The sweep: Ray Tune over the cross:mono ratio α and the temperature τ (and any other training key).

Each trial (:func:`run_trial`) trains on Ray Train workers (:func:`hbt_ray.train.train`), reporting its
intermediate evaluations to Tune (so ASHA can stop bad trials), then evaluates the exported model on
the ``train.eval`` section. :func:`run_sweep` evaluates the untuned model the same way, runs the trials,
and writes the results table, the PNG plots (:mod:`hbt_ray.tune.report`), the W&B runs
(:mod:`hbt_ray.tune.wandb`) and the best model. The user's entry point is ``python -m hbt_ray.tune``.

The helpers are plain functions of the sweep's config::

    >>> from hbt_ray.config import load_config
    >>> from hbt_ray.tune.space import load_space, resolve_space_path
    >>> cfg = load_config(TuneConfig, None, ["objective=multi_map,bias"])
    >>> objective_value({"multi_map": 0.4, "bias": 0.2}, cfg.objectives)  # the mean, bias counted negatively
    0.1
    >>> trial_index("run_trial_86183_00003_3_sampler.alpha=0.25")
    3
    >>> base = trial_train_config(cfg, {"sampler.alpha": 0.25})
    >>> base.sampler.alpha, cfg.train.sampler.alpha
    (0.25, 0.5)
    >>> trial_train_config(cfg, {"sampler.alpha": 2.0})
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: train.sampler.alpha: 2.0 is not in [0, 1]
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.cluster import init_ray
from hbt_ray.config import NO_BARS_ENV, ConfigError, to_dict
from hbt_ray.evaluate import METRIC_MODES, EvalConfig, evaluate, load_eval_data, release_encoders
from hbt_ray.model import describe_model
from hbt_ray.provenance import provenance, provenance_lines, seconds_since
from hbt_ray.train import prepare_shards, train
from hbt_ray.tune.checks import (
    check_sweep,
    check_trial_fits,
    check_unchanged,
    resolve_base_paths,
    sweep_record,
    trial_train_config,
)
from hbt_ray.tune.config import TuneConfig
from hbt_ray.tune.outputs import copy_best_model, describe_pool, lighten_trial, local_report_dir
from hbt_ray.tune.records import (
    POINT_KEY,
    RECORDS,
    RESUME_KEY,
    ResumePlan,
    optuna_trial,
    read_records,
    records_callback,
    resume_plan,
    resumed_run,
    trial_params,
)
from hbt_ray.tune.report import (
    EXTRA_COLUMNS,
    _scalar,
    missed_targets,
    objective_value,
    pareto_front,
    plot_alpha_tau_heatmap,
    plot_metrics_vs_alpha,
    rows_from_records,
    write_table,
)
from hbt_ray.tune.space import SearchSpace
from hbt_ray.tune.wandb import SweepRun, trial_runs_callback


def trial_index(trial_name: str) -> int:
    """The 0-based creation index Tune puts in a trial name (``run_trial_1a2b3_00002`` → 2), after the
    sweep's 5-hex-digit id, which can be all decimal digits (``run_trial_86183_00003`` → 3, not 86183)."""
    match = re.search(r"_[0-9a-f]{5}_(\d{5})(?:_|$)", trial_name)
    return int(match.group(1)) if match else -1


def evaluate_model(
    model: Any, eval_cfg: EvalConfig, objectives: list[str], extra: dict[str, EvalConfig] | None = None
) -> dict[str, Any]:
    """Evaluate a model (spec, ModelConfig or exported dir) on the eval section, and on each ``extra``
    one (keys ``<name>/<metric>``); → the summary dict with its ``objective``. A model encoded in this
    process is loaded once for all of them and let go at the end (the next one is another model)."""
    try:
        result = evaluate(model, load_eval_data(eval_cfg), eval_cfg)
        summary = dict(result.summary)
        for name, section in (extra or {}).items():
            more = evaluate(model, load_eval_data(section), section).summary
            summary.update({f"{name}/{k}": v for k, v in more.items()})
    finally:
        release_encoders()
    summary["objective"] = objective_value(summary, objectives)
    return summary


def _mean_pairs_per_s(history: list[dict[str, Any]]) -> float | None:
    """Steady-state throughput: the mean over the second half of the logged steps."""
    values = [h["pairs_per_s"] for h in history if isinstance(h.get("pairs_per_s"), (int, float))]
    values = values[len(values) // 2 :]
    return sum(values) / len(values) if values else None


def run_trial(params: dict[str, Any], cfg: TuneConfig) -> None:
    """The Tune function trainable: train with this trial's parameters, evaluate, report."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = tune.get_context()
    if cfg.inject_failure_trial >= 0 and trial_index(ctx.get_trial_name()) == cfg.inject_failure_trial:
        raise RuntimeError(f"injected failure in trial {ctx.get_trial_name()} (inject_failure_trial)")
    train_cfg = trial_train_config(cfg, trial_params(params))
    # a resumed sweep's interrupted trial continues its own training run, from that run's checkpoint
    train_cfg.run.name = resumed_run(params) or ctx.get_trial_id()
    # Under the sweep's own folder, not Tune's trial dir (in Ray's temporary session folder, which Ray
    # and the OS clean up): the α = 0 and α = 1 models stay there to be compared after the sweep.
    train_cfg.run.storage_path = storage.join(cfg.out_dir, cfg.name, "trials")
    train_cfg.run.export = True
    # the recipe's WiSE-FT λ is one more λ this trial evaluates (beside λ = 1), not a model in its place
    lams = sorted({*cfg.interpolate, train_cfg.run.wise_ft} - {1.0})
    train_cfg.run.wise_ft = 1.0
    start = time.time()
    result = train(train_cfg, callbacks=[TuneReportCallback()])
    if result.model_path is None:
        raise RuntimeError(f"trial {ctx.get_trial_name()}: training exported no model ({result.run_dir})")
    summary = evaluate_model(result.model_path, train_cfg.eval, cfg.objectives, cfg.extra_evals)
    lam, model_path = 1.0, result.model_path
    if lams:
        from hbt_ray.model.interpolate import best_interpolation

        # Each λ is ranked on train.eval alone unless the objective needs an extra evaluation (they are
        # the slow ones); the chosen λ then gets them too, so the row is complete for the model exported.
        ranked_on = cfg.extra_evals if any("/" in m for m in cfg.objectives) else None
        lam, model_path, summary = best_interpolation(
            train_cfg.model, model_path, summary, lams, result.run_dir,
            lambda path: evaluate_model(path, train_cfg.eval, cfg.objectives, ranked_on),
        )  # fmt: skip
        if lam != 1.0 and cfg.extra_evals and ranked_on is None:
            summary = evaluate_model(model_path, train_cfg.eval, cfg.objectives, cfg.extra_evals)
    lighten_trial(result.run_dir, str(model_path), cfg)
    final = {
        **{k: v for k, v in summary.items() if _scalar(v)},
        "pairs_per_s": _mean_pairs_per_s(result.history) or result.metrics.get("pairs_per_s"),
        "train_steps": result.steps,
        "train_passes": result.passes,
        "train_seconds": time.time() - start,
        "export_dir": str(model_path),
        "interpolate": lam,
        "fallback_share": result.mix.get("fallback_share"),
        "final": 1,
    }
    final.update({f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    tune.report(final)


def make_search_alg(space: SearchSpace, cfg: TuneConfig, plan: ResumePlan | None = None) -> Any:
    """Optuna (TPE) for an ``optuna`` space; None for grid / random (Tune's basic variant generator).
    A resumed sweep's Optuna is told the results of the trials already run (``plan.done``) and first
    proposes the interrupted ones again (``plan.running``), each continuing its own training run."""
    if space.search != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    metrics = [f"eval/{m}" for m in cfg.objectives]  # run_trial's final result has them (the chosen λ's)
    plan = plan or ResumePlan([], [], 0)
    rerun = [(r["params"], r["trial"]) for r in plan.running]

    class OptunaOnEvaluations(OptunaSearch):
        """Optuna told about a trial's evaluations only: the ``eval/<metric>`` of every intermediate one
        (so a trial ASHA stops is a pruned trial with its last value), then of the final one. The step
        results between evaluations lack the metric, which OptunaSearch indexes (a KeyError that ended
        the experiment at a trial's first logged step)."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            wanted = self.metric if isinstance(self.metric, list) else [self.metric]
            if all(m in result for m in wanted):
                super().on_trial_result(trial_id, result)

        def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
            ready = super().set_search_properties(metric, mode, config, **spec)
            if ready:  # the study exists now: tell it what the sweep's earlier trials found
                for record in plan.done:
                    self._ot_study.add_trial(optuna_trial(record, metrics, self._space))
            return ready

        def suggest(self, trial_id: str) -> dict | None:
            config = super().suggest(trial_id)
            if config and rerun and trial_params(config) == rerun[0][0]:  # an enqueued interrupted trial
                config[RESUME_KEY] = rerun.pop(0)[1]
            return config

    points = [params for params, _ in rerun] or None
    # TPE's first trials are random draws from its own seeded generator, whatever the study holds: with
    # the first run's seed a resumed sweep would propose the first run's trials again
    seed = cfg.seed + len(plan.done) + len(plan.running)
    if len(metrics) == 1:
        return OptunaOnEvaluations(metric=metrics[0], mode=cfg.modes[0], seed=seed, points_to_evaluate=points)
    return OptunaOnEvaluations(metric=metrics, mode=cfg.modes, seed=seed, points_to_evaluate=points)


def make_scheduler(space: SearchSpace, cfg: TuneConfig) -> Any:
    """ASHA on the first objective's intermediate evaluations, when the space or ``scheduler`` asks."""
    name = space.scheduler if cfg.scheduler == "space" else cfg.scheduler
    if name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    metric = cfg.objectives[0]
    if "/" in metric:
        raise ValueError(f"scheduler asha ranks on intermediate evaluations of train.eval: not {metric} (extra_evals)")
    eval_every = int(space.fixed.get("run.eval_every") or cfg.train.run.eval_every)
    if eval_every <= 0:
        raise ValueError("scheduler asha needs intermediate evaluations: set train.run.eval_every > 0")
    # Rungs in training steps (reports are time-throttled, so their count is not a clock): a trial
    # runs at least two evaluations before it can be stopped. max_t is one step past the last one: ASHA
    # stops every trial that reaches max_t, which at max_steps would kill each in its final evaluation;
    # the last rung (at max_steps when it is grace · 2^k) still spares the weak ones that evaluation.
    max_steps = int(space.fixed.get("run.max_steps") or cfg.train.run.max_steps)
    return ASHAScheduler(
        metric=f"eval/{metric}",
        mode=METRIC_MODES[metric],
        time_attr="step",
        max_t=max(max_steps, 2 * eval_every) + 1,
        grace_period=2 * eval_every,
        reduction_factor=2,
    )


@dataclass
class SweepSummary:
    """What :func:`run_sweep` leaves: the rows, the best trial, the Pareto front, the untuned model's
    evaluation, the plots and the best model's directory."""

    out_dir: Any  # a Path, or the URI of a sweep kept in remote storage
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]]
    untuned: dict[str, Any] | None
    images: list[Path]
    best_model_dir: Any  # as out_dir
    report_dir: Path | None = None  # this machine's copy of the report files (out_dir itself when local)

    @property
    def untuned_objective(self) -> float | None:
        return None if self.untuned is None else self.untuned.get("objective")


def _tuner(cfg: TuneConfig, space: SearchSpace, trainable: Any, name: str, out_root: str, callbacks: list,
           plan: ResumePlan | None) -> Any:  # fmt: skip
    """A new ``tune.Tuner`` for the sweep, or for what a resumed sweep still runs (``plan``; None when
    nothing is left). Never ``Tuner.restore``: it unpickles files of the sweep folder (:mod:`.records`)."""
    from ray import tune

    param_space, num_samples = space.param_space(), space.num_samples if cfg.num_samples is None else cfg.num_samples
    if plan is not None:
        if plan.trials == 0:
            return None
        print(f"[hbt_ray.tune] resuming {name}: {len(plan.done)} trials done, {len(plan.running)} to continue, "
              f"{plan.new} new", flush=True)  # fmt: skip
        if plan.points:  # grid and random: exactly the trials still to run, each once
            param_space, num_samples = {POINT_KEY: tune.grid_search(plan.points)}, 1
        else:
            num_samples = plan.trials
    # Optuna ranks by its own metric(s); the other searches take Tune's single metric
    single = len(cfg.objectives) == 1 and space.search != "optuna"
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=make_search_alg(space, cfg, plan),
            scheduler=make_scheduler(space, cfg),
            num_samples=num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials,
            metric=cfg.objectives[0] if single else None,
            mode=cfg.modes[0] if single else None,
        ),
        run_config=tune.RunConfig(
            name=f"{name}/tune",
            storage_path=out_root,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune's status tables and per-trial boxes only on a terminal; in a file, the records callback
            # writes one line per trial instead
            verbose=0 if os.environ.get(NO_BARS_ENV) == "1" else 1,
        ),
    )


def run_sweep(cfg: TuneConfig, command_line: Collection[str] = ()) -> SweepSummary:
    """Run (or resume) the sweep described by ``cfg``; write table, plots, W&B runs and the best model.
    ``command_line``: the keys the user set on the command line, which beat the space's ``fixed``
    (:mod:`hbt_ray.tune.checks`)."""
    import ray
    from ray import tune

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    space, base = check_sweep(cfg, command_line)  # before any directory, shard or Ray instance exists
    name = cfg.name or f"{Path(space.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_root = storage.resolve(cfg.out_dir)
    out_dir = storage.join(out_root, name)
    storage.check_writable(out_dir, "out_dir")  # a missing bucket or permission: one line, before any evaluation
    base = resolve_base_paths(base, out_root)
    record = sweep_record(cfg, base, space)
    records_dir, plan = storage.join(out_dir, RECORDS), None
    if cfg.resume:
        check_unchanged(record, out_dir)
        num_samples = space.num_samples if cfg.num_samples is None else cfg.num_samples
        plan = resume_plan(read_records(records_dir), space, num_samples, cfg.seed)
    try:
        prepare_shards(base.data, base.data.shard_dir)  # written once: every trial reads them
    except ConfigError as err:  # the training section's keys, as this sweep's config names them
        raise ConfigError(f"train.{err}") from None
    storage.write_text(storage.join(out_dir, "sweep_config.json"), json.dumps(record, indent=2))
    if not ray.is_initialized():
        init_ray(cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local")
    # Trials, their training workers and evaluations run on other nodes of a cluster: they must see it.
    # (each trial's runs go to <out_dir>/<name>/trials, whatever train.run.storage_path says)
    storage.check_cluster_storage({"out_dir": out_root, "train.data.shard_dir": base.data.shard_dir})

    check_trial_fits(cfg, base, ray.cluster_resources())
    make_scheduler(space, cfg)  # a bad scheduler setting fails here, before any evaluation or W&B run
    prov = provenance()  # at the start: the commit (and whether it was clean) of the code that runs
    prov["eval_pool"] = describe_pool(base.eval)
    print(f"[hbt_ray.tune] every evaluation: {prov['eval_pool']}", flush=True)
    untuned = None
    untuned_file = storage.join(out_dir, "untuned.json")
    if cfg.evaluate_untuned and cfg.resume and storage.exists(untuned_file):  # the same model and pool
        untuned = {k: v for k, v in json.loads(storage.read_text(untuned_file)).items() if k != "provenance"}
    elif cfg.evaluate_untuned:
        print(f"[hbt_ray.tune] evaluating the untuned model {base.model.name} on {base.eval.data} …", flush=True)
        untuned = evaluate_model(base.model, base.eval, cfg.objectives, cfg.extra_evals)
        storage.write_text(untuned_file,
                           json.dumps({**untuned, "provenance": prov}, indent=2, default=str))  # fmt: skip

    tuned_cfg = copy.deepcopy(cfg)
    tuned_cfg.train = base
    tuned_cfg.name, tuned_cfg.out_dir = name, str(out_root)  # where run_trial keeps the trial's model
    trainable = tune.with_resources(tune.with_parameters(run_trial, cfg=tuned_cfg), {"CPU": cfg.trial_cpus})
    report_dir = local_report_dir(out_dir)
    sweep_run = SweepRun(cfg.wandb, name, report_dir)  # W&B writes its files on this machine
    mode = sweep_run.start()  # decides online or offline once, for the trials too
    trial_runs = trial_runs_callback(cfg.wandb, mode, name, report_dir, {"train": to_dict(base)})
    trials_dir = storage.join(out_dir, "trials")
    callbacks = [records_callback(records_dir), leftover_groups_callback(trials_dir),
                 *([trial_runs] if trial_runs else [])]  # fmt: skip
    try:
        tuner = _tuner(cfg, space, trainable, name, out_root, callbacks, plan)
        if tuner is not None:
            tuner.fit()
        # tuned_cfg: the rows' α, τ and other columns are those the trials trained with (space and
        # command line applied), never the config file's
        summary, report = _summarize(tuned_cfg, read_records(records_dir), space, name, out_dir, report_dir,
                                     untuned, prov)  # fmt: skip
    except BaseException:
        sweep_run.abort()
        raise
    sweep_run.finish(summary.rows, summary.images, report)
    return summary


def leftover_groups_callback(trials_dir: str) -> Any:
    """A Tune callback that frees the placement group of a trial's training run when the trial ends
    (:func:`hbt_ray.train.worker.remove_leftover_placement_group`: one ASHA stops mid-run leaves it)."""
    from ray.tune import Callback

    from hbt_ray.train.runfiles import remove_leftover_placement_group

    class RemoveLeftoverGroups(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            remove_leftover_placement_group(storage.join(trials_dir, trial.trial_id))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            remove_leftover_placement_group(storage.join(trials_dir, trial.trial_id))

    return RemoveLeftoverGroups()


def _summarize(
    cfg: TuneConfig, records: list[dict[str, Any]], space: SearchSpace, name: str, out_dir: str,
    report_dir: Path, untuned: dict[str, Any] | None, prov: dict[str, Any],
) -> tuple[SweepSummary, dict[str, Any]]:  # fmt: skip
    """Table, plots, best model and ``summary.json`` of a finished sweep; → the summary and the report."""
    rows = rows_from_records(records, space.swept_keys, cfg)
    model = describe_model(cfg.train.model.name)
    extra = [f"{e}/{m}" for e in cfg.extra_evals for m in EXTRA_COLUMNS if any(f"{e}/{m}" in r for r in rows)]
    wall_s = seconds_since(prov)  # the untuned model's evaluation and every trial, on this cluster
    header = (f"# Sweep {name}\n\n" + provenance_lines(prov, model) + f"\n- evaluation: {prov['eval_pool']}"
              f"\n- wall: {wall_s / 60:.0f} min for {len(rows)} trials, the untuned model's evaluation included")  # fmt: skip
    write_table(rows, report_dir, extra_columns=extra, untuned=untuned, header=header,
                swept=space.swept_keys)
    images = plot_metrics_vs_alpha(rows, report_dir, untuned)
    for metric in cfg.objectives:
        heat = plot_alpha_tau_heatmap(rows, metric, report_dir)
        if heat is not None:
            images.append(heat)

    finished = [r for r in rows if r.get("objective") is not None]
    best = max(finished, key=lambda r: r["objective"]) if finished else None
    pareto = [finished[i] for i in pareto_front(finished, cfg.objectives, cfg.modes)]
    best_model_dir = copy_best_model(best, cfg, out_dir)
    if not cfg.keep_trial_models:  # the trials' metrics, steps.jsonl and mix.json stay
        for row in rows:
            if row.get("export_dir"):
                storage.remove(row["export_dir"])
    where = out_dir if storage.is_uri(out_dir) else Path(out_dir)
    summary = SweepSummary(where, rows, best, pareto, untuned, images, best_model_dir, report_dir)
    report = {
        "sweep": name,
        "provenance": prov,
        "model": model,
        "objective": cfg.objective,
        "untuned_objective": summary.untuned_objective,
        "best_objective": None if best is None else best["objective"],
        "best_trial": None if best is None else best["trial"],
        "trials": len(rows),
        "wall_s": round(wall_s),
        "errored": sum(r["status"] == "ERROR" for r in rows),
        "pareto": [r["trial"] for r in pareto],
        "meets_targets": [r["trial"] for r in rows if untuned and missed_targets(r, untuned) == "all met"],
        "best_model_dir": None if best_model_dir is None else str(best_model_dir),
        "kept_per_trial": ["metrics", "steps.jsonl", "mix.json", *(["model"] if cfg.keep_trial_models else []),
                           *(["checkpoints"] if cfg.keep_checkpoints else [])],
    }
    (report_dir / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    storage.publish_files(report_dir, out_dir, ["results.csv", "results.md", "summary.json", *(p.name for p in images)])
    return summary, report
