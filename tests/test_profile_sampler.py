"""scripts/profile_sampler.py runs every strategy end to end on real DDTP rows and ends with its RESULT line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_sampler_smoke(tmp_path, shared_data):
    out = tmp_path / "profile.txt"
    proc = subprocess.run([sys.executable, "scripts/profile_sampler.py", "--steps", "30", "--groups", "3000",
                           "--buffer-groups", "512", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    strategies = ("hybrid", "x_x_mono", "x_y", "x_x", "hybrid_sample")
    fields = " ".join(rf"{s}_step_us=\d+ {s}_rng_us=\d+" for s in strategies)
    assert re.search(rf"^RESULT {fields} rows_only_us=\d+ arrow_row_us=\d+\.\d$", report, re.M), report
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| strategy")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == ["hybrid", "x-x-mono", "x-y", "x-x", "hybrid-sample"]
    for row in rows:  # the RNG calls alone cost less than the floor, the floor less than the whole step
        cells = [c.strip() for c in row.strip("|").split("|")]
        rng, floor = float(cells[-3]), float(cells[-2])
        assert 0 < rng < floor < float(cells[1]), row
    assert "- commit: `" in report
