"""A run's own files, kept in the run's storage location (:mod:`hbt_ray.storage`) so the driver, the
tuner and a restarted worker on another node find them: rank 0's ``steps.jsonl`` (:class:`StepLog`) and
the placement group the workers ran in (:func:`remove_leftover_placement_group`); the driver's
``setup.json``, what decides the run's numbers (:func:`check_run_setup`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.config import ConfigError, differing_keys, flat, to_dict

#: The run dir's record of the placement group its workers run in (written by rank 0 at setup).
PLACEMENT_GROUP_FILE = "placement_group"


def remove_leftover_placement_group(run_dir: str | Path) -> bool:
    """Remove the placement group a run's workers ran in, if the run left it; → whether it did. A Tune
    trial stopped mid-run (ASHA) takes the Train controller down with it, and Ray Train's own cleaner
    asks the State API, i.e. the dashboard, which a local instance here does not run: the group's CPUs
    stayed reserved and the next trial waited for them forever."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = storage.join(run_dir, PLACEMENT_GROUP_FILE)
    if not storage.exists(path):
        return False
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(storage.read_text(path).strip())))
    if placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(group)
    return True


class StepLog:
    """Rank 0's ``steps.jsonl``, a JSON line per step. On a local disk (or shared mount) each line is
    appended as it comes. Object stores cannot append: the lines are kept and the whole file is
    rewritten at most every ``flush_s`` seconds, at every checkpoint and at the end; a resumed run
    continues the file it finds (a crash loses at most the lines since the last write, which the
    steps after the checkpoint then log again)."""

    def __init__(self, location: str, flush_s: float) -> None:
        self.location, self.flush_s = location, flush_s
        self.remote = storage.is_uri(location)
        self.lines: list[str] = []
        if self.remote and storage.exists(location):
            self.lines = storage.read_text(location).splitlines()
        self.last_flush, self.dirty = time.perf_counter(), False

    def append(self, line: str) -> None:
        if not self.remote:
            with open(self.location, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            return
        self.lines.append(line)
        self.dirty = True
        if time.perf_counter() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.remote and self.dirty:
            storage.write_text(self.location, "".join(f"{line}\n" for line in self.lines))
            self.last_flush, self.dirty = time.perf_counter(), False


#: The run dir's record of what decides its numbers (:func:`run_setup`), written before training starts.
SETUP_FILE = "setup.json"
#: Keys that say where a run writes, how it shows progress or how it spreads over the machines — not
#: what it computes. A resumed run may change them (and a reproduce record stays valid when they do).
WHERE_KEYS = frozenset({
    "data.shard_dir", "run.storage_path", "run.name", "run.progress", "run.log_every", "run.report_every_s",
    "run.checkpoint_every", "run.keep_checkpoints", "run.max_failures", "run.num_workers",
    "run.cpus_per_worker", "run.torch_threads", "run.prefetch_batches", "run.keep_freed_memory", "run.export",
    "run.use_gpu", "run.placement_strategy", "run.debug_kill_at_step", "run.debug_kill_rank",
    "model.cache_dir", "data.download",
})  # fmt: skip
#: The evaluation keys of the same kind (an intermediate evaluation never changes the weights anyway).
WHERE_EVAL_KEYS = frozenset({"batch_size", "concurrency", "cpus_per_actor", "actor_threads", "num_gpus",
                             "cache_dir", "show_progress", "num_shards", "search_mode", "shard_num_cpus",
                             "download"})  # fmt: skip


def run_setup(cfg: Any) -> dict[str, Any]:
    """What decides a training run's numbers: its config, flat (``optim.lr``), without the keys of
    :data:`WHERE_KEYS` and :data:`WHERE_EVAL_KEYS`, as JSON gives it back."""
    setup = {k: v for k, v in flat(to_dict(cfg)).items()
             if k not in WHERE_KEYS and not (k.startswith("eval.") and k.split(".")[1] in WHERE_EVAL_KEYS)}  # fmt: skip
    if setup.get("run.epochs") is not None or setup.get("run.pairs") is not None:  # max_steps follows from them
        setup.pop("run.max_steps", None)
    return json.loads(json.dumps(setup))


def check_run_setup(cfg: Any, run_dir: str) -> None:
    """A run dir that holds a run continues only as the same run: ConfigError naming the first key whose
    value differs (Ray Train would resume the old checkpoint and train nothing, or fail), or naming the
    run when it records no setup. Nothing there: nothing to check."""
    fresh = "resume it with its own settings, or start another run (run.name=…) or replace it (--overwrite)"
    path = storage.join(run_dir, SETUP_FILE)
    if not storage.exists(path):
        if storage.exists(storage.join(run_dir, "steps.jsonl")):
            raise ConfigError(f"run.name: {run_dir} holds a run without {SETUP_FILE} (what it ran with is "
                              "unknown): start another run (run.name=…) or replace it (--overwrite)")  # fmt: skip
        return
    then, now = json.loads(storage.read_text(path)), run_setup(cfg)
    for key in differing_keys(then, now)[:1]:
        raise ConfigError(f"{key}: the run in {run_dir} ran with {then.get(key, '(unset)')!r}, now "
                          f"{now.get(key, '(unset)')!r}: {fresh}")  # fmt: skip


def write_run_setup(cfg: Any, run_dir: str) -> None:
    storage.write_text(storage.join(run_dir, SETUP_FILE), json.dumps(run_setup(cfg), indent=1, sort_keys=True))


def clear_run(run_dir: str) -> None:
    """``--overwrite``: remove what an earlier run left in ``run_dir`` (checkpoints, model, run files),
    keeping ``shards/`` (folders keyed by their data: still valid, and this run's were just written)."""
    if storage.exists(run_dir):
        for name in storage.listdir(run_dir):
            if name != "shards":
                storage.remove(storage.join(run_dir, name))


#: Written by the driver on the first Ctrl-C (:func:`request_stop`): the workers checkpoint and stop.
STOP_FILE = ".stop_requested"


def request_stop(run_dir: str) -> None:
    storage.write_text(storage.join(run_dir, STOP_FILE), f"stop requested at {time.time():.0f}\n")


def stop_requested(run_dir: str, rank: int, device: Any) -> bool:
    """Whether the driver asked the run to stop: rank 0 looks, every rank gets its answer (a broadcast),
    so all ranks stop after the same step. A collective: every rank calls it at the same steps."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([rank == 0 and storage.exists(storage.join(run_dir, STOP_FILE))], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to(device)
        dist.broadcast(flag, 0)
    return bool(flag.item())


@contextlib.contextmanager
def stop_on_interrupt(run_dir: str) -> Iterator[None]:
    """While training runs: the first Ctrl-C asks the workers to checkpoint and stop (:data:`STOP_FILE`),
    the second aborts as Ctrl-C does. Outside the main thread (a Tune trial) signals are not ours: a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first_interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, previous)
        request_stop(run_dir)
        print("[hbt_ray.train] Ctrl-C: the workers save a checkpoint at the next logged step and stop "
              "(Ctrl-C again to abort)", file=sys.stderr, flush=True)  # fmt: skip

    previous = signal.signal(signal.SIGINT, first_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def debug_kill(run: Any, step: int, rank: int, run_dir: str, flush: Any = None) -> None:
    """The test hook ``run.debug_kill_at_step`` / ``run.debug_kill_rank``: SIGKILL this worker after that
    step, once per run (a marker in the run dir lets the restarted attempt go on); ``flush`` first
    (rank 0's steps log)."""
    if run.debug_kill_at_step is None or step != run.debug_kill_at_step or rank != run.debug_kill_rank:
        return
    marker = storage.join(run_dir, ".debug_killed")
    if storage.exists(marker):
        return
    if flush is not None:
        flush()
    storage.write_text(marker, f"rank {rank} killed after step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)
