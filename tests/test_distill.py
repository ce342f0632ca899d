"""``loss.distill`` (issue 34 item 1): a regulariser that keeps what the starting encoder knew, as the
KL divergence of each query's in-batch score distribution from the starting encoder's. Its arithmetic, its
config errors, and a training run (ZeRO-3, GradCache, 2 workers) that stays measurably closer to the
start's scores than the same run without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.sources import iter_pair_groups
from hbt_ray.loss import ContrastiveModule, LossConfig, distill_loss
from hbt_ray.model import ModelConfig, load_dual_encoder
from hbt_ray.train import TrainConfig, tokenizer_texts, train
from hbt_ray.train.driver import shard_dir_for

TINY_YAML = Path(__file__).resolve().parents[1] / "hbt_ray" / "configs" / "train_tiny.yaml"


def test_distill_loss_is_the_kl_of_the_in_batch_softmaxes_with_hard_negatives():
    torch.manual_seed(0)
    q, p, n = (F.normalize(torch.randn(k, 16), dim=-1) for k in (4, 4, 3))
    tq, tp, tn = (F.normalize(torch.randn(k, 16), dim=-1) for k in (4, 4, 3))
    tau = 0.05
    student = torch.softmax(q @ torch.cat([p, n]).T / tau, dim=-1)
    teacher = torch.softmax(tq @ torch.cat([tp, tn]).T / tau, dim=-1)
    expected = (teacher * (teacher.log() - student.log())).sum(-1).mean()
    got = distill_loss(q, p, (tq, tp, tn), tau, negatives=n)
    torch.testing.assert_close(got, expected)
    assert float(distill_loss(q, p, (q, p, n), tau, negatives=n)) == pytest.approx(0.0, abs=1e-6)


def test_a_gradient_step_on_the_distill_term_moves_the_scores_toward_the_teachers():
    torch.manual_seed(1)
    q = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    p = F.normalize(torch.randn(8, 16), dim=-1)
    teacher = (F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1), None)
    before = distill_loss(q, p, teacher, 0.1)
    (grad,) = torch.autograd.grad(before, q)
    after = distill_loss(q.detach() - 0.01 * grad, p, teacher, 0.1)
    assert float(after) < float(before.detach())


def test_the_module_adds_the_weighted_term_and_needs_the_teacher(tmp_path):
    encoder = load_dual_encoder(ModelConfig(name="tiny", cache_dir=str(tmp_path)), train_texts=["a b c", "d e f"])
    tok = encoder.tokenize(["a b", "d e", "c f"], "query")
    batch = (tok["input_ids"], tok["attention_mask"], tok["input_ids"].flip(0), tok["attention_mask"].flip(0))
    plain = ContrastiveModule(encoder, LossConfig(temperature=0.05)).eval()
    weighted = ContrastiveModule(encoder, LossConfig(temperature=0.05, distill=2.0)).eval()
    with torch.no_grad():
        q, p, _ = plain.embed(*batch)
        other = (q.flip(0), p, None)  # a teacher that ranks differently
        base, _ = plain(*batch)
        total, _ = weighted(*batch, teacher=other)
        term = distill_loss(q, p, other, 0.02)
    assert float(term) > 0.01
    assert float(total) == pytest.approx(float(base) + 2.0 * float(term), rel=1e-5)
    with pytest.raises(ValueError, match="loss.distill > 0 needs the starting encoder's embeddings"):
        weighted(*batch)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^loss.distill: must be >= 0, got -1.0"):
        load_config(TrainConfig, None, ["loss.distill=-1"])
    with pytest.raises(ConfigError, match=r"^loss.distill_temperature: must be > 0, got 0.0"):
        load_config(TrainConfig, None, ["loss.distill_temperature=0"])


def _score_kl(start, trained, pairs, tau: float = 0.02) -> float:
    """Mean KL(start ‖ trained) of the queries' softmax over the 64-pair chunk's passages."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), 64):
            qs, ps = [a for a, _ in pairs[i : i + 64]], [b for _, b in pairs[i : i + 64]]
            s = (start.embed(qs, "query"), start.embed(ps, "passage"), None)
            t = trained.embed(qs, "query"), trained.embed(ps, "passage")
            out.append(float(distill_loss(t[0], t[1], s, tau)))
    return float(np.mean(out))


@pytest.mark.slow
def test_a_run_with_distill_stays_closer_to_the_starting_scores(ray_local, tmp_path, shared_data):
    import itertools

    heldout = [(g.pairs[g.langs[0]].query, g.pairs[g.langs[0]].passage)
               for g in itertools.islice(iter_pair_groups("ddtp", limit=1456), 1200, None)]  # fmt: skip
    kl = {}
    for name, weight in (("plain", 0.0), ("distill", 20.0)):
        cfg = load_config(TrainConfig, TINY_YAML, [
            f"run.storage_path={tmp_path}", f"data.shard_dir={tmp_path / 'shards'}", "data.limit_groups=1200",
            "run.progress=false", f"run.name={name}",
            "run.max_steps=12", "run.checkpoint_every=0", "deepspeed.zero_stage=3", "loss.grad_cache=true",
            "loss.chunk_size=8", "optim.lr=3e-3", "optim.warmup_steps=0", f"loss.distill={weight}",
        ])  # fmt: skip
        result = train(cfg)
        assert result.steps == 12 and all(np.isfinite(h["loss"]) for h in result.history)
        shards = shard_dir_for(cfg.data, tmp_path / name)
        texts = tokenizer_texts(shards, cfg.model.tiny_sample_records)  # what train() gave the workers
        start = load_dual_encoder(cfg.model, train_texts=texts).eval()
        trained = load_dual_encoder(ModelConfig(name=result.model_path)).eval()
        kl[name] = _score_kl(start, trained, heldout)
    print("KL(start || trained) of the in-batch scores:", kl)
    assert kl["plain"] > 0.05, kl  # the plain run moved the scores: there is something to keep
    assert kl["distill"] < 0.5 * kl["plain"], kl
