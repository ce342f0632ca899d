"""Driver: ``python -m hbt_ray.train --config FILE [key=value ...]`` (``--help`` lists every key).

python -m hbt_ray.train --config hbt_ray/configs/train_tiny.yaml run.max_steps=40 deepspeed.zero_stage=3
"""

from __future__ import annotations

import argparse
import json
import sys

from hbt_ray.config import ConfigError, config_keys, error_line, load_config, note_terminal
from hbt_ray.data.records import DataError
from hbt_ray.train import TrainConfig, train


def _keys_help() -> str:
    return "config keys (key=value overrides):\n" + "\n".join(
        f"  {key:<36} {tp:<28} default {default!r}" for key, tp, default in config_keys(TrainConfig)
    )


def steps_from_the_command_line(cfg: TrainConfig, overrides: list[str]) -> str | None:
    """``run.max_steps=N`` typed on the command line is the run's length, even where the config file sets
    it in passes (``run.epochs``) or pairs (``run.pairs``), which would otherwise replace it on the driver
    without a word; both set on the command line is an error. → the notice to print, if any
    (``tests/test_train_length.py``)."""
    given = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    if "run.max_steps" not in given:
        return None
    for key in ("epochs", "pairs"):
        value = getattr(cfg.run, key)
        if value is None:
            continue
        if f"run.{key}" in given:
            raise ConfigError(f"run.max_steps and run.{key} both set the run's length on the command line: give one")
        setattr(cfg.run, key, None)
        return f"run.max_steps={cfg.run.max_steps} from the command line replaces the config's run.{key}={value:g}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hbt_ray.train",
        description="Train the dual encoder on Ray Train + DeepSpeed ZeRO with hybrid batches.",
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see hbt_ray/configs/train_*.yaml)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in <run.storage_path>/<run.name> (default: resume it if its "
                             "setup is the same, else refuse)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-5")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        notice = steps_from_the_command_line(cfg, args.overrides)
        if notice:
            print(f"[hbt_ray.train] {notice}", file=sys.stderr)
        result = train(cfg, overwrite=args.overwrite)  # bad training data fails on this driver, while writing the shards
    except (ConfigError, DataError) as err:
        # a Ray task's error carries the remote traceback in its text; its cause is the error itself
        message = " ".join(str(getattr(err, "cause", None) or err).splitlines())
    else:
        message = None
    if message is not None:  # outside the except, which holds the failed reader and its progress bar
        return error_line(message)
    if result.stopped:  # Ctrl-C: a checkpoint was saved, the same command resumes from it
        print(f"stopped: at step {result.steps} of {cfg.run.max_steps}, checkpoint saved in {result.run_dir}: "
              "run the same command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    print(json.dumps({"run_dir": result.run_dir, "steps": result.steps, "model": result.model_path,
                      "checkpoint": result.checkpoint_path, "metrics": result.metrics}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    note_terminal()  # a log file or CI: no progress bars, here or in the workers
    sys.exit(main())
