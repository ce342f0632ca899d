"""Trial records, ``<sweep>/trial_records/<trial id>.json``: what the results table and a resume read.

Ray Tune's own restore (``Tuner.restore``) unpickles ``tuner.pkl``, the searcher's state and every
trial's state from the sweep folder, so whoever can write there (a shared bucket) could run code on the
driver. A resume therefore never calls it: the driver writes one JSON record per trial as it starts,
ends or fails (:func:`records_callback`), and ``tune --resume`` reads only those. Finished and failed
trials are kept (Optuna is told their results), a trial that was running continues its training run
from that run's checkpoint, and the trials not yet drawn run as new ones (:func:`resume_plan`)::

    >>> from hbt_ray.tune.space import parse_space
    >>> space = parse_space({"search": "grid", "params": {"sampler.alpha": {"type": "grid", "values": [0, 1]}}})
    >>> done = {"trial": "a", "status": "TERMINATED", "params": {"sampler.alpha": 0}}
    >>> running = {"trial": "b", "status": "RUNNING", "params": {"sampler.alpha": 1}}
    >>> resume_plan([done, running], space, num_samples=2, seed=0).points
    [{'sampler.alpha': 1, '_resume_run': 'b'}, {'sampler.alpha': 0}, {'sampler.alpha': 1}]
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from hbt_ray import storage
from hbt_ray.config import ConfigError
from hbt_ray.tune.space import SearchSpace

#: The sweep's folder of trial records.
RECORDS = "trial_records"
#: A trial parameter naming the earlier trial whose training run this trial continues.
RESUME_KEY = "_resume_run"
#: On a resumed grid or random sweep, the one searched "parameter": the list of trials still to run.
POINT_KEY = "_point"
#: A record's statuses: the trial runs (or was running when the sweep stopped), ended, failed.
STATUSES = ("RUNNING", "TERMINATED", "ERROR")


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's dotted training keys, from its Tune config (a resumed sweep nests them in ``_point``).

    >>> trial_params({"_point": {"sampler.alpha": 0.5, "_resume_run": "b"}})
    {'sampler.alpha': 0.5}
    """
    params = config.get(POINT_KEY, config)
    return {k: v for k, v in params.items() if k not in (RESUME_KEY, POINT_KEY)}


def resumed_run(config: dict[str, Any]) -> str | None:
    """The earlier trial whose training run this trial continues, if any."""
    return config.get(POINT_KEY, config).get(RESUME_KEY)


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items()
            if isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))}  # fmt: skip


def error_summary(text: str) -> str:
    """``Type: message`` from a failed trial's error text (a traceback, in Ray's wrappers): the last
    line that names an exception, without colour codes.

    >>> error_summary("ray::run() (pid=1)\\n  File 'x.py'\\nRuntimeError: injected failure\\n")
    'RuntimeError: injected failure'
    """
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b[^:]*:", ln)]
    return (named or lines or [""])[-1][:300]


def trial_line(record: dict[str, Any]) -> str:
    """A trial's record in one line: its parameters, then its error or its evaluation.

    >>> trial_line({"params": {"sampler.alpha": 0.5}, "metrics": {"eval/mean_map": 0.751, "final": 1}})
    'sampler.alpha=0.5  mean_map=0.7510'
    """
    params = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["params"].items())
    if record.get("error"):
        return f"{params}  {record['error']}"
    metrics = record.get("metrics") or {}
    shown = [f"{k[5:]}={v:.4f}" for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, float)]
    return "  ".join([params, *shown[:6]])


def records_callback(records_dir: str) -> Any:
    """A Tune callback (on the driver) that writes each trial's record as it starts, ends or fails."""
    from ray.tune import Callback

    def write(trial: Any, status: str, error: str | None = None) -> None:
        record = {"trial": trial.trial_id, "status": status, "params": trial_params(trial.config),
                  "resumes": resumed_run(trial.config), "metrics": _scalars(trial.last_result or {})}  # fmt: skip
        if error is not None:
            record["error"] = error
        storage.write_text(storage.join(records_dir, f"{trial.trial_id}.json"), json.dumps(record, indent=1))
        if status != "RUNNING":  # one line per trial, in a log file too
            print(f"[hbt_ray.tune] trial {trial.trial_id} {status}: {trial_line(record)}", flush=True)

    class WriteRecords(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            write(trial, "RUNNING")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            write(trial, "TERMINATED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            try:  # the text Ray wrote beside the trial on this machine, a moment ago
                with open(trial.error_file) as f:
                    text = f.read()
            except (OSError, TypeError):
                text = "error (no error file)"
            write(trial, "ERROR", error_summary(text))

    return WriteRecords()


def read_records(records_dir: str) -> list[dict[str, Any]]:
    """Every trial's record, in trial-id order; a record another trial continued is left out.
    A damaged record is a ConfigError naming its file."""
    records = []
    names = sorted(n for n in storage.listdir(records_dir) if n.endswith(".json")) if storage.is_dir(records_dir) else []
    for name in names:
        path = storage.join(records_dir, name)
        try:
            record = json.loads(storage.read_text(path))
            ok = isinstance(record, dict) and record.get("status") in STATUSES and isinstance(record.get("params"), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise ConfigError(f"{path}: not a trial record ({{trial, status, params, …}}): remove it to run "
                              "that trial again")  # fmt: skip
        records.append(record)
    continued = {r.get("resumes") for r in records}
    return [r for r in records if r["trial"] not in continued]


@dataclass
class ResumePlan:
    """What a resumed sweep runs: ``done`` (kept as they are), then either explicit ``points`` (grid and
    random: the interrupted trials first, each naming its run, then the new ones) or, for Optuna,
    ``running`` to enqueue and ``new`` trials to draw."""

    done: list[dict[str, Any]]
    running: list[dict[str, Any]]
    new: int
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trials(self) -> int:
        """How many trials the resumed Tuner runs."""
        return len(self.points) if self.points else len(self.running) + self.new


def resume_plan(records: list[dict[str, Any]], space: SearchSpace, num_samples: int, seed: int) -> ResumePlan:
    """Which trials a resumed sweep still runs, from the records of the trials it ran (see the module)."""
    done = [r for r in records if r["status"] != "RUNNING"]
    running = [r for r in records if r["status"] == "RUNNING"]
    if space.search == "grid":
        keys = list(space.params)
        grid = [dict(zip(keys, values)) for values in itertools.product(*(space.params[k].values for k in keys))]
        todo = [dict(p) for _ in range(num_samples) for p in grid]
        for record in [*done, *running]:  # each record takes one of its grid point's samples
            if record["params"] in todo:
                todo.remove(record["params"])
        points = [{**r["params"], RESUME_KEY: r["trial"]} for r in running] + todo
        return ResumePlan(done, running, len(todo), points)
    new = max(0, num_samples - len(done) - len(running))
    if space.search == "optuna":
        return ResumePlan(done, running, new)
    import numpy as np

    rng = np.random.RandomState(seed + len(records))  # not the first run's draws again
    drawn = [{k: _plain(spec.to_tune().sample(random_state=rng)) for k, spec in space.params.items()}
             for _ in range(new)]  # fmt: skip
    return ResumePlan(done, running, new, [{**r["params"], RESUME_KEY: r["trial"]} for r in running] + drawn)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def optuna_trial(record: dict[str, Any], metrics: list[str], distributions: dict[str, Any]) -> Any:
    """A finished trial's record as an Optuna trial: complete with its final values, pruned (a trial
    ASHA stopped) with its last evaluation, failed when it errored."""
    import optuna

    values = record.get("metrics", {})
    state = optuna.trial.TrialState
    if not values.get("final") and record["status"] != "ERROR":
        known = len(metrics) == 1 and metrics[0] in values
        last = {int(values.get("step", 0)): values[metrics[0]]} if known else None
        return optuna.trial.create_trial(state=state.PRUNED, params=record["params"], distributions=distributions,
                                         intermediate_values=last)  # fmt: skip
    if record["status"] == "ERROR" or not all(m in values for m in metrics):
        return optuna.trial.create_trial(state=state.FAIL, params=record["params"], distributions=distributions)
    return optuna.trial.create_trial(state=state.COMPLETE, values=[values[m] for m in metrics],
                                     params=record["params"], distributions=distributions)  # fmt: skip
