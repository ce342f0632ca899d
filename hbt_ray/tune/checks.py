"""What a sweep checks on the driver before Ray starts, a directory is made or a shard is written.

How settings combine, for every trial (:data:`PRECEDENCE`): built-in defaults < the config file
(``--config``, default ``tune_default.yaml``) < the space file's ``fixed:`` < the command line. A key the
space *searches* cannot also be set on the command line (refused, naming both); a key the space fixes is
replaced by the command line's value, and the driver says so. What every table, plot, W&B run and
``summary.json`` reports is read from that same resolved config (:func:`trial_train_config` of the
trial's parameters), so the τ column is the τ that trained.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.config import ConfigError, differing_keys, flat, override, to_dict
from hbt_ray.model import check_model_name
from hbt_ray.train import TrainConfig
from hbt_ray.train.config import RunConfig
from hbt_ray.tune.config import TuneConfig
from hbt_ray.tune.space import SearchSpace, SpaceError, load_space, resolve_space_path

PRECEDENCE = ("defaults", "config file", "space fixed", "command line")
#: Sweep settings that may change when a sweep is resumed: where and how fast it runs, not what it finds.
#: (``space`` is how the file was named; ``space_file`` and ``space_content`` are what it is.)
RESUME_MAY_CHANGE = ("resume", "ray_address", "max_concurrent_trials", "trial_cpus", "space")


def check_sweep(cfg: TuneConfig, command_line: Collection[str] = ()) -> tuple[SearchSpace, TrainConfig]:
    """Everything about a sweep that can be checked on the driver, before Ray starts or a directory is
    made: the space file, its ``fixed`` keys, every searched key at each of its bounds or listed values
    (through the same typed loader a trial uses, so a typo such as ``sampler.alpah`` fails here, not in
    every trial), the training keys a sweep decides itself, and for ``resume`` that the sweep exists.
    ``command_line``: the keys set on the command line (:data:`PRECEDENCE`). → the space (its ``fixed``
    less what the command line set) and the base training config (shards not written yet)."""
    space = load_space(resolve_space_path(cfg.space))
    given = {k[len("train.") :] for k in command_line if k.startswith("train.")}
    searched = sorted(k for k in space.params if k in given)
    if searched:
        raise SpaceError(f"train.{searched[0]}: set on the command line, but {space.source} searches it "
                         f"(params.{searched[0]}): drop one of the two")  # fmt: skip
    replaced = sorted(k for k in space.fixed if k in given)
    for key in replaced:
        print(f"[hbt_ray.tune] train.{key}: the command line's value replaces {space.source}'s fixed "
              f"{space.fixed[key]!r}", file=sys.stderr)  # fmt: skip
    space = dataclasses.replace(space, fixed={k: v for k, v in space.fixed.items() if k not in given})
    check_sweep_decides(cfg)
    try:
        base = trial_train_config(cfg, space.fixed)
    except ConfigError as err:
        raise SpaceError(f"{space.source}: fixed: {err}") from None
    for key, spec in space.params.items():
        for value in spec.corner_values():
            try:
                override(base, {key: value}, prefix="train.")
            except ConfigError as err:
                raise SpaceError(f"{space.source}: params.{key} = {value!r}: {err}") from None
    check_model_name(base.model, prefix="train.model.")
    if cfg.resume:
        check_resumable(cfg)
    return space, base


def sweeps_in(out_root: str | Path) -> list[str]:
    """The names of the sweeps under ``out_root`` (folders with a ``sweep_config.json``), local or a URI."""
    if not storage.is_dir(out_root):
        return []
    return [d for d in storage.listdir(out_root) if storage.exists(storage.join(out_root, d, "sweep_config.json"))]


def check_resumable(cfg: TuneConfig) -> None:
    """``resume`` continues a sweep that exists; a missing or mistyped name is an error, never a new sweep."""
    out_root = storage.resolve(cfg.out_dir)
    if not cfg.name:
        raise ConfigError(f"resume: name the sweep to resume with name=… (sweeps in {out_root}: "
                          f"{', '.join(sweeps_in(out_root)) or 'none'})")  # fmt: skip
    if not storage.exists(storage.join(out_root, cfg.name, "sweep_config.json")):
        raise ConfigError(f"name: no sweep {cfg.name!r} to resume in {out_root} (sweeps there: "
                          f"{', '.join(sweeps_in(out_root)) or 'none'})")  # fmt: skip


def check_trial_fits(cfg: TuneConfig, base: TrainConfig, resources: dict[str, float]) -> None:
    """Fail fast, naming the keys, when a trial's CPUs leave none for Ray Data's shard reads (Ray would
    otherwise wait forever for a CPU that never frees up)."""
    if base.run.use_gpu == "true" or resources.get("GPU", 0) > 0:
        return
    total = resources.get("CPU", 0.0)
    per_trial = cfg.trial_cpus + base.run.num_workers * base.run.cpus_per_worker
    need = cfg.max_concurrent_trials * per_trial + 1.0  # + one CPU for Ray Data's read tasks
    if need > total + 1e-9:
        raise ConfigError(
            f"trials need {need:g} CPUs (max_concurrent_trials={cfg.max_concurrent_trials} × (trial_cpus="
            f"{cfg.trial_cpus:g} + train.run.num_workers={base.run.num_workers} × train.run.cpus_per_worker="
            f"{base.run.cpus_per_worker:g}) + 1 for Ray Data) but the Ray cluster has {total:g}: lower "
            "train.run.cpus_per_worker (threads: train.run.torch_threads) or max_concurrent_trials"
        )


def trial_train_config(cfg: TuneConfig, params: dict[str, Any]) -> TrainConfig:
    """``cfg.train`` with a trial's (or the space's fixed) dotted keys applied; errors name ``train.<key>``."""
    return override(cfg.train, params, prefix="train.")


def check_sweep_decides(cfg: TuneConfig) -> None:
    """Training keys a sweep sets for every trial itself, refused rather than silently replaced: each
    trial's run goes to ``<out_dir>/<name>/trials/<trial id>`` and exports its model (evaluated, and
    the best one copied to ``best_model/``)."""
    defaults = RunConfig()
    for key, why in (("storage_path", "set out_dir"), ("name", "set name")):
        if getattr(cfg.train.run, key) != getattr(defaults, key):
            raise ConfigError(f"train.run.{key}: a sweep keeps each trial's run in <out_dir>/<name>/trials/"
                              f"<trial id>, not in {getattr(cfg.train.run, key)!r}: {why} instead")  # fmt: skip
    if not cfg.train.run.export:
        raise ConfigError("train.run.export: every trial exports its model (it is evaluated, and the best is "
                          "copied to best_model/): drop train.run.export=false")  # fmt: skip


def resolve_base_paths(base: TrainConfig, out_root: str) -> TrainConfig:
    """The local paths of the config every trial starts from made absolute against the driver's working
    directory (Tune runs trials in their own directories); the shards' default beside the sweep, so
    remote when the sweep is. Writes nothing."""
    base.data.shard_dir = storage.resolve(base.data.shard_dir or storage.join(out_root, "shards"))
    base.run.storage_path = storage.resolve(base.run.storage_path)
    if base.eval.cache_dir:  # a node-local cache: each node keeps its own
        base.eval.cache_dir = str(Path(base.eval.cache_dir).expanduser().resolve())
    return base


def sweep_record(cfg: TuneConfig, base: TrainConfig, space: SearchSpace) -> dict[str, Any]:
    """What ``sweep_config.json`` keeps: the sweep's settings, the resolved base training config and the
    space (its file and content), secrets scrubbed."""
    from hbt_ray.tune.wandb import scrub_secrets

    record = {**to_dict(cfg), "train": to_dict(base), "space_file": space.source,
              "space_content": {"params": {k: dataclasses.asdict(v) for k, v in space.params.items()},
                                "fixed": space.fixed, "search": space.search, "num_samples": space.num_samples,
                                "scheduler": space.scheduler}}  # fmt: skip
    return json.loads(json.dumps(scrub_secrets(record), default=str))


def check_unchanged(record: dict[str, Any], out_dir: str) -> None:
    """``resume``: the sweep continues only with the settings it ran with (besides
    :data:`RESUME_MAY_CHANGE`); a changed one would label old trials with the new value. ConfigError names
    the first differing key."""
    path = storage.join(out_dir, "sweep_config.json")
    if not storage.exists(path):
        raise ConfigError(f"resume: {path} is missing: cannot tell what the sweep ran with; start a new sweep")
    then, now = flat(json.loads(storage.read_text(path))), flat(record)
    # a value scrubbed as a secret cannot be compared (sweeps recorded before run.balance_tokens was
    # told apart from a token)
    changed = [k for k in differing_keys(then, now)
               if k not in RESUME_MAY_CHANGE and not k.startswith("wandb.") and then.get(k) != "<redacted>"]  # fmt: skip
    # the training keys first: the one a user changed, rather than the space's fixed list it left
    for key in sorted(changed, key=lambda k: not k.startswith("train."))[:1]:
        raise ConfigError(f"{key}: the sweep in {out_dir} ran with {then.get(key, '(unset)')!r}, now "
                          f"{now.get(key, '(unset)')!r}: resume it with its own settings, or start a new "
                          "sweep (another name=…)")  # fmt: skip
