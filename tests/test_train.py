"""Trainer: real Ray Train (2 CPU workers, gloo) + real DeepSpeed ZeRO on real DDTP pairs, tiny preset."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.shards import write_shards
from hbt_ray.data.sources import iter_pair_groups
from hbt_ray.loss import ContrastiveModule, info_nce_loss
from hbt_ray.model import ModelConfig, load_dual_encoder
from hbt_ray.train import TrainConfig, tokenizer_texts, train
from hbt_ray.train.deepspeed import build_optimizer, deepspeed_config, worker_env_vars

TINY_YAML = Path(__file__).resolve().parents[1] / "hbt_ray" / "configs" / "train_tiny.yaml"
TRAIN_GROUPS = 2000


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("ddtp_shards")
    write_shards(iter_pair_groups("ddtp", limit=TRAIN_GROUPS), out, rows_per_shard=500, progress=False)
    return out


@pytest.fixture(scope="module")
def heldout_pairs(shared_data) -> list[tuple[str, str]]:
    """256 DDTP pairs of groups the runs never see (groups 2000..2255), one language per group."""
    groups = itertools.islice(iter_pair_groups("ddtp", limit=TRAIN_GROUPS + 256), TRAIN_GROUPS, None)
    return [(g.pairs[g.langs[0]].query, g.pairs[g.langs[0]].passage) for g in groups]


def heldout_loss(encoder, pairs: list[tuple[str, str]]) -> float:
    encoder.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(pairs), 64):
            chunk = pairs[i : i + 64]
            q = encoder.embed([p[0] for p in chunk], "query")
            p = encoder.embed([p[1] for p in chunk], "passage")
            losses.append(float(info_nce_loss(q, p, 0.05)))
    return float(np.mean(losses))


def tiny_config(tmp_path: Path, shard_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        TINY_YAML,
        [f"run.storage_path={tmp_path}", f"data.shard_dir={shard_dir}", "run.progress=false", *overrides],
    )


def initial_model_loss(cfg: TrainConfig, shard_dir: Path, pairs) -> float:
    texts = tokenizer_texts(shard_dir, cfg.model.tiny_sample_records)  # what train() gives the workers
    return heldout_loss(load_dual_encoder(cfg.model, train_texts=texts), pairs)


# ---------------------------------------------------------------------------------------- config
def test_a_true_false_choice_takes_yaml_booleans():
    """`run.use_gpu=false` on the command line (YAML reads a boolean) means the choice "false"."""
    assert load_config(TrainConfig, TINY_YAML, ["run.use_gpu=false"]).run.use_gpu == "false"
    assert load_config(TrainConfig, None, ["run.use_gpu=true"]).run.use_gpu == "true"
    with pytest.raises(ConfigError, match=r"^run\.use_gpu: 'maybe' is not one of \['auto', 'true', 'false'\]$"):
        load_config(TrainConfig, None, ["run.use_gpu=maybe"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr"):
        load_config(TrainConfig, TINY_YAML, ["optim.lrr=1e-3"])
    # every section's check names the full key: its own path, once
    with pytest.raises(ConfigError, match=r"^sampler\.alpha: 2\.0 is not in \[0, 1\]$"):
        load_config(TrainConfig, None, ["sampler.alpha=2"])
    with pytest.raises(ConfigError, match=r"^loss\.temperature: need 0 < min_temperature"):
        load_config(TrainConfig, None, ["loss.temperature=0.001"])
    with pytest.raises(ConfigError, match=r"^sampler\.lang_pairs: 'en-en' is not a cross-lingual pair$"):
        load_config(TrainConfig, None, ["sampler.lang_pairs=[en-en]"])
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage"):
        load_config(TrainConfig, None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"deepspeed\.offload_param"):
        load_config(TrainConfig, None, ["deepspeed.offload_param=true", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"run\.nan_policy"):
        load_config(TrainConfig, None, ["run.nan_policy=ignore"])
    with pytest.raises(ConfigError, match=r"sampler\.batch_size"):
        load_config(TrainConfig, None, ["sampler.batch_size=33", "run.num_workers=2"])
    with pytest.raises(ConfigError, match=r"^run\.wise_ft: must be in \[0, 1\], got 1\.5$"):
        load_config(TrainConfig, None, ["run.wise_ft=1.5"])
    with pytest.raises(ConfigError, match=r"^run\.wise_ft: 0\.5 interpolates the exported model; it needs export"):
        load_config(TrainConfig, None, ["run.wise_ft=0.5", "run.export=false"])


def test_cli_help_lists_keys_and_rejects_bad_key(capsys):
    from hbt_ray.train.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key in (
        "deepspeed.zero_stage",
        "optim.grad_accum",
        "run.checkpoint_every",
        "sampler.alpha",
        "model.name",
    ):
        assert key in out
    assert main(["--config", str(TINY_YAML), "run.max_stepz=3"]) == 2
    assert "unknown config key run.max_stepz" in capsys.readouterr().err


def _ds(cfg: TrainConfig, micro: int, world: int) -> dict:
    return deepspeed_config(cfg.optim, cfg.deepspeed, cfg.run.max_steps, micro, world)


def test_deepspeed_config_follows_train_config():
    cfg = load_config(
        TrainConfig,
        None,
        [
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "deepspeed.offload_param=true",
            "deepspeed.precision=bf16",
            "optim.schedule=cosine",
            "optim.warmup_steps=7",
            "optim.grad_accum=4",
            "optim.grad_clip=0.5",
            "run.max_steps=70",
        ],
    )
    ds = _ds(cfg, 8, 2)
    assert ds["zero_optimization"]["stage"] == 3
    # one worker: the configured stage with offload (ZeRO-Offload on one GPU), stage 0 without
    assert _ds(cfg, 8, 1)["zero_optimization"]["stage"] == 3
    plain = load_config(TrainConfig, None, ["deepspeed.zero_stage=2"])
    assert _ds(plain, 8, 1)["zero_optimization"]["stage"] == 0
    assert _ds(plain, 8, 2)["zero_optimization"]["stage"] == 2
    kept = load_config(TrainConfig, None, ["deepspeed.zero_stage=2", "deepspeed.single_worker_stage=null"])
    assert _ds(kept, 8, 1)["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="deepspeed.single_worker_stage"):
        load_config(TrainConfig, None, ["deepspeed.single_worker_stage=5"])
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_batch_size"] == 8 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert "communication_data_type" not in ds  # default: the training dtype
    bf16_wire = load_config(TrainConfig, None, ["deepspeed.communication_dtype=bf16"])
    assert _ds(bf16_wire, 8, 2)["communication_data_type"] == "bf16"
    assert worker_env_vars(cfg.run)["MALLOC_MMAP_MAX_"] == "0"
    layer = torch.nn.Linear(4, 4)
    assert build_optimizer(layer, cfg.optim).defaults["fused"] is True  # optim.fused: torch's fused AdamW kernel
    assert not build_optimizer(layer, load_config(TrainConfig, None, ["optim.fused=false"]).optim).defaults["fused"]
    assert worker_env_vars(load_config(TrainConfig, None, ["run.keep_freed_memory=false"]).run) == {}
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"] == {
        **ds["scheduler"]["params"],
        "total_num_steps": 70,
        "warmup_num_steps": 7,
    }
    fast = load_config(TrainConfig, None, ["optim.lr=3e-4"])
    linear = _ds(fast, 4, 1)["scheduler"]
    assert linear["type"] == "WarmupDecayLR" and linear["params"]["warmup_max_lr"] == 3e-4
    # no warm-up: DeepSpeed's scheduler starts past its own warm-up, decaying to 0 (tests/test_lr_schedule.py
    # reads the lr of each update off a real engine)
    assert linear["params"]["last_batch_iteration"] == 1 and linear["params"]["warmup_min_lr"] == 0.0


def _ddtp_sampler(n_groups: int = 400):
    from hbt_ray.sampler import HybridBatchSampler, SamplerConfig, count_pairs

    rows = [g.to_row() for g in itertools.islice(iter_pair_groups("ddtp"), n_groups)]
    counts, n = count_pairs(rows)
    cfg = SamplerConfig(batch_size=16, buffer_groups=64, alpha=0.5, seed=3)
    return HybridBatchSampler(cfg, lambda _pass: iter(rows), 0, 1, counts, num_groups=n)


def test_contrastive_module_trains_with_dropout(tmp_path):
    """A from_pretrained encoder arrives in eval mode; the module DeepSpeed trains must be in train mode
    (dropout on), whatever the encoder was loaded from."""
    tiny = load_dual_encoder(ModelConfig(name="tiny"))
    tiny.save_pretrained(tmp_path / "exported")
    loaded = load_dual_encoder(ModelConfig(name=str(tmp_path / "exported")))
    assert not loaded.backbone.training  # from_pretrained: eval mode
    module = ContrastiveModule(loaded, load_config(TrainConfig, None, []).loss)
    assert all(m.training for m in module.modules())


def test_prefetched_batches_keep_order_and_resume_exactly(shared_data):
    """Batches drawn ahead in a thread come in the sampler's order; a checkpoint taken while batches are
    prefetched resumes with exactly the batches a plain sampler would have drawn next."""
    from hbt_ray.train.batches import PrefetchedBatches

    plain = _ddtp_sampler()
    expected = [plain.next_batch().group_ids for _ in range(12)]
    prepared_sizes = []
    first = PrefetchedBatches(_ddtp_sampler(), lambda b: len(b.queries), depth=3)
    got = []
    for _ in range(5):
        batch, prepared = first.next()
        got.append(batch.group_ids)
        prepared_sizes.append(prepared)
    # the sampler is ahead: the prefetched batches travel in the state. Wait for the thread to fill its
    # 3 slots (on a loaded CI machine it had not drawn one yet when state_dict ran: pending was []).
    deadline = time.monotonic() + 120
    while len(first.state_dict()["pending"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    state = first.state_dict()
    first.close()
    assert len(state["pending"]) == 3 and state["sampler"]["step"] == 5 + 3
    second = PrefetchedBatches(_ddtp_sampler(), lambda b: len(b.queries), depth=3)
    second.load_state_dict(state)
    got += [second.next()[0].group_ids for _ in range(7)]
    second.close()
    assert got == expected and prepared_sizes == [16] * 5


def test_prefetched_batches_raise_the_preparation_error(shared_data):
    from hbt_ray.train.batches import PrefetchedBatches

    def prepare(batch):
        if batch.step == 2:
            raise ValueError("cannot tokenize step 2")
        return None

    batches = PrefetchedBatches(_ddtp_sampler(), prepare)
    assert [batches.next()[0].step for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="step 2"):
        batches.next()
    batches.close()


def test_balanced_deal_evens_the_load_with_equal_counts():
    from hbt_ray.train.batches import balanced_deal

    costs = [[300, 280, 250, 240], [40, 30, 60, 50]]  # rank 0 drew all the long pairs
    deal = balanced_deal(costs)
    assert [len(d) for d in deal] == [4, 4]
    assert sorted(p for d in deal for p in d) == [(r, i) for r in range(2) for i in range(4)]
    loads = [sum(costs[r][i] for r, i in d) for d in deal]
    assert loads == [630, 620], loads  # was 1070 and 180
    assert balanced_deal(costs) == deal  # deterministic: every rank computes the same deal
    assert balanced_deal([[5, 5], [5, 5]]) == [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]


DEAL_PAIRS = [  # (query, passage, hard negatives): rank 0 draws long passages and all the negatives
    [("grep", "grep searches one or more input files for lines containing a match " * 3, ["sed", "awk"]),
     ("zlib", "zlib is a library implementing the deflate compression method " * 4, []),
     ("curl", "command line tool for transferring data with URL syntax " * 3, ["wget"]),
     ("vim", "Vim is an almost compatible version of the UNIX editor Vi " * 3, [])],
    [("ls", "list files", []), ("cat", "print files", []), ("rm", "remove", []), ("cp", "copy files", [])],
]  # fmt: skip


def _deal_worker(rank: int, init_file: str, cache_dir: str, out_dir: str) -> None:
    import datetime
    import pickle

    import torch.distributed as dist

    from hbt_ray.train.batches import deal_by_tokens

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)  # the same tiny encoder on both ranks
        encoder = load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache_dir))
        module = ContrastiveModule(encoder, TrainConfig().loss).eval()  # no dropout: comparable losses

        def encode(texts, kind):
            out = encoder.tokenize(texts, kind)
            return out["input_ids"], out["attention_mask"]

        pairs = DEAL_PAIRS[rank]
        negs = [n for _, _, ns in pairs for n in ns]
        prepared = (*encode([q for q, _, _ in pairs], "query"), *encode([p for _, p, _ in pairs], "passage"),
                    *(encode(negs, "passage") if negs else (None, None)), [len(ns) for _, _, ns in pairs])  # fmt: skip
        results = {}
        for name in ("drawn", "dealt"):
            batch = prepared
            if name == "dealt":
                batch, results["rank_tokens"] = deal_by_tokens(prepared, encoder.tokenizer)
            module.zero_grad()
            # rank 1 drew no hard negatives: it must still join the negatives' all-gather
            loss, _ = module(*batch[:6])
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            dist.all_reduce(grad)
            real = [[row[m.bool()].tolist() for row, m in zip(*batch[k : k + 2])] if batch[k] is not None else []
                    for k in (0, 2, 4)]  # fmt: skip
            results[name] = {"loss": mean_loss / 2, "grad": grad / 2, "real": real, "negs": batch[6]}
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(results, fh)
    finally:
        dist.destroy_process_group()


def test_deal_by_tokens_balances_ranks_and_keeps_loss_and_gradients(tmp_path, shared_data):
    """Two gloo ranks: rank 0 drew the long pairs and every hard negative. After the deal the ranks'
    real tokens are near-equal, each pair kept its negatives, and the loss and gradients over the
    global batch are unchanged (a rank without negatives still joins the negatives' all-gather)."""
    import pickle

    cache = str(tmp_path / "cache")
    load_dual_encoder(ModelConfig(name="tiny", cache_dir=cache))  # builds and caches the tokenizer
    torch.multiprocessing.spawn(
        _deal_worker, args=(str(tmp_path / "pg"), cache, str(tmp_path)), nprocs=2, join=True
    )
    res = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    before, after = res[0]["rank_tokens"][:2], res[0]["rank_tokens"][2:]
    assert res[1]["rank_tokens"] == res[0]["rank_tokens"]
    assert sum(before) == sum(after)
    assert abs(after[0] - after[1]) < 0.25 * abs(before[0] - before[1]), (before, after)

    def triples(name):  # (query, passage, its negatives) of every rank, as token lists
        out = []
        for r in res:
            q, p, n = r[name]["real"]
            starts = np.cumsum([0, *r[name]["negs"]])
            out += [(q[i], p[i], n[starts[i] : starts[i + 1]]) for i in range(len(q))]
        return sorted(map(repr, out))

    assert triples("drawn") == triples("dealt")
    assert [len(r["dealt"]["negs"]) for r in res] == [4, 4]
    for r in res:
        torch.testing.assert_close(r["dealt"]["loss"], r["drawn"]["loss"], rtol=1e-5, atol=1e-6)
        # other pairs per rank = other float summation orders: a few near-zero entries differ in the 6th digit
        torch.testing.assert_close(r["dealt"]["grad"], r["drawn"]["grad"], rtol=1e-4, atol=1e-5)
    assert res[0]["drawn"]["grad"].abs().sum() > 0


# ---------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_zero2_lowers_loss_skips_nan_step_and_exports(ray_local, tmp_path, shard_dir, heldout_pairs):
    cfg = tiny_config(
        tmp_path,
        shard_dir,
        "run.name=zero2",
        "deepspeed.zero_stage=2",
        "run.max_steps=20",
        "run.checkpoint_every=0",
        "run.nan_policy=skip",
        "run.debug_nan_at_step=4",
        "run.wise_ft=0.75",  # the run's model is WiSE-FT's; the tuned weights are kept in model_tuned/
    )
    result = train(cfg)
    assert result.steps == 20 and result.metrics["skipped_steps"] == 1
    steps = [h["step"] for h in result.history]
    assert steps == list(range(1, 21))
    assert [h["step"] for h in result.history if h["skipped"]] == [4]  # the NaN step: no update
    assert all(h["batches"] for h in result.history if not h["skipped"])
    for h in result.history:
        assert np.isfinite(h["loss"]) and h["pairs_per_s"] > 0 and h["langs"]
        assert h["strategy"] in ("x-x-mono", "x-y")
        if not h["skipped"]:  # where the step's time went
            phases = [h[f"time_{k}_s"] for k in ("data", "forward", "sync", "backward", "optimizer")]
            assert min(phases) >= 0 and h["time_forward_s"] > 0 and sum(phases) <= h["step_time_s"]
    assert {h["strategy"] for h in result.history} == {"x-x-mono", "x-y"}  # hybrid: both kinds of batch
    assert {h["malloc_mmap_max"] for h in result.history} == {"0"}  # run.keep_freed_memory reached the workers
    # run.torch_threads=0: Ray's OMP_NUM_THREADS for a worker of <= 1 CPU, not the machine's cores (torch
    # imported in a worker before Ray sets it — e.g. by a setup hook — would have taken those)
    assert {h["torch_threads"] for h in result.history} == {1}
    # run.balance_tokens: the ranks' real tokens after the deal are closer than as drawn, on average
    spread = np.array([[abs(r[0] - r[1]), abs(r[2] - r[3])] for r in (h["rank_tokens"] for h in result.history)])
    assert spread[:, 1].mean() < 0.5 * spread[:, 0].mean(), spread
    lrs = [h["lr"] for h in result.history]  # linear warmup (5 updates, from 0) then linear decay
    assert lrs[0] == 0 and max(lrs) == pytest.approx(cfg.optim.lr) and lrs[-1] < lrs[10] < max(lrs)

    before = initial_model_loss(cfg, shard_dir, heldout_pairs)
    trained = load_dual_encoder(ModelConfig(name=result.model_path))
    after = heldout_loss(trained, heldout_pairs)
    assert after < before - 0.2, (before, after)
    # run.wise_ft: the run's model is 0.75·tuned + 0.25·start, weight for weight
    assert Path(result.model_path) == Path(result.run_dir) / "model"
    tuned = load_dual_encoder(ModelConfig(name=str(Path(result.run_dir) / "model_tuned"))).backbone.state_dict()
    texts = tokenizer_texts(shard_dir, cfg.model.tiny_sample_records)
    start = load_dual_encoder(cfg.model, train_texts=texts).backbone.state_dict()
    moved = 0
    for key, value in trained.backbone.state_dict().items():
        if value.is_floating_point() and key in start:
            assert torch.allclose(value, 0.75 * tuned[key] + 0.25 * start[key], atol=1e-6), key
            moved += not torch.equal(tuned[key], start[key])
    assert moved, "training changed no weight: the interpolation check above is vacuous"

    # The exported dir is a sentence-transformers model with the trained encoder's embeddings.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(result.model_path, device="cpu")
    texts = [p[0] for p in heldout_pairs[:8]]
    ours = trained.encode(texts, "query")
    theirs = st.encode(texts, prompt=trained.prefix("query"), normalize_embeddings=True)
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.999


@pytest.mark.slow
def test_zero3_worker_killed_resumes_from_last_checkpoint(ray_local, tmp_path, shard_dir, heldout_pairs):
    every, kill_at, max_steps = 6, 9, 16
    cfg = tiny_config(
        tmp_path,
        shard_dir,
        "run.name=zero3",
        "deepspeed.zero_stage=3",
        f"run.max_steps={max_steps}",
        f"run.checkpoint_every={every}",
        "run.keep_checkpoints=2",
        "run.max_failures=1",
        f"run.debug_kill_at_step={kill_at}",
        "run.debug_kill_rank=1",
    )
    result = train(cfg)
    assert (Path(result.run_dir) / ".debug_killed").exists()  # rank 1 really was SIGKILLed
    assert result.steps == max_steps

    attempts = list(dict.fromkeys(h["attempt"] for h in result.history))
    assert len(attempts) == 2, attempts
    first = [h for h in result.history if h["attempt"] == attempts[0]]
    second = [h for h in result.history if h["attempt"] == attempts[1]]
    assert [h["step"] for h in first] == list(range(1, kill_at + 1))
    last_ckpt = kill_at // every * every
    assert [h["step"] for h in second] == list(range(last_ckpt + 1, max_steps + 1))
    repeated = Counter(h["step"] for h in result.history)
    assert sum(n - 1 for n in repeated.values()) <= every  # at most one checkpoint interval repeated
    # The batch stream continued where it stopped: repeated steps drew exactly the same batches.
    by_step = {h["step"]: h["batches"] for h in first}
    for h in second:
        if h["step"] in by_step:
            assert h["batches"] == by_step[h["step"]], h["step"]

    before = initial_model_loss(cfg, shard_dir, heldout_pairs)
    after = heldout_loss(load_dual_encoder(ModelConfig(name=result.model_path)), heldout_pairs)
    assert after < before - 0.1, (before, after)


@pytest.mark.slow
def test_nan_loss_error_names_the_step(ray_local, tmp_path, shard_dir):
    import ray.train

    cfg = tiny_config(
        tmp_path,
        shard_dir,
        "run.name=nan",
        "run.num_workers=2",  # ZeRO stage 0 on 2 workers (train_e5_small.yaml's): DeepSpeed's all-reduce path
        "deepspeed.zero_stage=0",
        "run.max_steps=5",
        "run.max_failures=0",
        "run.debug_nan_at_step=3",
        "run.export=false",
    )
    with pytest.raises((ray.train.TrainingFailedError, RuntimeError), match=r"non-finite loss at step 3"):
        train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "nan" / "steps.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == [1, 2] and all(np.isfinite(h["loss"]) for h in logged)


@pytest.mark.slow
def test_a_skipped_step_with_grad_accum_keeps_deepspeed_accumulation_aligned(ray_local, tmp_path, shard_dir):
    """A NaN on the second of two micro-batches, after the first was taken: the step is skipped and
    DeepSpeed's accumulation rewound, so each later optimizer step is exactly two micro-batches of one
    logical step (before, the boundary shifted by one micro-batch for the rest of the run). ZeRO-2 with
    the optimizer offloaded: its CPU gradient sums must not carry the skipped step's NaN forward."""
    cfg = tiny_config(
        tmp_path, shard_dir, "run.name=accum", "run.num_workers=1", "deepspeed.single_worker_stage=null",
        "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true", "optim.grad_accum=2", "run.max_steps=5",
        "run.checkpoint_every=0", "run.nan_policy=skip", "run.debug_nan_at_step=3", "run.export=false",
    )  # fmt: skip
    result = train(cfg)
    assert result.metrics["skipped_steps"] == 1
    logged = [h for h in result.history if not h["skipped"]]
    assert [h["step"] for h in result.history if h["skipped"]] == [3]
    assert [h["step"] for h in logged] == [1, 2, 4, 5]
    assert [h["optimizer_steps"] for h in logged] == [1, 2, 3, 4]
    assert [h["micro_steps"] for h in logged] == [2, 4, 6, 8]
    assert all(np.isfinite(h["loss"]) for h in logged)


@pytest.mark.slow
def test_bf16_training_keeps_a_learnable_temperature_in_fp32(ray_local, tmp_path, shard_dir):
    """Under precision bf16 DeepSpeed casts what it owns to bf16, where τ = 0.05 is 0.0498 and moves in
    ~1.6 % steps: the trainer keeps τ out of DeepSpeed and steps it in fp32, so a small learning rate
    moves it by a little, not by nothing or by a bf16 step. A worker killed after the checkpoint of step 2
    resumes with that checkpoint's τ (DeepSpeed never saw it): step 3 is the same τ on both attempts."""
    cfg = tiny_config(
        tmp_path, shard_dir, "run.name=bf16tau", "run.num_workers=1", "deepspeed.precision=bf16",
        "loss.learnable_temperature=true", "loss.temperature=0.05", "optim.lr=1e-4", "optim.warmup_steps=0",
        "run.export=false", "run.max_steps=4", "run.checkpoint_every=2", "run.max_failures=1",
        "run.debug_kill_at_step=3", "run.debug_kill_rank=0",
    )  # fmt: skip
    result = train(cfg)
    attempts = list(dict.fromkeys(h["attempt"] for h in result.history))
    assert len(attempts) == 2, attempts
    taus = {(h["attempt"], h["step"]): h["temperature"] for h in result.history}
    first = [taus[(attempts[0], step)] for step in (1, 2, 3)]
    assert first[0] == pytest.approx(0.05, abs=1e-7)  # the start value, exactly
    assert first[-1] != first[0] and all(abs(t - 0.05) < 2e-5 for t in first), first
    assert taus[(attempts[1], 3)] == pytest.approx(first[2], abs=1e-9)
