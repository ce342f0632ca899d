"""Checkpoints that resume exactly: DeepSpeed's engine state, plus per rank the batch stream's position
(sampler + prefetched batches) and every RNG state, reported through Ray Train.

Ray merges the directories the ranks report into one checkpoint and keeps the last
``run.keep_checkpoints``; after a failure ``ray.train.get_checkpoint()`` hands it back to the restarted
workers, and :func:`load_checkpoint` continues the batch stream where it stopped.

Whoever can write the checkpoint storage must not run code in the workers that resume from it: the
per-rank state (``rank{r}_state.json``) is plain JSON, RNG states included as lists of integers, and
DeepSpeed's files are read by torch's weights-only unpickler (:func:`load_deepspeed_state`)::

    >>> seed_everything(1)
    >>> state = json.loads(json.dumps(rng_state()))  # what the file holds
    >>> first = (random.random(), float(np.random.rand()))
    >>> set_rng_state(state)
    >>> (random.random(), float(np.random.rand())) == first
    True
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hbt_ray.data.records import DataError
from hbt_ray.sampler import Batch

RANK_STATE = "rank{rank}_state.json"
RANK_STATE_FORMAT = 1


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states as plain JSON data, restored bit-exactly by
    :func:`set_rng_state`."""
    import torch

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        # This worker's own device only: Ray shares CUDA_VISIBLE_DEVICES among a node's workers, so "all
        # visible devices" is other ranks' GPUs too, and their number changes when a restart lands on
        # another node.
        device = torch.cuda.current_device()
        state["cuda_device"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    own = state.get("cuda_device")
    if own is None and state.get("cuda"):  # an older save held every visible device's state: take ours
        own = state["cuda"][device] if device < len(state["cuda"]) else None
    if own is not None:
        torch.cuda.set_rng_state(torch.tensor(own, dtype=torch.uint8), device)


def _json_default(obj: Any) -> Any:
    """numpy values a sampler row or batch may hold, as the plain numbers and lists they are."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"rank state: a {type(obj).__name__} is not plain data")


def save_rank_state(directory: Path, rank: int, batches: Any) -> Path:
    """Write this rank's batch-stream state (sampler + batches drawn ahead) and RNG states as JSON."""
    state = batches.state_dict()
    doc = {
        "format": RANK_STATE_FORMAT,
        "rank": rank,
        "sampler": state["sampler"],
        "pending": [dataclasses.asdict(b) for b in state["pending"]],
        "rng": rng_state(),
    }
    path = Path(directory) / RANK_STATE.format(rank=rank)
    path.write_text(json.dumps(doc, default=_json_default, ensure_ascii=False), encoding="utf-8")
    return path


def read_rank_state(directory: Path, rank: int) -> dict[str, Any]:
    """This rank's state from a checkpoint directory, parsed as JSON only; DataError if it is anything else
    (a pickle included: it is never unpickled)."""
    path = Path(directory) / RANK_STATE.format(rank=rank)
    if not path.is_file():
        legacy = path.with_name(f"rank{rank}_state.pt")
        why = (
            f"; its {legacy.name} (an older hbt_ray's pickle) is not loaded: a pickle runs code on load"
            if legacy.exists()
            else ""
        )
        raise DataError(f"checkpoint has no {path.name}{why}", path.parent)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"not a JSON rank state, not loaded ({err})", path) from None
    if not isinstance(doc, dict) or doc.get("format") != RANK_STATE_FORMAT or doc.get("rank") != rank:
        raise DataError(f"not a rank {rank} state of format {RANK_STATE_FORMAT}", path)
    missing = [key for key in ("sampler", "pending", "rng") if key not in doc]
    if missing:
        raise DataError(f"malformed rank state: no {', '.join(missing)}", path)
    try:
        doc["pending"] = [Batch(**b) for b in doc["pending"]]
    except TypeError as err:
        raise DataError(f"malformed rank state: pending batches ({err})", path) from None
    return doc


def save_checkpoint(
    engine: Any, batches: Any, *, step: int, skipped: int, rank: int, world: int, metrics: dict[str, Any],
    mix: dict[str, Any] | None = None, temperature: dict[str, Any] | None = None,
) -> None:
    """Save and report a checkpoint with ``metrics`` (a collective: every rank calls it); ``mix``: the
    pairs trained on so far (the same on every rank), continued by a resumed run; ``temperature``: a τ
    stepped outside DeepSpeed (hbt_ray.train.temperature), the same on every rank."""
    import ray.train

    tag = f"step{step}"
    with tempfile.TemporaryDirectory(prefix="hbt_ckpt_") as tmp:
        tmp_path = Path(tmp)
        engine.save_checkpoint(str(tmp_path / "deepspeed"), tag=tag)
        save_rank_state(tmp_path, rank, batches)
        if rank == 0:
            state = {"step": step, "tag": tag, "skipped": skipped, "world_size": world, "mix": mix or {},
                     "temperature": temperature}  # fmt: skip
            (tmp_path / "trainer_state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load_deepspeed_state(engine: Any, directory: str | Path, tag: str) -> None:
    """``engine.load_checkpoint`` with every file read by torch's weights-only unpickler.

    DeepSpeed reads its own files with ``torch.load(weights_only=False)``: a pickle planted in the
    checkpoint storage would run in every resuming worker, as the rank state's did. All of a
    (non-universal) checkpoint's files go through the engine's checkpoint engine, whose load is
    replaced here; besides tensors and containers they hold only a few plain-data classes of
    DeepSpeed's (loss scalers, the ZeRO stage, parameter slice addresses), allowed by name. Anything else
    fails to load and runs nothing."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load
    engine.load_checkpoint(str(directory), tag=tag)


def load_checkpoint(
    checkpoint: Any, engine: Any, batches: Any, rank: int
) -> tuple[int, int, dict[str, Any], dict[str, Any] | None]:
    """Restore engine, batch stream and RNG states from a Ray Train checkpoint; → (step, skipped steps,
    the mix trained on so far, the state of a τ stepped outside DeepSpeed or None).

    The rank state is read and checked first: a bad one fails before DeepSpeed loads the engine."""
    with checkpoint.as_directory() as ckpt_dir:
        ckpt = Path(ckpt_dir)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        rank_state = read_rank_state(ckpt, rank)
        load_deepspeed_state(engine, ckpt / "deepspeed", state["tag"])
        batches.load_state_dict({"sampler": rank_state["sampler"], "pending": rank_state["pending"]})
        set_rng_state(rank_state["rng"])
        return int(state["step"]), int(state["skipped"]), dict(state.get("mix") or {}), state.get("temperature")
