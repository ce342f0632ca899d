"""Sweep results: the table (CSV + markdown), the Pareto front, and the PNG plots people compare.

Works on plain rows (one dict per trial), so it can be re-run on a finished sweep's CSV::

    >>> rows = [{"trial": "t0", "status": "TERMINATED", "sampler.alpha": 0.0, "loss.temperature": 0.05,
    ...          "multi_map": 0.40}, {"trial": "t1", "status": "TERMINATED", "sampler.alpha": 1.0,
    ...          "loss.temperature": 0.05, "multi_map": 0.35}]
    >>> pareto_front(rows, ["multi_map"])
    [0]
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hbt_ray.evaluate import METRIC_MODES
from hbt_ray.tune.config import TuneConfig

ALPHA = "sampler.alpha"
TAU = "loss.temperature"
#: Columns of the results table, in order; metrics missing from a run are left blank.
TABLE_COLUMNS = [
    ("trial", "trial"),
    ("status", "status"),
    (ALPHA, "α"),
    (TAU, "τ"),
    ("mono_map", "mono mAP"),
    ("cross_map", "cross mAP"),
    ("multi_map", "multi mAP"),
    ("mean_map", "mean mAP"),
    ("bias", "bias (rank dist.)"),
    ("interpolate", "λ (WiSE-FT)"),
    ("fallback_share", "fallback"),
    ("pairs_per_s", "pairs/s"),
    ("objective", "objective"),
    ("targets", "vs untuned"),
]
#: What "better than the untuned model at all three" means (issue 19): the least change of each metric
#: against the untuned row (bias: the change must be below it, i.e. the bias drops).
TARGETS = {"multi_map": 0.05, "cross_map": 0.02, "mono_map": -0.005, "bias": 0.0}


def missed_targets(row: dict, untuned: dict) -> str:
    """``"all met"``, or the metrics that miss :data:`TARGETS` with their change against ``untuned``
    (blank when either row lacks a metric).

    >>> ref = {"multi_map": 0.43, "cross_map": 0.74, "mono_map": 0.83, "bias": 80.0}
    >>> missed_targets({"multi_map": 0.50, "cross_map": 0.77, "mono_map": 0.83, "bias": 50.0}, ref)
    'all met'
    >>> missed_targets({"multi_map": 0.55, "cross_map": 0.73, "mono_map": 0.79, "bias": 42.0}, ref)
    'cross -0.010, mono -0.040'
    """
    missed = []
    for metric, least in TARGETS.items():
        value, ref = _num(row.get(metric)), _num(untuned.get(metric))
        if value is None or ref is None:
            return ""
        delta = value - ref
        if (delta >= 0.0) if metric == "bias" else (delta < least - 1e-12):
            missed.append(f"{metric.removesuffix('_map')} {delta:+.{1 if metric == 'bias' else 3}f}")
    return ", ".join(missed) or "all met"


#: The ``trial`` of the reference row: the model before any training, first in the table, dashed in plots.
UNTUNED = "untuned (reference)"
PLOT_METRICS = [("mono_map", "mono mAP"), ("cross_map", "cross mAP"), ("multi_map", "multi mAP"), ("bias", "language bias")]


#: a number written as text; not Python's float() syntax, which reads "29753_00000" (a trial id) as 2975300000
NUMBER_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _num(value: Any) -> float | None:
    """A finite number, or None (ids, labels, missing values).

    >>> _num(0.5), _num("1e-3"), _num("29753_00000"), _num("nan"), _num(True)
    (0.5, 0.001, None, None, None)
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str) and not NUMBER_RE.fullmatch(value.strip()):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _fmt(value: Any) -> str:
    """A table cell: numbers rounded, text (trial ids, statuses, errors) as it is."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    num = _num(value)
    if num is None:
        return str(value)
    if isinstance(value, int) or (abs(num) >= 100 and num.is_integer()):
        return f"{num:.0f}"
    if 0 < abs(num) < 0.001:  # learning rates: their digits, not 0.0001
        return f"{num:.2e}"
    return f"{num:.4f}" if abs(num) < 10 else f"{num:.1f}"


def pareto_front(rows: Sequence[dict], metrics: Sequence[str], modes: Sequence[str] | None = None) -> list[int]:
    """Indices of the rows no other row dominates on ``metrics`` (all maximised unless ``modes`` says min)."""
    modes = list(modes or ["max"] * len(metrics))
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    points = []
    for i, row in enumerate(rows):
        vals = [_num(row.get(m)) for m in metrics]
        if all(v is not None for v in vals):
            points.append((i, [s * v for s, v in zip(signs, vals)]))
    front = []
    for i, p in points:
        dominated = any(
            all(b >= a for a, b in zip(p, q)) and any(b > a for a, b in zip(p, q)) for j, q in points if j != i
        )
        if not dominated:
            front.append(i)
    return front


def write_table(
    rows: Sequence[dict], out_dir: Path, extra_columns: Sequence[str] = (), untuned: dict | None = None,
    header: str = "", swept: Sequence[str] = (),
) -> tuple[Path, Path]:
    """``results.csv`` (every key of every row) and ``results.md`` (the readable columns, after
    ``header``); ``untuned`` (the model before training, its summary) is the first row of both. The
    ``swept`` training keys besides α and τ get a column each after the status, named without their
    section (``sampler.batch_size`` → ``batch_size``), so a row says what its trial trained with."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if untuned is not None:
        rows = [{**r, "targets": missed_targets(r, untuned)} for r in rows]
        rows = [{"trial": UNTUNED, "status": "reference", **untuned}, *rows]
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    columns = [(k, label) for k, label in TABLE_COLUMNS if any(k in r for r in rows)]
    params = [(k, k.split(".", 1)[-1]) for k in swept if k not in (ALPHA, TAU)]
    columns = columns[:2] + params + columns[2:]
    columns += [(k, k) for k in extra_columns if k not in {c for c, _ in columns}]
    lines = ["| " + " | ".join(label for _, label in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    md_path = out_dir / "results.md"
    md_path.write_text((header + "\n\n" if header else "") + "\n".join(lines) + "\n")
    return csv_path, md_path


def _tau_groups(rows: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """Group rows by τ; a continuous τ (more than 4 distinct values) is binned into log-spaced ranges."""
    taus = sorted({t for r in rows if (t := _num(r.get(TAU))) is not None})
    if not taus:
        return [("τ n/a", list(rows))]
    if len(taus) <= 4:
        return [(f"τ={t:g}", [r for r in rows if _num(r.get(TAU)) == t]) for t in taus]
    lo, hi = math.log(taus[0]), math.log(taus[-1])
    edges = [math.exp(lo + (hi - lo) * k / 4) for k in range(5)]
    groups = []
    for k in range(4):
        members = [r for r in rows if (t := _num(r.get(TAU))) is not None and edges[k] <= t <= edges[k + 1]
                   and (k == 3 or t < edges[k + 1])]
        if members:
            groups.append((f"τ∈[{edges[k]:.3g},{edges[k + 1]:.3g}]", members))
    return groups


def plot_metrics_vs_alpha(rows: Sequence[dict], out_dir: Path, untuned: dict | None = None) -> list[Path]:
    """One PNG per metric: the metric against α, one line per τ (group); the untuned model's value (when
    given) as a dashed reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    done = [r for r in rows if _num(r.get(ALPHA)) is not None]
    for metric, label in PLOT_METRICS:
        if not any(_num(r.get(metric)) is not None for r in done):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
        for name, members in _tau_groups(done):
            pts = sorted((_num(r[ALPHA]), _num(r.get(metric))) for r in members if _num(r.get(metric)) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if untuned is not None and _num(untuned.get(metric)) is not None:
            ax.axhline(_num(untuned[metric]), color="black", linestyle="--", linewidth=1, label="untuned")
        ax.set_xlabel("α (share of monolingual batches)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs α")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_alpha.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_alpha_tau_heatmap(rows: Sequence[dict], metric: str, out_dir: Path, bins: int = 5) -> Path | None:
    """Mean ``metric`` over an α × τ grid (α linear bins on [0, 1], τ log bins over the observed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pts = [(_num(r.get(ALPHA)), _num(r.get(TAU)), _num(r.get(metric))) for r in rows]
    pts = [p for p in pts if None not in p]
    if not pts:
        return None
    taus = sorted({p[1] for p in pts})
    if len(taus) <= bins:
        tau_edges = None
        tau_labels = [f"{t:g}" for t in taus]
    else:
        tau_edges = np.geomspace(taus[0], taus[-1], bins + 1)
        tau_labels = [f"{tau_edges[i]:.3g}–{tau_edges[i + 1]:.3g}" for i in range(bins)]
    alpha_edges = np.linspace(0.0, 1.0, bins + 1)
    sums = np.zeros((len(tau_labels), bins))
    counts = np.zeros_like(sums)
    for a, t, v in pts:
        ai = min(int(np.searchsorted(alpha_edges, a, side="right")) - 1, bins - 1)
        ti = taus.index(t) if tau_edges is None else min(int(np.searchsorted(tau_edges, t, side="right")) - 1, bins - 1)
        sums[ti, max(ai, 0)] += v
        counts[ti, max(ai, 0)] += 1
    grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.6 * len(tau_labels)), dpi=110)
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(bins), [f"{alpha_edges[i]:.1f}–{alpha_edges[i + 1]:.1f}" for i in range(bins)], fontsize=7)
    ax.set_yticks(range(len(tau_labels)), tau_labels, fontsize=7)
    ax.set_xlabel("α")
    ax.set_ylabel("τ")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"{metric} over α × τ")
    fig.tight_layout()
    path = out_dir / f"{metric}_alpha_tau_heatmap.png"
    fig.savefig(path)
    plt.close(fig)
    return path


#: Metrics copied from a trial's last result into its row of the results table.
ROW_METRICS = ("mono_map", "cross_map", "multi_map", "mean_map", "bias", "interpolate", "fallback_share",
               "pairs_per_s", "train_steps")  # fmt: skip


#: The extra evals' metrics shown in results.md (results.csv has all of them).
EXTRA_COLUMNS = ("mono_map", "cross_map", "multi_map", "tatoeba_acc", "tatoeba_outside_xlmr_acc")


def objective_value(summary: dict[str, Any], objectives: list[str]) -> float | None:
    """The scalar the sweep ranks by: one metric, or for several the mean (a ``min`` metric negated)."""
    values = []
    for metric in objectives:
        value = summary.get(metric)
        if value is None:
            return None
        values.append(-float(value) if METRIC_MODES[metric.rpartition("/")[2]] == "min" else float(value))
    return sum(values) / len(values)


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _dotted_get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return obj


def rows_from_records(records: list[dict[str, Any]], swept: list[str], cfg: TuneConfig) -> list[dict[str, Any]]:
    """One row per trial record (:mod:`hbt_ray.tune.records`: swept keys, α, τ, metrics, status,
    error), sorted by α then τ."""
    rows = []
    for record in records:
        metrics, config = record.get("metrics") or {}, record["params"]
        failed = record["status"] == "ERROR"
        status = "ERROR" if failed else record["status"] if record["status"] == "RUNNING" else \
            "TERMINATED" if metrics.get("final") else "STOPPED"  # fmt: skip
        row: dict[str, Any] = {"trial": record["trial"], "status": status}
        for key in swept:
            row[key] = config.get(key)
        for key in (ALPHA, TAU):
            if key not in row:
                value = config.get(key)
                row[key] = value if value is not None else _dotted_get(cfg.train, key)
        for key in ROW_METRICS:  # a trial ASHA stopped has its last intermediate evaluation only
            if key in metrics or f"eval/{key}" in metrics:
                row[key] = metrics.get(key, metrics.get(f"eval/{key}"))
        for key, value in metrics.items():  # the extra evals' metrics
            if "/" in key and key.split("/", 1)[0] in cfg.extra_evals and _scalar(value):
                row[key] = value
        if not failed and metrics.get("final"):
            row["objective"] = objective_value(metrics, cfg.objectives)
        if metrics.get("export_dir"):
            row["export_dir"] = metrics["export_dir"]
        if failed:
            row["error"] = record.get("error", "")
        rows.append(row)
    rows.sort(key=lambda r: (r.get(ALPHA) is None, r.get(ALPHA) or 0.0, r.get(TAU) or 0.0, r["trial"]))
    return rows
