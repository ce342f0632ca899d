"""Per-rank streams of pair rows from Parquet shards, read lazily by Ray Data, for the batch sampler.

:func:`shard_streams` gives every training rank a disjoint, reproducible stream of pair rows (one
iterator per pass over its part of the shards); the sampler (numpy only) consumes it without knowing
about Ray. See ``hbt_ray.sampler`` for why not ``streaming_split``.
"""

from __future__ import annotations

import itertools
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hbt_ray import storage
from hbt_ray.data.records import DataError
from hbt_ray.data.shards import read_pair_parquet

#: ``factory(n)`` → the rank's n-th pass over its split (an iterable of pair rows)
StreamFactory = Callable[[int], Iterable[Any]]


def count_pairs_dataset(dataset: Any) -> tuple[dict[str, int], int]:
    """Same as :func:`count_pairs` for a ``ray.data.Dataset`` of pair rows, computed by Ray Data."""

    def per_block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts: dict[str, int] = {"": len(batch["langs"])}  # "" carries the number of groups
        for langs in batch["langs"]:
            for lang in langs:
                counts[lang] = counts.get(lang, 0) + 1
        return {"lang": np.array(list(counts), dtype=object), "n": np.array(list(counts.values()))}

    counts: dict[str, int] = {}
    for row in dataset.select_columns(["langs"]).map_batches(per_block, batch_format="numpy").iter_rows():
        counts[row["lang"]] = counts.get(row["lang"], 0) + int(row["n"])
    groups = counts.pop("", 0)
    return counts, groups


def shard_streams(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    rank: int,
    world_size: int,
    *,
    seed: int = 0,
    shuffle_files: bool = True,
    prefetch_next_pass: bool = True,
    block_bytes: int = 16 * 2**20,
) -> StreamFactory:
    """This rank's stream factory over Parquet pair shards (PAIR_SCHEMA), read lazily by Ray Data.

    Rank r reads the files ``r::world_size`` (fewer files than ranks: every rank reads all of them and
    keeps the groups with ``crc32(group_id) % world_size == r``), so the ranks' streams are disjoint in
    **every** pass. Pass n reads the files in an order shuffled by ``(seed, rank, n)`` and keeps row
    order within it (``preserve_order``), so a pass is reproducible and resume is exact. Blocks are
    at most ``block_bytes``; with ``prefetch_next_pass`` pass n+1 starts in the background before pass
    n ends (:class:`PrefetchingPasses` says when). In a training worker::

        factory = shard_streams("shards/", rank, world_size, seed=cfg.seed)
        rows = factory(0)  # an iterator of pair rows (dicts): this rank's first pass
    """
    if isinstance(shards, (str, os.PathLike)):
        root = Path(shards)
        if not root.exists():
            raise DataError("no such pair shard file or folder", root)
        paths = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    else:
        paths = [p if storage.is_uri(p) else Path(p) for p in shards]  # a URI stays one (Ray Data reads it)
    if not paths:
        raise DataError("no .parquet pair shards", shards if isinstance(shards, (str, os.PathLike)) else None)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    by_hash = len(paths) < world_size
    mine = paths if by_hash else paths[rank::world_size]

    def keep_mine(table: Any) -> Any:
        import pyarrow as pa

        ids = table.column("group_id").to_pylist()
        mask = [zlib.crc32(gid.encode("utf-8")) % world_size == rank for gid in ids]
        return table.filter(pa.array(mask, type=pa.bool_()))

    def read_pass(n_pass: int) -> Iterator[dict[str, Any]]:
        order = list(mine)
        if shuffle_files:
            perm = np.random.default_rng([seed, rank, n_pass]).permutation(len(order))
            order = [order[i] for i in perm]
        ds = read_pair_parquet(order, override_num_blocks=len(order))  # V1 path: no actor pool per pass
        ds.context.execution_options.preserve_order = True
        ds.context.target_max_block_size = block_bytes  # bounded blocks: memory independent of data size
        if by_hash:
            ds = ds.map_batches(keep_mine, batch_format="pyarrow", batch_size=None)
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from table.to_pylist()  # plain dicts and lists: cheap to index and to checkpoint

    return PrefetchingPasses(read_pass) if prefetch_next_pass else read_pass


#: Rows left in the current pass when the next one starts (or a quarter of the pass, if more): enough
#: for a Ray Data pipeline to deliver its first rows. ``scripts/bench_sampler.py`` runs the stream beside
#: one that starts the next pass as soon as the current one opens (this set beyond any pass's length).
PRIME_LEAD_ROWS = 4096


class PrefetchingPasses:
    """A stream factory that starts pass n+1 in a background thread before pass n ends.

    A Ray Data pipeline takes seconds to deliver its first row; started early, the next pass is ready
    when the sampler wraps around, so no rank stalls at a pass boundary (bounded: one primed row plus
    Ray Data's own backpressured blocks). Started too early, it reads ahead while the current pass still
    reads, on the same cores: so once a whole pass has been counted (every pass of a rank has the same
    rows), pass n+1 starts when pass n has a quarter of its rows left, at least ``lead_rows``
    (:data:`PRIME_LEAD_ROWS`), and only the first pass starts its successor at once.

    >>> passes = PrefetchingPasses(lambda n: iter(range(10 * n, 10 * n + 8)), lead_rows=3)
    >>> first = passes(0)
    >>> next(first), passes._primed[0]  # the first pass primes its successor at once
    (0, 1)
    >>> 1 + sum(1 for _ in first), passes.pass_rows
    (8, 8)
    >>> second = passes(1)
    >>> rows = [next(second) for _ in range(4)]
    >>> passes._primed is None, next(second), passes._primed[0]  # primed with 3 rows left
    (True, 14, 2)
    """

    def __init__(self, read_pass: Callable[[int], Iterator[Any]], lead_rows: int | None = None):
        self._read_pass = read_pass
        self._primed: tuple[int, threading.Thread, list] | None = None
        self._lead_rows = lead_rows
        self.pass_rows: int | None = None  # rows of a whole pass, once one has been read to its end

    def _prime(self, n_pass: int) -> None:
        if self._primed is not None:
            return
        box: list = []

        def run() -> None:
            it = iter(self._read_pass(n_pass))
            try:
                box.append((it, [next(it)]))
            except StopIteration:
                box.append((it, []))
            except BaseException as err:  # surfaced when the pass is used
                box.append((it, err))

        thread = threading.Thread(target=run, name=f"prefetch-pass-{n_pass}", daemon=True)
        thread.start()
        self._primed = (n_pass, thread, box)

    def __call__(self, n_pass: int) -> Iterator[Any]:
        primed, self._primed = self._primed, None
        if primed is not None and primed[0] == n_pass:
            primed[1].join()
            it, head = primed[2][0]
            if isinstance(head, BaseException):
                raise head
        else:
            if primed is not None:
                _close_primed(primed)
            it, head = iter(self._read_pass(n_pass)), []
        known = self.pass_rows
        lead = PRIME_LEAD_ROWS if self._lead_rows is None else self._lead_rows
        prime_at = 0 if known is None else max(0, known - max(known // 4, lead))
        return self._counted(n_pass, head, it, prime_at)

    def _counted(self, n_pass: int, head: list, it: Iterator[Any], prime_at: int) -> Iterator[Any]:
        """The pass's rows; pass n+1 is primed as the ``prime_at``-th is handed out, and the pass's
        length is kept when it is read to its end."""
        count = 0
        if prime_at == 0:
            self._prime(n_pass + 1)
        try:
            for row in itertools.chain(head, it):
                count += 1
                if count == prime_at:
                    self._prime(n_pass + 1)
                yield row
            self.pass_rows = count
            self._prime(n_pass + 1)  # a pass shorter than the last one: primed at its end
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        primed, self._primed = self._primed, None
        if primed is not None:
            _close_primed(primed)


def _close_primed(primed: tuple[int, threading.Thread, list]) -> None:
    primed[1].join()
    close = getattr(primed[2][0][0], "close", None)
    if close is not None:
        close()
