"""Paired comparisons over seeds, and the verdicts the report states in words.

Seed s gives every arm the same initial model and the same data order, so arm A and baseline B are
compared seed by seed: the differences d_s = A_s − B_s, their mean, the 95 % t-interval of that mean and
the two-sided paired t-test's p-value (against the untuned model, which has no seed, B_s is the one
value: a one-sample t-test of A_s − B). With n seeds the interval has n − 1 degrees of freedom.

    >>> d = paired({0: 0.52, 1: 0.55, 2: 0.53}, {0: 0.50, 1: 0.51, 2: 0.50})
    >>> d["n"], round(d["mean"], 4), d["lo"] > 0, verdict_word(d, "max")
    (3, 0.03, True, 'better')
    >>> verdict_word(paired({0: 0.5}, {0: 0.4}), "max")
    'one seed: no interval'
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Which way each kind of reproduce metric is better (the last part of its name).
LOWER_IS_BETTER = {"bias"}


def mode(metric: str) -> str:
    """``max`` or ``min`` for a reproduce metric name (``xquad/unseen/multi_map`` → max)."""
    return "min" if metric.rpartition("/")[2] in LOWER_IS_BETTER else "max"


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (nan with fewer than two values).

    >>> m, h = mean_ci95([1.0, 2.0, 3.0]); round(m, 3), round(h, 3)
    (2.0, 2.484)
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else float("nan"), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def paired(arm: dict[int, float], base: dict[int, float] | float) -> dict[str, Any]:
    """The paired difference arm − base over the seeds both have (``base`` a number: the untuned
    model's value, the same for every seed); → n, mean, lo, hi (95 % t-interval) and p (two-sided)."""
    from scipy import stats

    seeds = sorted(arm) if not isinstance(base, dict) else sorted(set(arm) & set(base))
    diffs = [arm[s] - (base if not isinstance(base, dict) else base[s]) for s in seeds]
    mean, half = mean_ci95(diffs)
    p = float("nan")
    if len(diffs) >= 2:
        p = 1.0 if np.ptp(diffs) == 0 and mean == 0 else float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return {"n": len(diffs), "mean": mean, "lo": mean - half, "hi": mean + half, "p": p}


def verdict_word(diff: dict[str, Any], direction: str) -> str:
    """``better`` / ``worse`` when the 95 % interval of the paired difference excludes 0, else ``no
    detectable difference``; fewer than two seeds give no interval."""
    if diff["n"] < 2 or math.isnan(diff["lo"]):
        return "one seed: no interval" if diff["n"] == 1 else "no runs"
    if diff["lo"] > 0:
        return "better" if direction == "max" else "worse"
    if diff["hi"] < 0:
        return "worse" if direction == "max" else "better"
    return "no detectable difference"


def by_seed(records: list[dict[str, Any]], arm: str, metric: str) -> dict[int, float]:
    """The arm's value of ``metric`` per seed (the untuned record: under seed 0)."""
    return {
        int(r["seed"] or 0): r["metrics"][metric] for r in records if r["arm"] == arm and metric in r["metrics"]
    }


def compare(records: list[dict[str, Any]], arm: str, base: str, metric: str) -> dict[str, Any]:
    """The paired difference of ``arm`` against ``base`` on ``metric`` (base ``untuned``: its one value)."""
    values = by_seed(records, arm, metric)
    ref = by_seed(records, base, metric)
    if base == "untuned":
        if not ref:
            return {"n": 0, "mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan")}
        return paired(values, next(iter(ref.values())))
    return paired(values, ref)


def sentence(arm_label: str, base_label: str, metric: str, diff: dict[str, Any]) -> str:
    """One plain sentence for a comparison, with its interval.

    >>> sentence("hybrid α=0.5", "untuned", "tatoeba/outside_xlmr/acc",
    ...          {"n": 3, "mean": 0.012, "lo": -0.004, "hi": 0.028, "p": 0.09})
    'hybrid α=0.5 vs untuned on tatoeba/outside_xlmr/acc: +0.0120 [-0.0040, +0.0280] (3 seeds, p = 0.09): no detectable difference.'
    """
    if diff["n"] == 0:
        return f"{arm_label} vs {base_label} on {metric}: no runs yet."
    word = verdict_word(diff, mode(metric))
    interval = "" if math.isnan(diff["lo"]) else f" [{diff['lo']:+.4f}, {diff['hi']:+.4f}]"
    p = "" if math.isnan(diff["p"]) else f", p = {diff['p']:.2g}"
    seeds = f"{diff['n']} seed{'s' if diff['n'] != 1 else ''}"
    return f"{arm_label} vs {base_label} on {metric}: {diff['mean']:+.4f}{interval} ({seeds}{p}): {word}."
