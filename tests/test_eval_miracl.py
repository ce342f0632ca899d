"""MIRACL as a complete evaluation path (issue 18, item 5), tested on the fixtures only (the real MIRACL
is not reachable here): ``--data miracl:PATH`` gives nDCG@10 / R@100 per language and their average over
the low-resource languages, on the whole corpus or the judged passages only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "miracl"


def _evaluate(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # a new local Ray of 1 CPU, whatever Ray this test session runs (Ray sets RAY_ADDRESS to the one it starts)
    env = env or {**os.environ, "RAY_ADDRESS": "local"}
    return subprocess.run(
        [sys.executable, "-m", "hbt_ray.evaluate", "--model", "tiny", "--data", f"miracl:{FIXTURES}",
         "--out", str(out), "--num-cpus", "1", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("pool", ["corpus", "judged"])
def test_miracl_per_language_and_low_resource_scores(tmp_path, pool):
    proc = _evaluate(tmp_path, f"miracl_pool={pool}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["mono"]) == {"sw", "yo"} and not result["cross"] and not result["multi"]
    for lang in ("sw", "yo"):
        assert {"ndcg@10", "recall@100"} <= set(result["mono"][lang])
    summary = result["summary"]
    for metric in ("ndcg@10", "recall@100"):
        expected = np.mean([result["mono"][lang][metric] for lang in ("sw", "yo")])  # both are low-resource
        assert summary[f"mono_low_resource_{metric}"] == pytest.approx(expected)
    candidates = result["counts"]["candidates"]
    assert candidates == ({"sw": 9, "yo": 3} if pool == "judged" else {"sw": 10, "yo": 3})


def test_miracl_with_cross_lingual_settings_is_refused(tmp_path):
    proc = _evaluate(tmp_path, "--settings", "mono,cross")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: settings: ['mono', 'cross']: MIRACL is monolingual retrieval: settings=[mono]"


def test_miracl_pool_is_for_miracl_only(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hbt_ray.evaluate", "--model", "tiny", "--data", "xquad-r", "--out", str(tmp_path),
         "miracl_pool=judged"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == "error: miracl_pool: only for miracl:PATH, not xquad-r"


def test_num_cpus_with_a_running_cluster_is_one_line(tmp_path):
    """--num-cpus sizes a new local Ray; with RAY_ADDRESS set the CLI joins that cluster instead, where
    ray.init refused the argument with a traceback."""
    proc = _evaluate(tmp_path, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --num-cpus: sizes a new local Ray, but this joins the running one at "
                                   "RAY_ADDRESS=127.0.0.1:1: drop --num-cpus, or unset RAY_ADDRESS")  # fmt: skip
