"""One rank's buffer of pair groups: the endless stream it reads (pass after pass), admission (a group
is never twice in the buffer), per-language indices of the slots, and the reservoirs of recently used
groups that a rare language is recycled from."""

from __future__ import annotations

from typing import Any

import numpy as np

from hbt_ray.data.records import DataError, PairGroup

from .config import RESERVOIR_MIN, SamplerConfig, StreamFactory
from .deferred import DeferredRows
from .reservoir import Reservoir
from .stats import SamplerStats

#: Used groups logged before every reservoir takes its entries (:meth:`GroupBuffer.catch_up`).
RESERVOIR_LOG = 4096

#: (language indices, positions in the row lists, id of the plan's row in the plan table)
Plan = tuple[tuple[int, ...], tuple[int, ...], int]


class GroupBuffer:
    """Slots ``[0, buffer_groups)`` hold the buffered groups; ``per_rank`` spare slots after them hold
    groups recycled for one step. Per slot the row, its group id, its query / passage lists and, per
    language, the position of that language in the row's lists (-1: absent)."""

    def __init__(
        self,
        cfg: SamplerConfig,
        stream_factory: StreamFactory,
        rank: int,
        per_rank: int,
        langs: list[str],
        all_data_langs: set[str],
        pair_w: np.ndarray | None,
        stats: SamplerStats,
        sources: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.stats = stats
        self.langs = langs
        self.lang_index = {lang: i for i, lang in enumerate(langs)}
        self._all_data_langs = all_data_langs
        self._pair_w = pair_w
        self._stream_factory = stream_factory
        n_langs = len(langs)
        size = cfg.buffer_groups + per_rank
        self.rows: list[Any] = [None] * size
        self.ids: list[str | None] = [None] * size
        self.lang_pos = np.full((size, n_langs), -1, dtype=np.int16)  # slot × lang → index in row lists
        self.has = np.zeros((n_langs, size), dtype=bool)  # lang × slot (contiguous per language)
        self.alive = np.zeros(size, dtype=bool)
        # with sampler.source_weights: source × slot (a row of a source not named: in none)
        self.sources = list(sources or [])
        self.source_index = {src: i for i, src in enumerate(sources)} if sources else None
        self.from_source = np.zeros((len(sources or []), size), dtype=bool)
        self.cross_ok = np.zeros(size, dtype=bool)
        self.arrival = np.zeros(size, dtype=np.int64)
        self.in_buffer: set[str] = set()
        self.arrivals = 0
        self.deferred = DeferredRows()  # stream rows whose group was still in the buffer
        self._pending: Any = None  # a row read by the fast path of refill, handed to _admit
        self.qs: list[Any] = [None] * size  # per slot: the row's queries / passages lists, its source
        self.ps: list[Any] = [None] * size
        self.source_of: list[str] = [""] * size
        self._plans: dict[tuple, Plan] = {}
        # Per plan its slot row of lang_pos and whether it can give a cross pair: a slot is indexed by
        # copying its plan's rows, not language by language.
        self._plan_pos = np.full((64, n_langs), -1, dtype=np.int16)
        self._plan_cross = np.zeros(64, dtype=bool)
        self.reservoir = [Reservoir(max(4 * per_rank, RESERVOIR_MIN)) for _ in langs]
        # Used groups wait in a log until a language's reservoir is read or the log is full; the
        # reservoir then takes its languages' entries in one slice, not one slice per step (a release
        # touches most languages, a step's draws read a few reservoirs).
        self._log_cap = max(RESERVOIR_LOG, per_rank)
        self._log_present = np.zeros((self._log_cap, n_langs), dtype=bool)
        self._log_rows: list[Any] = []
        self._log_gids: list[Any] = []
        self._log_multi: list[bool] = []
        self._log_seen = np.zeros(n_langs, dtype=np.int64)  # per language: log entries in its reservoir
        self.stream: Any = None
        self.stream_pass = 0
        self.stream_pos = 0  # rows read from the current pass
        self._pass_rows = 0  # rows yielded by the current pass so far (to detect empty streams)

    def where(self) -> str:
        return f"pass {self.stream_pass}, row {self.stream_pos}"

    def close(self) -> None:
        """Close the open stream pass (and a prefetched one): Ray Data iterators hold resources."""
        for obj in (self.stream, self._stream_factory):
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self.stream = None

    def seek(self, stream_pass: int, stream_pos: int) -> None:
        """Re-open the stream at (pass, rows read) on the next read."""
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()
        self.stream = None
        self.stream_pass, self.stream_pos = stream_pass, stream_pos
        self._pending = None

    # ------------------------------------------------------------------ stream
    def _next_row(self) -> Any:
        """The next row of the endless stream (pass after pass); None if a whole pass was empty."""
        while True:
            if self.stream is None:
                self.stream = iter(self._stream_factory(self.stream_pass))
                self._pass_rows = 0
                for _ in range(self.stream_pos):  # resume: skip rows already read
                    next(self.stream)
                    self._pass_rows += 1
            try:
                row = next(self.stream)
            except StopIteration:
                self._end_pass()
                continue
            self.stream_pos += 1
            self._pass_rows += 1
            return row

    def _end_pass(self) -> None:
        if self._pass_rows == 0:
            raise DataError(
                f"rank {self.rank}: stream pass {self.stream_pass} yielded no groups",
                f"stream of rank {self.rank}",
            )
        self.stream = None
        self.stream_pass += 1
        self.stream_pos = 0
        self.stats.passes += 1

    # ------------------------------------------------------------------ admission
    def _usable(self, row: Any) -> tuple[int, ...]:
        return self.lang_plan(row["langs"], row["group_id"])[0]

    def lang_plan(self, langs: Any, gid: Any) -> Plan:
        """(language indices, positions in the row lists) of a row's usable languages, cached per tuple."""
        key = tuple(langs)
        plan = self._plans.get(key)
        if plan is None:
            cols, poss = [], []
            for i, lang in enumerate(key):
                j = self.lang_index.get(lang)
                if j is not None:
                    cols.append(j)
                    poss.append(i)
                elif self.cfg.languages is None and lang not in self._all_data_langs:
                    raise DataError(
                        f"language {lang!r} is not in lang_counts {sorted(self._all_data_langs)}",
                        f"stream of rank {self.rank}",
                        f"group {gid}",
                    )
            pid = len(self._plans)
            if pid == len(self._plan_cross):
                self._plan_pos = np.concatenate([self._plan_pos, np.full_like(self._plan_pos, -1)])
                self._plan_cross = np.concatenate([self._plan_cross, np.zeros_like(self._plan_cross)])
            self._plan_pos[pid] = -1  # a row of a cleared cache
            self._plan_pos[pid, cols] = poss
            if self._pair_w is None:
                self._plan_cross[pid] = len(cols) >= 2
            else:
                present = (self._plan_pos[pid] >= 0).astype(float)
                self._plan_cross[pid] = ((present @ self._pair_w) * present).sum() > 0
            plan = self._plans[key] = (tuple(cols), tuple(poss), pid)
        return plan

    def _admit(self) -> tuple[Any, Plan] | None:
        """The next (row, language plan) for the buffer: a deferred row whose group has left the buffer,
        else the next stream row. A stream row whose group is still in the buffer (the stream wrapped
        around) is deferred; with more than ``buffer_groups`` deferred rows (split smaller than the
        buffer) reading stops and None is returned."""
        deferred = self.deferred
        in_buffer = self.in_buffer
        if deferred.any_ready:
            row = deferred.take(in_buffer)
            if row is not None:
                return row, self.lang_plan(row["langs"], row["group_id"])
        while len(deferred) <= self.cfg.buffer_groups:
            row, self._pending = self._pending, None
            if row is None:
                row = self._next_row()
            if isinstance(row, PairGroup):
                row = row.to_row()
            try:
                gid = row["group_id"]
                langs = row["langs"]
                n = len(langs)
                bad = len(row["queries"]) != n or len(row["passages"]) != n
            except (KeyError, TypeError) as err:
                raise DataError(
                    f"not a pair-group row ({err!r})",
                    f"stream of rank {self.rank}",
                    f"row {self.stream_pos}",
                ) from None
            if bad:
                raise DataError(
                    "langs, queries and passages differ in length",
                    f"stream of rank {self.rank}",
                    f"group {gid}",
                )
            self.stats.groups_read += 1
            plan = self._plans.get(tuple(langs)) or self.lang_plan(langs, gid)
            if not plan[0]:
                self.stats.groups_skipped += 1  # no allowed language: skip the group
                continue
            if gid in in_buffer:
                deferred.add(row)
                self.stats.stream_waits += 1
                continue
            return row, plan
        return None

    def refill(self) -> None:
        """Fill the free slots. Hot loop (one iteration per group read): the common case (no waiting row
        ready, a known language tuple, a group not in the buffer) stays inline; the rest goes through
        :meth:`_admit`."""
        free = (~self.alive[: self.cfg.buffer_groups]).nonzero()[0]  # the spare slots stay free
        if len(free) == 0:
            return
        if len(self._plans) > 100_000:  # between refills: no plan id is held
            self._plans.clear()
        pids: list[int] = []
        filled: list[int] = []
        rows, ids, qs, ps, in_buffer = self.rows, self.ids, self.qs, self.ps, self.in_buffer
        plans = self._plans
        # the fast path reads the stream where _admit would: no waiting row is ready and reading is not
        # paused (only _admit changes either during a refill)
        fast_ok = self._fast_ok()
        fast = 0  # rows of the fast path not yet counted in the stream position and stats
        for slot in free.tolist():
            row = None
            stream = self.stream
            if fast_ok and stream is not None:
                try:
                    row = next(stream)
                except StopIteration:
                    fast = self._count_fast(fast)
                    self._end_pass()  # _admit opens the next one
                if row is not None:
                    try:
                        gid = row["group_id"]
                        langs = row["langs"]
                        queries = row["queries"]
                        passages = row["passages"]
                        plan = plans.get(tuple(langs))
                        ok = (
                            plan is not None
                            and plan[0]
                            and gid not in in_buffer
                            and len(queries) == len(langs) == len(passages)
                        )
                    except (KeyError, TypeError):
                        ok = False
                    if ok:
                        fast += 1
                    else:
                        fast = self._count_fast(fast)
                        self.stream_pos += 1
                        self._pass_rows += 1
                        self._pending = row  # the slow path checks and reports it
                        row = None
            if row is None:
                fast = self._count_fast(fast)
                admitted = self._admit()
                if admitted is None:
                    break
                fast_ok = self._fast_ok()
                row, plan = admitted
                gid, queries, passages = row["group_id"], row["queries"], row["passages"]
            pids.append(plan[2])
            rows[slot] = row
            ids[slot] = gid
            qs[slot] = queries
            ps[slot] = passages
            in_buffer.add(gid)
            filled.append(slot)
        self._count_fast(fast)
        if filled:
            self.arrival[filled] = np.arange(self.arrivals, self.arrivals + len(filled))
            self.arrivals += len(filled)
            self.index_slots(filled, pids)

    def _fast_ok(self) -> bool:
        deferred = self.deferred
        return not deferred.any_ready and len(deferred) <= self.cfg.buffer_groups

    def _count_fast(self, n: int) -> int:
        """Count ``n`` rows admitted by the fast path of :meth:`refill` as read; → 0."""
        self.stream_pos += n
        self._pass_rows += n
        self.stats.groups_read += n
        return 0

    def index_slots(self, filled: list[int], pids: list[int]) -> None:
        """Index newly filled slots: slot ``filled[i]`` holds a row of plan ``pids[i]`` (slots freed by
        :meth:`release`, so their rows of the indices are empty)."""
        if not filled:
            return
        slots = np.array(filled, dtype=np.intp)
        pid = np.array(pids, dtype=np.intp)
        pos = self._plan_pos[pid]
        self.lang_pos[slots] = pos
        self.has[:, slots] = (pos >= 0).T
        self.alive[slots] = True
        self.cross_ok[slots] = self._plan_cross[pid]
        rows, source_of = self.rows, self.source_of
        for s in filled:
            row = rows[s]
            source_of[s] = row["source"] if "source" in row else ""
        if self.source_index is not None:
            index = self.source_index
            src = np.array([index.get(source_of[s], -1) for s in filled])
            self.from_source[src[src >= 0], slots[src >= 0]] = True

    def release(self, slots: np.ndarray, keep: bool = True) -> None:
        """Free slots (their rows stay referenced until overwritten: at most buffer_groups rows); with
        ``keep``, the used groups join the reservoirs of their languages."""
        ids = self.ids
        slot_list = slots.tolist()
        gids = [ids[s] for s in slot_list]
        if keep and slot_list:  # (every alive slot has a usable language)
            present = self.lang_pos[slots] >= 0
            n, k = len(self._log_rows), len(slot_list)
            if n + k > self._log_cap:
                self.flush_log()
                n = 0
            self._log_present[n : n + k] = present
            rows = self.rows
            self._log_rows.extend([rows[s] for s in slot_list])
            self._log_gids.extend(gids)
            self._log_multi.extend((present.sum(axis=1) >= 2).tolist())
        self.in_buffer.difference_update(gids)
        if self.deferred:
            self.deferred.released(gids)
        self.alive[slots] = False
        self.cross_ok[slots] = False
        self.has[:, slots] = False
        self.from_source[:, slots] = False
        self.lang_pos[slots] = -1

    def catch_up(self, lang: int) -> Reservoir:
        """Language ``lang``'s reservoir, with the logged groups that hold it appended (in release order,
        as if each release had appended them)."""
        start, end = int(self._log_seen[lang]), len(self._log_rows)
        res = self.reservoir[lang]
        if end > start:
            # the reservoir keeps its newest entries only: older ones would be dropped as they went in
            idx = (self._log_present[start:end, lang].nonzero()[0][-res.rows.maxlen :] + start).tolist()
            if idx:
                rows, gids, multi = self._log_rows, self._log_gids, self._log_multi
                res.extend([rows[i] for i in idx], [gids[i] for i in idx], [multi[i] for i in idx])
            self._log_seen[lang] = end
        return res

    def flush_log(self) -> None:
        """Every reservoir takes its logged groups; the log starts empty."""
        for lang in range(len(self.reservoir)):
            self.catch_up(lang)
        self.drop_log()

    def drop_log(self) -> None:
        self._log_rows, self._log_gids, self._log_multi = [], [], []
        self._log_seen[:] = 0

    def recycle(
        self, rng: np.random.Generator, lang: int, n: int, taken: np.ndarray, other: int | None, source: int = -1
    ) -> np.ndarray:
        """Up to n groups of ``lang`` used before (its reservoir; with ``source`` ≥ 0 of that source only),
        not in the buffer, put into spare slots for this step (released, and so back in the reservoirs,
        with the batch)."""
        in_buffer = self.in_buffer
        name = self.sources[source] if source >= 0 else None
        rows = self.catch_up(lang).candidates(in_buffer, other, self._usable, name)
        if not rows:
            return np.zeros(0, dtype=np.int64)
        if len(rows) > n:
            if self.cfg.shuffle:
                rows = [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False).tolist())]
            else:
                rows = rows[:n]  # the least recently used first
        spare = (~self.alive[self.cfg.buffer_groups :]).nonzero()[0][: len(rows)] + self.cfg.buffer_groups
        pids = []
        for slot, row in zip(spare.tolist(), rows):
            pids.append(self.lang_plan(row["langs"], row["group_id"])[2])
            self.rows[slot], self.ids[slot] = row, row["group_id"]
            self.qs[slot], self.ps[slot] = row["queries"], row["passages"]
            in_buffer.add(row["group_id"])
        self.index_slots(spare.tolist(), pids)
        taken[spare] = True
        self.stats.recycled_pairs += len(spare)
        return spare.astype(np.int64)
