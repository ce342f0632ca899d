"""``python -m hbt_ray.tune --report-only name=…``: the table and plots of the trials a sweep has ended so
far — while it runs in the background, or after it was interrupted — so hours-long sweeps can be read,
and committed, trial by trial. Trains and deletes nothing; the best model is chosen only by the sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.config import ConfigError, load_config
from hbt_ray.model import describe_model
from hbt_ray.provenance import provenance_lines
from hbt_ray.tune.checks import check_resumable
from hbt_ray.tune.config import TuneConfig
from hbt_ray.tune.outputs import local_report_dir
from hbt_ray.tune.records import RECORDS, read_records
from hbt_ray.tune.report import EXTRA_COLUMNS, plot_metrics_vs_alpha, rows_from_records, write_table
from hbt_ray.tune.space import parse_space
from hbt_ray.tune.wandb import REDACTED


def report_so_far(cfg: TuneConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``results.md`` / ``results.csv`` / plots of the ended trials of the sweep ``cfg.name`` in
    ``cfg.out_dir`` (in its folder, as the sweep's own report would be); → the report folder and the rows.
    The sweep is read as it was started — its ``sweep_config.json`` (settings, training config, space) and
    its ``untuned.json`` (the provenance: the commit it started from) — so only its name is needed."""
    check_resumable(cfg)  # a sweep of that name exists
    out_dir = storage.join(storage.resolve(cfg.out_dir), cfg.name)
    record = _unredacted(json.loads(storage.read_text(storage.join(out_dir, "sweep_config.json"))))
    space = parse_space(record.pop("space_content"), source=record.pop("space_file"))
    sweep = load_config(TuneConfig, None, base=record)
    untuned_file = storage.join(out_dir, "untuned.json")
    if not storage.exists(untuned_file):
        raise ConfigError(f"name: the sweep {cfg.name!r} has no untuned.json yet (it has not started its trials)")
    untuned = json.loads(storage.read_text(untuned_file))
    prov = untuned.pop("provenance", {})
    rows = rows_from_records(read_records(storage.join(out_dir, RECORDS)), space.swept_keys, sweep)
    ended = [r for r in rows if r["status"] in ("TERMINATED", "ERROR")]
    total = space.num_samples if sweep.num_samples is None else sweep.num_samples
    for spec in space.params.values():  # Tune runs every combination of grid values num_samples times
        total *= len(spec.values) if spec.type == "grid" else 1
    extra = [f"{e}/{m}" for e in sweep.extra_evals for m in EXTRA_COLUMNS
             if any(f"{e}/{m}" in r for r in [*rows, untuned])]  # fmt: skip
    header = (f"# Sweep {cfg.name} (in progress: {len(ended)} of {total} trials ended)\n\n"
              + provenance_lines(prov, describe_model(sweep.train.model.name))
              + f"\n- evaluation: {prov.get('eval_pool', '?')}")  # fmt: skip
    report_dir = local_report_dir(out_dir)
    write_table(ended, report_dir, extra_columns=extra, untuned=untuned, header=header, swept=space.swept_keys)
    images = plot_metrics_vs_alpha(ended, report_dir, untuned)
    storage.publish_files(report_dir, out_dir, ["results.csv", "results.md", *(p.name for p in images)])
    return report_dir, ended


def _unredacted(data: Any) -> Any:
    """``data`` without the keys whose value was scrubbed as a secret (their defaults apply): the records
    of sweeps written before settings such as ``run.balance_tokens`` were told apart from secrets."""
    if isinstance(data, dict):
        return {k: _unredacted(v) for k, v in data.items() if v != REDACTED}
    return data
