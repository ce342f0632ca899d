"""Ray Tune over the cross:mono ratio α and the temperature τ (``python -m hbt_ray.tune``).

:mod:`~hbt_ray.tune.config` (:class:`TuneConfig`, :class:`WandbConfig`) → :mod:`~hbt_ray.tune.space`
(search-space files) → :mod:`~hbt_ray.tune.sweep` (:func:`run_sweep`: the untuned model, the trials,
the best model) with :mod:`~hbt_ray.tune.report` (results table, Pareto front, plots) and
:mod:`~hbt_ray.tune.wandb` (one W&B run per trial, a summary run) beside it.

    >>> from hbt_ray.config import load_config
    >>> cfg = load_config(TuneConfig, None, ["space=quick", "train.eval.max_paragraphs=4"])
    >>> load_space(resolve_space_path(cfg.space)).params["sampler.alpha"].values, cfg.train.eval.data
    ([0.0, 0.5, 1.0], 'xquad-r')
"""

import os

# Tune warns whenever handling a trial's result takes over half a second. A trial's last result here
# does disk work by design (its record, dropping its heavy files, copying the best model), so the
# warning only repeats itself in every log; read once, when Ray Tune is first imported.
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "30")

from hbt_ray.tune.config import TuneConfig, WandbConfig  # noqa: E402
from hbt_ray.tune.report import (
    objective_value,
    pareto_front,
    plot_alpha_tau_heatmap,
    plot_metrics_vs_alpha,
    write_table,
)
from hbt_ray.tune.space import ParamSpec, SearchSpace, SpaceError, load_space, parse_space, resolve_space_path
from hbt_ray.tune.sweep import (
    SweepSummary,
    check_trial_fits,
    evaluate_model,
    make_scheduler,
    make_search_alg,
    run_sweep,
    run_trial,
    trial_index,
    trial_train_config,
)

__all__ = [
    "ParamSpec",
    "SearchSpace",
    "SpaceError",
    "SweepSummary",
    "TuneConfig",
    "WandbConfig",
    "check_trial_fits",
    "evaluate_model",
    "load_space",
    "make_scheduler",
    "make_search_alg",
    "objective_value",
    "pareto_front",
    "parse_space",
    "plot_alpha_tau_heatmap",
    "plot_metrics_vs_alpha",
    "resolve_space_path",
    "run_sweep",
    "run_trial",
    "trial_index",
    "trial_train_config",
    "write_table",
]
