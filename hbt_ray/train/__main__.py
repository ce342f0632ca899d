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


#: the keys that set a run's length; max_steps is used when the other two are unset
LENGTH_KEYS = ("run.max_steps", "run.epochs", "run.pairs")


def length_from_the_command_line(config: str | None, overrides: list[str]) -> tuple[list[str], str | None]:
    """A run's length typed on the command line (``run.max_steps``, ``run.epochs`` or ``run.pairs``) is
    the run's length, even where the config file sets it another way (which would otherwise refuse the
    mix, or replace max_steps on the driver without a word); two typed is an error. → the overrides with
    the file's other length cleared, and the notice to print, if any (``tests/test_train_length.py``)."""
    typed = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in LENGTH_KEYS:  # the last one typed counts: a later null takes an earlier one back
            typed.pop(key.strip(), None)
            if value.strip() not in ("null", "~", ""):
                typed[key.strip()] = value.strip()
    if len(typed) > 1:
        first, second = list(typed)[:2]
        raise ConfigError(f"{first} and {second} both set the run's length on the command line: give one")
    if not typed:
        return overrides, None
    (key, value), = typed.items()
    run = load_config(TrainConfig, config).run  # the file's own length
    cleared = [k for k in LENGTH_KEYS[1:] if k != key and getattr(run, k.removeprefix("run.")) is not None]
    if not cleared:
        return overrides, None
    was = getattr(run, cleared[0].removeprefix("run."))
    notice = f"{key}={value} from the command line replaces the config's {cleared[0]}={was:g}"
    return [*overrides, *(f"{k}=null" for k in cleared)], notice


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
        overrides, notice = length_from_the_command_line(args.config, args.overrides)
        cfg = load_config(TrainConfig, args.config, overrides)
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
