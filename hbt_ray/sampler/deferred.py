"""Stream rows that wait: a row read while its group is still in the buffer (the stream wrapped around)
waits until that group has left it. The earliest waiting row whose group is out goes first, found
without scanning the waiting rows: after a pass boundary hundreds wait, and every slot of a refill
asks."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any


class DeferredRows:
    """Waiting rows in the order they were read. A row is *ready* once its group has left the buffer
    (:meth:`released`); :meth:`take` returns the earliest ready one. Every waiting row whose group is out
    of the buffer is in the ready heap (with stale entries beside it, skipped when met), so an empty heap
    means no waiting row can be admitted.

    >>> waiting = DeferredRows()
    >>> for gid in ("a", "b", "a2"):
    ...     waiting.add({"group_id": gid})
    >>> waiting.take(in_buffer={"a", "b", "a2"}) is None, len(waiting)
    (True, 3)
    >>> waiting.released(["b", "a"])
    >>> waiting.take(in_buffer={"a2"})["group_id"], waiting.take(in_buffer={"a2"})["group_id"]
    ('a', 'b')
    >>> waiting.take(in_buffer={"a2"}) is None, [row["group_id"] for row in waiting.rows()]
    (True, ['a2'])
    """

    def __init__(self) -> None:
        self._rows: dict[int, Any] = {}  # sequence number → row, in the order read
        self._seq = 0
        self._waiting: dict[Any, list[int]] = {}  # group id → its waiting rows' sequence numbers
        self._ready: list[int] = []  # heap of sequence numbers

    def clear(self) -> None:
        self._rows.clear()
        self._waiting.clear()
        self._ready.clear()

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def any_ready(self) -> bool:
        """Whether a waiting row may be admissible (False: none is)."""
        return bool(self._ready)

    def rows(self) -> list[Any]:
        """The waiting rows in the order they were read (a sampler state saves them)."""
        return list(self._rows.values())

    def add(self, row: Any) -> None:
        """A row whose group is in the buffer now."""
        seq = self._seq
        self._seq += 1
        self._rows[seq] = row
        self._waiting.setdefault(row["group_id"], []).append(seq)

    def released(self, gids: Iterable[Any]) -> None:
        """These groups have left the buffer: their waiting rows are ready."""
        waiting, ready = self._waiting, self._ready
        for gid in gids:
            for seq in waiting.get(gid, ()):
                heapq.heappush(ready, seq)

    def take(self, in_buffer: set) -> Any | None:
        """The earliest waiting row whose group is not in ``in_buffer`` (removed), or None. A ready row
        whose group came back into the buffer leaves the heap; it is pushed again when released again."""
        ready, rows = self._ready, self._rows
        while ready:
            seq = heapq.heappop(ready)
            row = rows.get(seq)
            if row is None or row["group_id"] in in_buffer:  # taken already, or its group is back
                continue
            del rows[seq]
            seqs = self._waiting[row["group_id"]]
            seqs.remove(seq)
            if not seqs:
                del self._waiting[row["group_id"]]
            return row
        return None

    def load(self, rows: Iterable[Any], in_buffer: set) -> None:
        """Replace the waiting rows by ``rows`` (in the order read), with the buffer's groups ``in_buffer``."""
        self.clear()
        for row in rows:
            self.add(row)
        self.released([gid for gid in self._waiting if gid not in in_buffer])
