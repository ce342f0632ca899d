"""Resume: a sampler's state as plain, picklable data (step, stream position, buffer, deferred rows,
reservoirs, counters) and its restoration, so that the steps after it are reproduced exactly."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .buffer import GroupBuffer
from .config import SamplerConfig
from .stats import SamplerStats

#: Config keys that change the batch stream: a state saved under other values is refused.
_STREAM_KEYS = (
    "strategy",
    "alpha",
    "batch_size",
    "lang_temperature",
    "languages",
    "lang_pairs",
    "seed",
    "buffer_groups",
    "shuffle",
    "on_short",
    "source_weights",
)


def _plain(value: Any) -> Any:
    """Row values as plain Python (Ray rows may hold numpy arrays)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def state_dict(
    cfg: SamplerConfig, rank: int, world_size: int, step: int, buf: GroupBuffer, stats: SamplerStats
) -> dict[str, Any]:
    slots = np.flatnonzero(buf.alive).tolist()
    unique: dict[str, int] = {}  # a group is in the reservoir of each of its languages: stored once
    reservoir_rows: list[Any] = []
    reservoirs = []
    buf.flush_log()
    for res in buf.reservoir:
        idx = []
        for row in res.rows:
            i = unique.get(row["group_id"])
            if i is None:
                i = unique[row["group_id"]] = len(reservoir_rows)
                reservoir_rows.append(_plain(dict(row)))
            idx.append(i)
        reservoirs.append(idx)
    return {
        "version": 2,
        "config": dataclasses.asdict(cfg),
        "rank": rank,
        "world_size": world_size,
        "step": step,
        "stream_pass": buf.stream_pass,
        "stream_pos": buf.stream_pos,
        "arrivals": buf.arrivals,
        "buffer": [(s, int(buf.arrival[s]), _plain(dict(buf.rows[s]))) for s in slots],
        "deferred": [_plain(dict(row)) for row in buf.deferred.rows()],
        "reservoir_rows": reservoir_rows,
        "reservoirs": reservoirs,
        "stats": stats.state(),
    }


def check_state(state: dict[str, Any], cfg: SamplerConfig, rank: int, world_size: int) -> None:
    """Refuse a state of another version, rank or batch stream."""
    if state.get("version") not in (1, 2):  # 1: before the reservoirs (they start empty)
        raise ValueError(f"sampler state: unknown version {state.get('version')!r}")
    if (state["rank"], state["world_size"]) != (rank, world_size):
        raise ValueError(
            f"sampler state is for rank {state['rank']}/{state['world_size']}, not {rank}/{world_size}"
        )
    mine = dataclasses.asdict(cfg)
    for key in _STREAM_KEYS:
        if state["config"].get(key) != mine[key]:
            raise ValueError(
                f"sampler state: sampler.{key} was {state['config'].get(key)!r}, now {mine[key]!r}"
            )


def load_buffer(buf: GroupBuffer, state: dict[str, Any]) -> None:
    """Put the saved buffer, deferred rows, reservoirs and stream position back into ``buf``."""
    buf.release(np.arange(buf.alive.shape[0]), keep=False)
    buf.in_buffer.clear()
    buf.seek(int(state["stream_pass"]), int(state["stream_pos"]))
    pids, filled = [], []
    for slot, arrival, row in state["buffer"]:
        pids.append(buf.lang_plan(row["langs"], row["group_id"])[2])
        buf.rows[slot] = row
        buf.ids[slot] = row["group_id"]
        buf.qs[slot] = row["queries"]
        buf.ps[slot] = row["passages"]
        buf.in_buffer.add(row["group_id"])
        buf.arrival[slot] = arrival
        filled.append(slot)
    buf.arrivals = int(state["arrivals"])
    buf.index_slots(filled, pids)
    buf.deferred.load(state["deferred"], buf.in_buffer)
    buf.drop_log()
    rows = state.get("reservoir_rows", [])
    for res, idx in zip(buf.reservoir, state.get("reservoirs", [[] for _ in buf.reservoir])):
        res.load([rows[i] for i in idx], buf._usable)
