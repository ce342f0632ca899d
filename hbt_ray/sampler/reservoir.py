"""Per language, the most recently used groups that hold it: drawn again when the buffer has too few
fresh ones (a small language drawn at its tempered p(L) is used more often than the stream brings it —
the upsampling ``lang_temperature`` asks for)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from itertools import compress
from typing import Any


class Reservoir:
    """One language's most recently used groups, oldest first, with each row's group id and whether it
    holds a second usable language kept beside it, so a draw filters them without touching the rows."""

    def __init__(self, size: int) -> None:
        self.rows: deque = deque(maxlen=size)
        self._gids: deque = deque(maxlen=size)
        self._multi: deque = deque(maxlen=size)

    def extend(self, rows: Iterable[Any], gids: Iterable[Any], multi: Iterable[bool]) -> None:
        self.rows.extend(rows)
        self._gids.extend(gids)
        self._multi.extend(multi)

    def load(self, rows: list[Any], usable: Callable[[Any], tuple[int, ...]]) -> None:
        """Replace the contents by ``rows`` (``usable(row)``: the row's usable language indices)."""
        self.rows.clear()
        self._gids.clear()
        self._multi.clear()
        self.extend(rows, [row["group_id"] for row in rows], [len(usable(row)) >= 2 for row in rows])

    def candidates(
        self, in_buffer: set, other: int | None, usable: Callable[[Any], tuple[int, ...]], source: str | None = None
    ) -> list[Any]:
        """The rows, oldest first, whose group is not in ``in_buffer``, each group once (its oldest
        entry), with ``other`` ≥ 0 holding that language too, with -1 any second language, and with
        ``source`` of that source only."""
        rows = list(self.rows)
        if not rows:
            return rows
        gids = list(self._gids)
        index: Iterable[int] = range(len(rows))
        mask: Any = None
        if other is not None:
            mask = self._multi if other < 0 else [other in usable(row) for row in rows]
        if source is not None:
            of_source = [(row["source"] if "source" in row else "") == source for row in rows]
            mask = of_source if mask is None else [a and b for a, b in zip(mask, of_source)]
        if mask is not None:
            gids = list(compress(gids, mask))
            index = list(compress(index, mask))
        # Built newest first, so each group keeps the index of its oldest entry.
        first = dict(zip(reversed(gids), reversed(index)))
        keep = first.keys() - in_buffer if in_buffer else first.keys()
        return [rows[i] for i in sorted(map(first.__getitem__, keep))]
