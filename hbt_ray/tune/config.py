"""The sweep's config: :class:`TuneConfig` (what to search, how, where results go) and :class:`WandbConfig`.

``train`` is the training config every trial starts from, ``train.eval`` the one eval section: the
trials' intermediate evaluations, the final evaluation of every trial and of the untuned model all use
it. Keys of a space file (``sampler.alpha``) are keys under ``train``::

    >>> from hbt_ray.config import load_config
    >>> cfg = load_config(TuneConfig, None, ["objective=multi_map,bias", "train.sampler.alpha=0.25"])
    >>> cfg.objectives, cfg.train.sampler.alpha
    (['multi_map', 'bias'], 0.25)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hbt_ray.config import ConfigError
from hbt_ray.evaluate import METRIC_MODES, EvalConfig
from hbt_ray.train import TrainConfig


@dataclass
class WandbConfig:
    """Where the sweep's W&B runs go (see :mod:`hbt_ray.tune.wandb`); the API key is never a config key."""

    project: str = "hbt_ray"
    entity: str | None = None
    #: auto: online when WANDB_API_KEY is set (falling back to offline if W&B is unreachable), else offline
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    #: seconds wandb.init may wait for the W&B server before the run falls back to offline
    init_timeout: float = 30.0


@dataclass
class TuneConfig:
    """The sweep. ``train`` is the base training config every trial starts from."""

    #: search space: a YAML file, or a name in tune_spaces/ (``quick`` → tune_spaces/quick.yaml)
    space: str = "tune_spaces/quick.yaml"
    #: the base training config; ``train.eval`` is the eval set and settings of every evaluation
    train: TrainConfig = field(default_factory=TrainConfig)
    #: one metric (multi_map, mean_map, bias, …) or several comma-separated (Pareto front reported)
    objective: str = "multi_map"
    #: overrides the space file's num_samples
    num_samples: int | None = None
    #: "space": the space file's scheduler; "none" / "asha" override it
    scheduler: Literal["space", "none", "asha"] = "space"
    max_concurrent_trials: int = 1
    #: CPUs of the trial driver itself (Ray needs > 0); the Train workers ask for their own
    trial_cpus: float = 0.01
    out_dir: str = "runs/tune"
    #: sweep name; default <space>-<timestamp>
    name: str = ""
    #: continue the sweep ``name`` (Tuner.restore) instead of starting a new one
    resume: bool = False
    #: evaluate the model before any training, for comparison with the trials
    evaluate_untuned: bool = True
    #: copy the best trial's exported model to <out_dir>/<name>/best_model
    export_best: bool = True
    #: keep every trial's model (its chosen WiSE-FT variant) under <out_dir>/<name>/trials/<trial id>/
    #: after the sweep; false (default): a trial keeps its metrics, steps.jsonl and mix.json, and only the
    #: best model survives, in best_model/ (a model is hundreds of MB; a sweep has dozens of trials)
    keep_trial_models: bool = False
    #: keep a trial's training checkpoints once it has ended (false: deleted as soon as it ends; an
    #: interrupted trial keeps them, and a resumed sweep continues it from there)
    keep_checkpoints: bool = False
    #: seed of the search algorithm (Optuna)
    seed: int = 0
    #: Ray to use: "" = $RAY_ADDRESS (set by `ray job submit`) else a new local instance; "auto" = the
    #: cluster this machine belongs to (e.g. on a `ray up` head node); or an explicit address
    ray_address: str = ""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    #: WiSE-FT: besides its fine-tuned weights (λ = 1), each trial evaluates λ·tuned + (1 − λ)·start for
    #: these λ and the recipe's own (``train.run.wise_ft``) and reports the best under the objective (its
    #: ``interpolate`` column): an evaluation, not a retraining, per λ
    interpolate: list[float] = field(default_factory=list)
    #: more eval sets, scored at the end of each trial and for the untuned model (not in intermediate
    #: evaluations): ``{name: eval section}``; their metrics are ``<name>/<metric>`` (e.g.
    #: ``tatoeba/tatoeba_outside_xlmr_acc``), usable in ``objective`` unless ASHA ranks on it
    extra_evals: dict[str, EvalConfig] = field(default_factory=dict)
    #: testing aid: make the trial with this index (0-based, in start order) raise
    inject_failure_trial: int = -1

    def validate(self) -> None:
        """Keys are named relative to this section; the config loader prepends the path."""
        if not self.objectives:
            raise ConfigError(f"objective: name at least one of {sorted(METRIC_MODES)}")
        for metric in self.objectives:
            name, _, base = metric.rpartition("/")
            if base not in METRIC_MODES:
                raise ConfigError(f"objective: {metric!r} is not one of {sorted(METRIC_MODES)}")
            if name and name not in self.extra_evals:
                raise ConfigError(f"objective: {metric!r}: no extra_evals.{name} (have {sorted(self.extra_evals)})")
        for name in self.extra_evals:
            if not name or "/" in name:
                raise ConfigError(f"extra_evals: {name!r} is not a name (no '/', not empty)")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"num_samples: must be >= 1 (null: the space file's), got {self.num_samples}")
        for i, lam in enumerate(self.interpolate):
            if not 0.0 <= lam <= 1.0:
                raise ConfigError(f"interpolate[{i}]: {lam} is not in [0, 1]")

    @property
    def objectives(self) -> list[str]:
        """The objective's metrics, in the order given."""
        return [m.strip() for m in self.objective.split(",") if m.strip()]

    @property
    def modes(self) -> list[str]:
        """``"max"`` or ``"min"`` for each objective metric."""
        return [METRIC_MODES[m.rpartition("/")[2]] for m in self.objectives]
