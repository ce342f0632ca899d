"""``python -m hbt_ray.reproduce --config FILE [--report-only] [key=value ...]`` — the report's grid.

Runs what is missing of the grid (the untuned model once, every arm × seed), each run's record written
when it is complete, then (re)writes the report from every record there. Stop it at any time; the same
command resumes. ``--report-only`` trains nothing: the report of what is done so far.

    python -m hbt_ray.reproduce --config hbt_ray/configs/reproduce_cpu.yaml             # hours on 2 cores
    python -m hbt_ray.reproduce --config hbt_ray/configs/reproduce_gpu.yaml             # the paper's scale
    python -m hbt_ray.reproduce --config hbt_ray/configs/reproduce_cpu.yaml --report-only
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from hbt_ray import storage
from hbt_ray.config import ConfigError, error_line, load_config, note_terminal
from hbt_ray.data.records import DataError
from hbt_ray.provenance import provenance
from hbt_ray.reproduce import ReproduceConfig, check_records, load_records, run_all, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hbt_ray.reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="reproduce YAML (hbt_ray/configs/reproduce_*.yaml)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report what is done")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=5 train.run.max_steps=200")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(ReproduceConfig, args.config, list(args.overrides))
    except (ValueError, OSError) as err:  # ConfigError included: one line, before Ray starts
        return error_line(err)
    out = storage.resolve(cfg.out)  # a local folder, or a URI: the records and report are kept there
    try:
        storage.check_writable(out, "out")
    except ConfigError as err:
        return error_line(err)
    if not storage.is_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    args_given = sys.argv[1:] if argv is None else argv
    prov = provenance(shlex.join(["python", "-m", "hbt_ray.reproduce", *args_given]))  # at the start
    try:
        if args.report_only:
            check_records(cfg, storage.join(out, "results"))
            records = load_records(storage.join(out, "results"))
        else:
            records = run_all(cfg, out)
    except (ConfigError, DataError) as err:
        return error_line(err)
    local = Path(out) if not storage.is_uri(out) else Path(tempfile.mkdtemp(prefix="hbt_report_"))
    summary = write_report(cfg, records, local, prov)
    if storage.is_uri(out):  # written here, then published beside the records
        storage.publish_files(local, out, sorted(p.name for p in local.iterdir() if p.is_file()))
        shutil.rmtree(local, ignore_errors=True)
    for question, lines in summary["verdicts"].items():
        for line in lines:
            print(f"[reproduce] {question}: {line}", flush=True)
    print(f"[reproduce] report: {storage.join(out, 'report.md')} ({summary['runs']} runs; missing: {len(summary['missing'])})")
    return 0


if __name__ == "__main__":
    note_terminal()  # a log file or CI: no progress bars, here or in the workers
    raise SystemExit(main())
