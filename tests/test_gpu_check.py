"""scripts/gpu_check.sh: on this CPU machine it says "no GPU" and exits 0 without a RESULT line; its checks'
own code runs on the CPU with the tiny encoder (--cpu-dry-run), so what a GPU session runs is not
untried code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_the_script_says_so_and_exits_0():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("no GPU") and "RESULT" not in proc.stdout


@pytest.mark.slow
def test_every_check_runs_on_cpu_as_a_dry_run(tmp_path):
    out = tmp_path / "gpu_check.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--cpu-dry-run", "--train-steps", "3", "--train-batch", "16",
         "--repeat", "1", "--eval-paragraphs", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out.read_text()
    assert "RESULT" not in report
    line = re.search(r"^DRY-RUN (.*)$", report, re.M)
    assert line, report
    keys = dict(kv.split("=") for kv in line.group(1).split())
    assert keys["train_ok"] == "1", report  # finite losses, τ in fp32, the export as sentence-transformers reads it
    for key in ("pairs_per_s_zero2", "pairs_per_s_zero3", "packed_max_diff_bf16", "speed_ratio_64", "floor_64",
                "cpu_actor_texts_per_s"):  # fmt: skip
        assert float(keys[key]) >= 0, key
    assert float(keys["packed_max_diff_bf16"]) < 0.05
