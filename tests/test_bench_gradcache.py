"""scripts/bench_gradcache.py runs end to end (tiny model, small batches) and ends with its RESULT line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gradcache_smoke(tmp_path):
    out = tmp_path / "bench.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_gradcache.py", "--model", "tiny", "--batches", "8", "16", "--chunk", "2",
         "--steps", "1", "--small-steps", "1", "--rounds", "2", "--warmup", "0", "--small-warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert re.search(r"^RESULT mem_ratio_16=\d+\.\d+ speed_ratio_8=\d+\.\d+ floor_8=\d+\.\d+$", report, re.M), report
    for side in ("plain@8", "cached@8", "cached@16"):
        assert f"{side}:" in report
    assert "plain@16" not in report  # the largest batch runs cached only unless --plain-1024
    assert "- commit: `" in report
    # the smallest batch alternates plain / cached over the rounds; the larger one runs once
    ran = re.findall(r"^  ran +(\S+):", report, re.M)
    assert ran == ["plain@8", "cached@8", "plain@8", "cached@8", "cached@16"], ran
