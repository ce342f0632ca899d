"""Behaviour pinned across refactors: the batch stream and the first training losses do not change.

Written before the stage-package redesign and kept after it: the hashes of the batch stream (two ranks,
three strategies, real DDTP shards through Ray Data) and the losses of six tiny training steps (two gloo
workers, ZeRO-2, real Ray Train + DeepSpeed) must equal the values in
``tests/fixtures/behaviour_pinned.json``, recorded on the code before the move. A change that is meant
to alter the stream or the losses regenerates that file on purpose and says so in its commit:

    HBT_PIN_BEHAVIOUR=write python -m pytest -q tests/test_behaviour_pinned.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hbt_ray.config import load_config
from hbt_ray.data.shards import read_manifest, shard_paths, write_shards
from hbt_ray.data.sources import iter_pair_groups
from hbt_ray.data.streams import shard_streams
from hbt_ray.sampler import HybridBatchSampler, SamplerConfig
from hbt_ray.train import TrainConfig, train

PINNED = Path(__file__).resolve().parent / "fixtures" / "behaviour_pinned.json"
TINY_YAML = Path(__file__).resolve().parents[1] / "hbt_ray" / "configs" / "train_tiny.yaml"
STRATEGIES = ("x-x-mono", "x-y", "hybrid")
STEPS = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("pinned_shards")
    write_shards(iter_pair_groups("ddtp", limit=600), out, rows_per_shard=150, progress=False)
    return out


def _check(key: str, value) -> None:
    """Compare with the pinned value, or record it when ``HBT_PIN_BEHAVIOUR=write``."""
    pinned = json.loads(PINNED.read_text()) if PINNED.exists() else {}
    if os.environ.get("HBT_PIN_BEHAVIOUR") == "write":
        pinned[key] = value
        PINNED.write_text(json.dumps(pinned, indent=2, sort_keys=True) + "\n")
        return
    assert key in pinned, f"{PINNED} has no {key}: record it with HBT_PIN_BEHAVIOUR=write"
    if isinstance(value, list):
        assert value == pytest.approx(pinned[key], rel=1e-6, abs=1e-7), key
    else:
        assert value == pinned[key], key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_stream_of_two_ranks_is_unchanged(ray_local, shards, strategy):
    manifest = read_manifest(shards)
    cfg = SamplerConfig(strategy=strategy, alpha=0.5, batch_size=16, buffer_groups=64, seed=3, max_negatives=1)
    digest = hashlib.sha256()
    for rank in range(2):
        sampler = HybridBatchSampler(
            cfg, shard_streams(shard_paths(shards), rank, 2, seed=cfg.seed), rank, 2,
            dict(manifest.pairs_per_lang), num_groups=manifest.groups,
        )  # fmt: skip
        try:
            for _ in range(STEPS):
                batch = sampler.next_batch()
                for texts in (batch.queries, batch.passages, batch.query_langs, batch.passage_langs):
                    digest.update("\x1f".join(texts).encode("utf-8") + b"\x1e")
                for negs in batch.negatives:
                    digest.update("\x1f".join(negs).encode("utf-8") + b"\x1d")
        finally:
            sampler.close()
    _check(f"batch_stream/{strategy}", digest.hexdigest())


@pytest.mark.slow
def test_losses_of_six_tiny_training_steps_are_unchanged(ray_local, shards, tmp_path):
    cfg = load_config(
        TrainConfig,
        TINY_YAML,
        [f"run.storage_path={tmp_path}", f"data.shard_dir={shards}", "run.progress=false", "run.max_steps=6",
         "run.checkpoint_every=0", "run.export=false", "optim.warmup_steps=2",
         "data.limit_groups=600", "data.rows_per_shard=150"],  # the fixture's data, written by train() itself
    )  # fmt: skip
    result = train(cfg)
    losses = [round(float(h["loss"]), 7) for h in result.history]
    assert len(losses) == 6
    _check("tiny_train/losses", losses)


@pytest.mark.parametrize("strategy", ("hybrid", "x-y"))
def test_batch_stream_across_pass_boundaries_is_unchanged(shared_data, strategy):
    """A stream that wraps around many times (a split barely larger than the buffer), so rows wait for
    their group to leave the buffer at every pass boundary; resumed from a state saved while rows wait.
    Pinned before the waiting rows got their heap (033290f)."""
    from hbt_ray.data.pairs import read_pairs
    from hbt_ray.sampler import count_pairs

    rows = [g.to_row() for g in list(read_pairs(shared_data / "ddtp" / "pairs.jsonl.gz", progress=False))[:300]]
    counts, n = count_pairs(rows)
    cfg = SamplerConfig(strategy=strategy, alpha=0.5, batch_size=32, buffer_groups=256, seed=5)

    def sampler():
        return HybridBatchSampler(cfg, lambda _pass: iter(rows), 0, 1, counts, num_groups=n)

    first, digest, waits_at_save = sampler(), hashlib.sha256(), None
    for step in range(80):
        if step == 40:
            state = first.state_dict()
            waits_at_save = len(state["deferred"])
        batch = first.next_batch()
        digest.update("\x1f".join(batch.group_ids + batch.query_langs + batch.passage_langs).encode() + b"\x1e")
    stats = first.stats()
    assert stats["stream_waits"] > 0 and stats["stream_passes"] >= 4 and waits_at_save, (stats, waits_at_save)
    resumed = sampler()
    resumed.load_state_dict(state)
    first_again = sampler()
    for _ in range(40):
        first_again.next_batch()
    for _ in range(40):  # the resumed sampler continues exactly as the uninterrupted one
        assert resumed.next_batch().group_ids == first_again.next_batch().group_ids
    pinned = f"{digest.hexdigest()} waits={stats['stream_waits']} passes={stats['stream_passes']}"
    _check(f"batch_stream_wrapping/{strategy}", pinned)
