"""Checkpoints that resume exactly: DeepSpeed's engine state, plus per rank the batch stream's position
(sampler + prefetched batches) and every RNG state, reported through Ray Train.

Ray merges the directories the ranks report into one checkpoint and keeps the last
``run.keep_checkpoints``; after a failure ``ray.train.get_checkpoint()`` hands it back to the restarted
workers, and :func:`load_checkpoint` continues the batch stream where it stopped.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any, batches: Any, *, step: int, skipped: int, rank: int, world: int, metrics: dict[str, Any]
) -> None:
    """Save and report a checkpoint with ``metrics`` (a collective: every rank calls it)."""
    import ray.train
    import torch

    tag = f"step{step}"
    with tempfile.TemporaryDirectory(prefix="hbt_ckpt_") as tmp:
        tmp_path = Path(tmp)
        engine.save_checkpoint(str(tmp_path / "deepspeed"), tag=tag)
        torch.save({"sampler": batches.state_dict(), "rng": rng_state()}, tmp_path / f"rank{rank}_state.pt")
        if rank == 0:
            state = {"step": step, "tag": tag, "skipped": skipped, "world_size": world}
            (tmp_path / "trainer_state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load_checkpoint(checkpoint: Any, engine: Any, batches: Any, rank: int) -> tuple[int, int]:
    """Restore engine, batch stream and RNG states from a Ray Train checkpoint; → (step, skipped steps)."""
    import torch

    with checkpoint.as_directory() as ckpt_dir:
        ckpt = Path(ckpt_dir)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        engine.load_checkpoint(str(ckpt / "deepspeed"), tag=state["tag"])
        rank_state = torch.load(ckpt / f"rank{rank}_state.pt", weights_only=False)
        batches.load_state_dict(rank_state["sampler"])
        set_rng_state(rank_state["rng"])
        return int(state["step"]), int(state["skipped"])
