"""scripts/bench_zero.py runs every ZeRO side end to end (a tiny encoder of the same family) and ends with
its RESULT line of ratios to stage 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_zero_smoke(tmp_path):
    out = tmp_path / "bench.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_zero.py", "--size", "tiny", "--steps", "1", "--warmup", "0", "--pairs", "2",
         "--seq", "8", "--no-freeze-word-embeddings", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    sides = ("zero1", "zero2", "zero3", "zero3_offload")
    pattern = "^RESULT " + " ".join(rf"mem_{s}=\d+\.\d\d" for s in sides) + " " + " ".join(rf"time_{s}=\d+\.\d\d" for s in sides) + "$"
    assert re.search(pattern, report, re.M), report
    assert re.findall(r"^  ran +(\S+):", report, re.M) == ["zero0", *sides]
    assert "- commit: `" in report and "word embeddings trained" in report
