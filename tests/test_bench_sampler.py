"""scripts/bench_sampler.py runs every strategy, the small split and the Ray Data stream (as shipped, with
Python's default collector thresholds and with the next pass started at once, interleaved), and ends with
its RESULT line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_sampler_smoke(tmp_path, shared_data):
    out = tmp_path / "bench.txt"
    proc = subprocess.run([sys.executable, "scripts/bench_sampler.py", "--steps", "30", "--buffer-groups", "512",
                           "--stream-groups", "3000", "--stream-epochs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert re.search(r"^RESULT sampler_pairs_per_s=\d+ slowest_strategy_pairs_per_s=\d+ worst_ratio_vs_naive=\d+\.\d\d "
                     r"stream_pairs_per_s=\d+ stream_vs_default_gc=\d+\.\d\d stream_vs_prime_at_open=\d+\.\d\d$",
                     report, re.M), report  # fmt: skip
    for side in ("shipped", "default gc", "prime at open"):  # two interleaved stream runs each
        assert len(re.findall(rf"^sampler \+ ray data, {side} +[\d,]+ +[\d,]+ +\d+\.\d$", report, re.M)) == 2, report
    for strategy in ("hybrid", "x-x-mono", "x-y", "x-x", "hybrid-sample"):
        assert re.search(rf"^{strategy} +[\d,]+ +[\d,]+ +\d+\.\d$", report, re.M), (strategy, report)
    assert re.search(r"^hybrid on a split of 520 groups \(rows wait at every pass boundary\): [\d,]+ pairs/s$",
                     report, re.M), report  # fmt: skip
    assert "- commit: `" in report
