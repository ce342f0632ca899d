"""scripts/bench_train.py runs every side end to end (tiny model, a few steps) on the same batches and ends
with its RESULT line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_train.py", "--steps", "4", "--warmup", "1", "--rounds", "1",
         "--zero-stages", "0", "--no-host-ceiling", "--groups", "400", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert re.search(
        r"^RESULT overhead_vs_bare=\d+\.\d+ vs_sentence_transformers=\d+\.\d+ padded_vs_sentence_transformers="
        r"\d+\.\d+ packing_gain=\d+\.\d+ scaling_2w=\d+\.\d+ mfu=\d+\.\d+$",
        report, re.M,
    ), report  # fmt: skip
    # the trainer's runs were checked against the batches the other sides got
    assert report.count("same batches: checked") == 2, report
    assert "allocator MALLOC_ARENA_MAX=1" in report and "1 torch thread per process" in report
    # (c) trains on as many real tokens as the others (queries cut by the same tokenizer)
    ours = int(re.search(r"(\d+) real tokens per step \(mean\)", report).group(1))
    theirs = int(re.search(r"(\d+) real tokens per step by its tokenizer", report).group(1))
    assert abs(theirs - ours) <= 0.02 * ours, (ours, theirs)
    assert "- commit: `" in report and "- host: " in report
