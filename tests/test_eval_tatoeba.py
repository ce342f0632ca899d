"""Bitext evaluation (Tatoeba): MTEB's metrics by hand on known embeddings, the pooled variant, the
trainer's path (an in-memory encoder), the embedding cache, the report files and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hbt_ray.data.records import BitextSet
from hbt_ray.evaluate import (
    METRIC_MODES,
    BitextResult,
    EvalConfig,
    evaluate,
    evaluate_bitext_embeddings,
    load_eval_data,
    mteb_scores,
)
from hbt_ray.evaluate.__main__ import main as evaluate_main
from hbt_ray.model import ModelConfig, load_dual_encoder

CFG = EvalConfig(data="tatoeba", show_progress=False)


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def toy() -> tuple[BitextSet, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """aaa (inside XLM-R, 3 pairs) and bbb (outside, 2 pairs) in a 4-d space; no ties anywhere that counts."""
    e = np.eye(4, dtype=np.float32)
    bitext = BitextSet(
        "toy",
        {"aaa": ["a0", "a1", "a2"], "bbb": ["b0", "b1"]},
        {"aaa": ["A0", "A1", "A2"], "bbb": ["B0", "B1"]},
        {"aaa": "inside_xlmr", "bbb": "outside_xlmr"},
    )
    sentences = {
        "aaa": np.stack([e[0], unit(0.8, 0.6, 0, 0), e[2]]),
        "bbb": np.stack([e[3], unit(0, 0.5, 0, 0.75**0.5)]),
    }
    english = {"aaa": np.stack([e[0], e[1], e[2]]), "bbb": np.stack([e[3], e[1]])}
    return bitext, sentences, english


def test_mteb_scores_by_hand_and_against_sklearn():
    # Candidate 0 is claimed by queries 0 and 1, candidate 1 by none: precision 1/2 for class 0.
    assert mteb_scores(np.array([0, 0, 2])) == pytest.approx(
        {"accuracy": 2 / 3, "precision": (1 / 2 + 0 + 1) / 3, "recall": 2 / 3, "f1": (2 / 3 + 0 + 1) / 3}
    )
    assert mteb_scores(np.arange(5)) == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        pred = np.where(rng.random(n) < 0.5, np.arange(n), rng.integers(0, n, n))
        gold = np.arange(n)
        # What mteb's BitextMiningEvaluator computes, with the labels and predictions it builds.
        want = {
            "accuracy": metrics.accuracy_score(gold, pred),
            "precision": metrics.precision_score(gold, pred, zero_division=0, average="weighted"),
            "recall": metrics.recall_score(gold, pred, zero_division=0, average="weighted"),
            "f1": metrics.f1_score(gold, pred, zero_division=0, average="weighted"),
        }
        assert mteb_scores(pred) == pytest.approx(want, abs=1e-12)


def test_both_directions_and_averages_on_known_embeddings():
    bitext, sentences, english = toy()
    r = evaluate_bitext_embeddings(bitext, sentences, english, CFG)
    # aaa → English: a1 lands on A0 (0.8 > 0.6); English → aaa: every A finds its a.
    assert r.per_lang["aaa"]["to_eng"] == pytest.approx(
        {"accuracy": 2 / 3, "precision": 0.5, "recall": 2 / 3, "f1": 5 / 9}
    )
    assert r.per_lang["aaa"]["from_eng"] == pytest.approx(
        {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    )
    # bbb → English: both land on B0; precision (1/2 + 0) / 2, f1 (2/3 + 0) / 2.
    assert r.per_lang["bbb"]["to_eng"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.25, "recall": 0.5, "f1": 1 / 3}
    )
    assert r.per_lang["bbb"]["from_eng"]["accuracy"] == 1.0
    s = r.summary
    assert s["tatoeba_acc"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert s["tatoeba_inside_xlmr_acc"] == pytest.approx(5 / 6)
    assert s["tatoeba_outside_xlmr_acc"] == pytest.approx(3 / 4)
    assert s["tatoeba_to_eng_f1"] == pytest.approx((5 / 9 + 1 / 3) / 2)  # MTEB's main score, macro
    assert s["tatoeba_from_eng_accuracy"] == 1.0
    assert r.accuracy() == pytest.approx({"aaa": 5 / 6, "bbb": 3 / 4})


def test_pooled_variant_on_known_embeddings():
    bitext, sentences, english = toy()
    r = evaluate_bitext_embeddings(bitext, sentences, english, CFG)
    p = r.pooled
    # Pool: a0 a1 a2 b0 b1. B1 = e1 scores a1 0.6 > b1 0.5: aaa absorbs it, b1 ranks 2nd.
    assert p["per_lang"]["aaa"] == {"accuracy": 1.0, "mrr@10": 1.0}
    assert p["per_lang"]["bbb"] == {"accuracy": 0.5, "mrr@10": 0.75}
    assert p["wrong_top1"] == {"aaa": {}, "bbb": {"aaa": 1}}
    assert p["absorbed"] == {"aaa": 1} and p["absorbed_from_other_langs"] == {"aaa": 1}
    assert p["micro"]["accuracy"] == pytest.approx(4 / 5)
    assert r.summary["tatoeba_pooled_acc"] == pytest.approx(0.75)
    assert r.summary["tatoeba_pooled_mrr@10"] == pytest.approx(0.875)
    assert r.summary["tatoeba_pooled_outside_xlmr_acc"] == pytest.approx(0.5)


def test_summary_keys_are_tune_objectives():
    bitext, sentences, english = toy()
    summary = evaluate_bitext_embeddings(bitext, sentences, english, CFG).summary
    tatoeba_modes = [k for k in METRIC_MODES if k.startswith("tatoeba_")]
    assert len(tatoeba_modes) >= 4 and all(METRIC_MODES[k] == "max" and k in summary for k in tatoeba_modes)
    # One group only: its keys and no NaN for the absent one.
    only = evaluate_bitext_embeddings(bitext.select_langs(["aaa"]), sentences, english, CFG).summary
    assert "tatoeba_outside_xlmr_acc" not in only and all(math.isfinite(v) for v in only.values())


class CountingEncoder:
    """The tiny encoder, counting the texts it encodes, with a fingerprint so the cache applies."""

    fingerprint = "tiny-test"

    def __init__(self):
        self.inner = load_dual_encoder(ModelConfig(name="tiny"))
        self.encoded = 0

    def encode(self, texts, kind="query", batch_size=64, show_progress=False):
        self.encoded += len(texts)
        return self.inner.encode(texts, kind=kind, batch_size=batch_size, show_progress=show_progress)


def test_in_memory_encoder_as_the_trainer_calls_it(tmp_path):
    cfg = EvalConfig(
        data="tatoeba", langs=["deu", "kzj"], max_pairs=10, show_progress=False, cache_dir=str(tmp_path)
    )
    encoder = CountingEncoder()
    result = evaluate(encoder, load_eval_data(cfg), cfg)
    assert isinstance(result, BitextResult)
    distinct = result.counts["distinct_texts"]
    assert encoder.encoded == distinct <= 40  # every distinct text once
    assert result.groups == {"deu": "inside_xlmr", "kzj": "outside_xlmr"}
    assert 0.0 <= result.summary["tatoeba_acc"] <= 1.0
    again = evaluate(encoder, load_eval_data(cfg), cfg)  # from the embedding cache
    assert encoder.encoded == distinct and again.summary == result.summary
    # The report files; the second result as the reference of the first.
    files = result.write(tmp_path / "out", reference=again)
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ref acc" in files["md"].read_text(encoding="utf-8")
    assert BitextResult.from_json(files["json"]).summary == result.summary


def test_cli_end_to_end(tmp_path, ray_local, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "cross_map.png").write_bytes(b"an earlier XQuAD-R evaluation's heatmap")
    argv = ["--model", "tiny", "--data", "tatoeba", "--langs", "deu,ang,kzj", "--max-pairs", "20",
            "--out", str(out), "show_progress=false"]  # fmt: skip
    result = evaluate_main(argv)
    assert not (out / "cross_map.png").exists()  # b5232a8 left it beside this result
    assert isinstance(result, BitextResult)
    assert result.counts["pairs"] == {"ang": 20, "deu": 20, "kzj": 20}
    data = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert data["kind"] == "bitext" and set(data["per_lang"]) == {"ang", "deu", "kzj"}
    assert data["config"]["max_pairs"] == 20 and data["groups"]["ang"] == "outside_xlmr"
    for key in ("tatoeba_acc", "tatoeba_inside_xlmr_acc", "tatoeba_outside_xlmr_acc", "tatoeba_pooled_acc"):
        assert 0.0 <= data["summary"][key] <= 1.0
    assert (out / "accuracy_per_lang.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tatoeba_acc |" in (out / "eval.md").read_text(encoding="utf-8")
    assert "wrote" in capsys.readouterr().out
    # The same through two Ray search actors (candidates sharded, top-k merged): the same decisions.
    sharded = evaluate_main(
        [*argv[:-3], "--out", str(tmp_path / "sharded"), "show_progress=false", "num_shards=2"]
    )
    for lang, directions in result.per_lang.items():
        for d, scores in directions.items():
            assert sharded.per_lang[lang][d] == pytest.approx(scores)


def test_cli_bad_tatoeba_input(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exit_:
            evaluate_main(["--model", "tiny", "--out", str(tmp_path / "o"), *argv])
        assert exit_.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert error(["--data", "tatoeba", "--max-paragraphs", "3"]).startswith(
        "error: max_paragraphs: tatoeba has no paragraphs"
    )
    assert error(["--data", "xquad-r", "--max-pairs", "3"]) == (
        "error: max_pairs: only for tatoeba[:PATH]; xquad-r is subset by max_paragraphs"
    )
    assert "no files for language(s) ['xx']" in error(["--data", "tatoeba", "--langs", "xx"])
    assert error(["--data", "tatoeba", "--reference", str(tmp_path / "none.json")]).startswith(
        f"error: --reference {tmp_path / 'none.json'}: "
    )
