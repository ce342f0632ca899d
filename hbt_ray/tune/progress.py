"""``python -m hbt_ray.tune --report-only name=…``: the table and plots of the trials a sweep has ended so
far — while it runs in the background, or after it was interrupted — so hours-long sweeps can be read,
and committed, trial by trial. Trains and deletes nothing; the best model is chosen only by the sweep."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.config import ConfigError
from hbt_ray.model import describe_model
from hbt_ray.provenance import provenance_lines
from hbt_ray.tune.checks import check_resumable, check_sweep, resolve_base_paths
from hbt_ray.tune.config import TuneConfig
from hbt_ray.tune.outputs import local_report_dir
from hbt_ray.tune.records import RECORDS, read_records
from hbt_ray.tune.report import EXTRA_COLUMNS, plot_metrics_vs_alpha, rows_from_records, write_table


def report_so_far(cfg: TuneConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``results.md`` / ``results.csv`` / plots of the ended trials of the sweep ``cfg.name`` (in
    its folder, as the sweep's own report would be); → the report folder and the rows. The provenance is
    the sweep's (its ``untuned.json``: the commit it started from), the header says how many trials ended."""
    check_resumable(cfg)  # a sweep of that name exists
    space, base = check_sweep(cfg)
    out_dir = storage.join(storage.resolve(cfg.out_dir), cfg.name)
    tuned = copy.deepcopy(cfg)
    tuned.train = resolve_base_paths(base, storage.resolve(cfg.out_dir))
    records = read_records(storage.join(out_dir, RECORDS))
    untuned_file = storage.join(out_dir, "untuned.json")
    if not storage.exists(untuned_file):
        raise ConfigError(f"name: the sweep {cfg.name!r} has no untuned.json yet (it has not started its trials)")
    untuned = json.loads(storage.read_text(untuned_file))
    prov = untuned.pop("provenance", {})
    rows = rows_from_records(records, space.swept_keys, tuned)
    ended = [r for r in rows if r["status"] in ("TERMINATED", "ERROR")]
    total = space.num_samples if cfg.num_samples is None else cfg.num_samples
    for spec in space.params.values():  # Tune runs every combination of grid values num_samples times
        total *= len(spec.values) if spec.type == "grid" else 1
    extra = [f"{e}/{m}" for e in cfg.extra_evals for m in EXTRA_COLUMNS if any(f"{e}/{m}" in r for r in [*rows, untuned])]
    header = (f"# Sweep {cfg.name} (in progress: {len(ended)} of {total} trials ended)\n\n"
              + provenance_lines(prov, describe_model(base.model.name))
              + f"\n- evaluation: {prov.get('eval_pool', '?')}")  # fmt: skip
    report_dir = local_report_dir(out_dir)
    write_table(ended, report_dir, extra_columns=extra, untuned=untuned, header=header)
    images = plot_metrics_vs_alpha(ended, report_dir, untuned)
    storage.publish_files(report_dir, out_dir, ["results.csv", "results.md", *(p.name for p in images)])
    return report_dir, ended
