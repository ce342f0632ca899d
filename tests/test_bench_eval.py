"""scripts/bench_eval.py on a tiny slice: every side runs, prints the same metric values (to 1e-4) and the
script ends with a RESULT line that parses (~1 min on 2 cores: Ray start, mteb import, seven sides)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mteb", reason="the mteb extra (pip install -e '.[mteb]'; make test installs it)")
pytest.importorskip("ranx", reason="the dev extra")
pytest.importorskip("sentence_transformers", reason="the dev extra")

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("mono_map", "cross_map", "multi_map", "to_eng_f1", "to_eng_accuracy")
RESULT_KEYS = ("speedup_vs_st_encode_once", "speedup_vs_mteb_mono", "tatoeba_end_to_end_texts_per_s",
               "tatoeba_encode_only_texts_per_s", "tatoeba_overhead")  # fmt: skip


def test_bench_eval_sides_agree_and_result_parses(tmp_path, shared_data):
    out = tmp_path / "bench.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_eval.py", "--model", "tiny", "--max-paragraphs", "2", "--langs", "en,de",
         "--tatoeba-langs", "deu,ang", "--max-pairs", "20", "--rounds", "1", "--no-warmup", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    printed = iter(proc.stdout.splitlines())  # --out holds the whole printed report (libraries may add lines)
    assert all(line in printed for line in report.splitlines())
    assert report.startswith("# scripts/bench_eval.py") and "- commit: `" in report and "- host: " in report
    assert "- model: tiny (random-init test model)" in report

    seen = set()
    for line in report.splitlines():
        name, *cells = line.split() or [""]
        if name in METRICS and cells:
            values = [float(c) for c in cells if re.fullmatch(r"-?\d+\.\d{6}", c)]
            assert len(values) >= 2, line  # every table sets two or more sides side by side
            assert max(values) - min(values) < 1e-4, line
            seen.add(name)
    assert seen == set(METRICS)
    assert "agree across sides to 1e-4: yes" in report

    last = report.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    result = dict(kv.split("=") for kv in last.split()[1:])
    assert tuple(result) == RESULT_KEYS
    assert all(float(v) > 0 for v in result.values()), result
