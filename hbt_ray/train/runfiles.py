"""Rank 0's run files, kept in the run's storage location (:mod:`hbt_ray.storage`) so the driver, the
tuner and a restarted worker on another node find them: ``steps.jsonl`` (:class:`StepLog`) and the
placement group the workers ran in (:func:`remove_leftover_placement_group`)."""

from __future__ import annotations

import time
from pathlib import Path

from hbt_ray import storage

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
