"""scripts/bench_eval.py on a tiny slice: every side runs, prints the same metric values (to 1e-4) and the
script ends with a RESULT line that parses (~1 min on 2 cores: Ray start, mteb import, eleven sides)."""

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
               "tatoeba_encode_only_texts_per_s", "tatoeba_overhead", "tatoeba_end_to_end_vs_encode_only",
               "large_texts", "large_end_to_end_vs_encode_only")  # fmt: skip


@pytest.mark.slow
def test_bench_eval_sides_agree_and_result_parses(tmp_path, shared_data):
    out = tmp_path / "bench.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_eval.py", "--model", "tiny", "--max-paragraphs", "2", "--langs", "en,de",
         "--tatoeba-langs", "deu,ang", "--max-pairs", "20", "--large-langs", "fra,ido", "--large-pairs", "15", "--rounds", "1", "--no-warmup", "--out", str(out)],
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


@pytest.mark.slow
def test_profile_eval_times_every_part_and_sorted_rows_pad_less(tmp_path, shared_data):
    out = tmp_path / "profile.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/profile_eval.py", "--model", "tiny", "--pools", "lareqa,tatoeba10",
         "--forward-max", "1000", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line}  # fmt: skip
    assert set(table) >= {"load encoder", "actor start + load", "tokenise", "forward", "search + metrics"}
    lareqa, tatoeba = zip(*(table[k] for k in ("pad share, eval order", "pad share, sorted")))
    assert float(lareqa[1]) < float(lareqa[0])  # sorting by kind and length cuts the padding
    assert table["forward"][1].endswith("(est.)")  # over --forward-max: estimated, and marked so


def test_check_make_run_refuses_a_folder_that_exists(tmp_path):
    """What the folder holds afterwards must be that run's alone: an existing one is refused, unchanged."""
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "scripts/check_make_run.py", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and str(tmp_path) in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
