"""Where the hybrid batch sampler's time goes, and what bounds it (issue 32's input-pipeline profile;
docs/performance.md quotes it).

    .venv/bin/python scripts/profile_sampler.py --out results/profile_sampler.txt

The same DDTP rows and settings as ``scripts/bench_sampler.py`` (batch 64, buffer 4096, one rank). Per
strategy, after 200 warm-up steps:

- *µs/step*: the sampler's CPU time per step, nothing instrumented;
- the step's phases, timed on the sampler's own methods (CPU time, inclusive): *refill* (stream rows
  into free slots), *draw* — of which *picks* (choosing slots per language) and *recycle* (groups taken
  again from a language's reservoir, the upsampling of rare languages) — *batch* (the Batch's lists),
  *stats* and *release* (slots freed, used groups into the reservoirs);
- *RNG only*: the random-number calls that define the batch stream (the same generators, methods and
  arguments, in the same order), replayed alone: what no implementation of this stream can go below.

And the stream's per-row floor on this CPU: Parquet decode (``pyarrow.parquet.read_table``) and
``Table.to_pylist`` of the same rows as shards, per row, in a fresh process — what every row costs
before Ray Data or the sampler touch it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import _Tee, read_ddtp_rows, write_row_shards  # noqa: E402

from hbt_ray.data.records import data_dir  # noqa: E402
from hbt_ray.sampler import HybridBatchSampler, SamplerConfig, count_pairs, draw  # noqa: E402

STRATEGIES = ["hybrid", "x-x-mono", "x-y", "x-x", "hybrid-sample"]
PHASES = ["refill", "draw", "picks", "recycle", "batch", "stats", "release"]


def _sampler(rows: list[dict], strategy: str, args: argparse.Namespace) -> HybridBatchSampler:
    counts, n = count_pairs(rows)
    cfg = SamplerConfig(strategy=strategy, alpha=0.5, batch_size=args.batch_size, buffer_groups=args.buffer_groups)
    sampler = HybridBatchSampler(cfg, lambda _pass: iter(rows), 0, 1, counts, num_groups=n)
    for _ in sampler.batches(200):  # a warm buffer and reservoirs, as in bench_sampler
        pass
    return sampler


def _timed(owner: Any, name: str, phase: str, acc: dict[str, float]) -> None:
    """Replace ``owner.name`` (on the instance: the sampler's own calls go through it) by a timed copy."""
    method = getattr(owner, name)

    @functools.wraps(method)
    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.process_time()
        try:
            return method(*a, **k)
        finally:
            acc[phase] += time.process_time() - t0

    setattr(owner, name, timed)


def phases(sampler: HybridBatchSampler, steps: int) -> dict[str, float]:
    """µs per step of each phase (inclusive CPU time of the methods)."""
    acc: dict[str, float] = defaultdict(float)
    buf, drawer = sampler._buffer, sampler._drawer
    for owner, name, phase in [(buf, "refill", "refill"), (drawer, "draw", "draw"), (drawer, "_pick", "picks"),
                               (buf, "recycle", "recycle"), (sampler, "_make_batch", "batch"),
                               (sampler._stats, "record", "stats"), (buf, "release", "release")]:  # fmt: skip
        _timed(owner, name, phase, acc)
    for _ in sampler.batches(steps):
        pass
    return {p: acc[p] / steps * 1e6 for p in PHASES}


def rng_only(sampler: HybridBatchSampler, steps: int) -> float:
    """µs per step of the stream's random-number calls alone: recorded while the sampler runs ``steps``
    steps, then replayed (best of three)."""
    log: list[tuple] = []
    real = draw.seeded_rng

    class Recording:
        def __init__(self, *words: int) -> None:
            self.g = real(*words)
            log.append(("new", words))

        def random(self, *a: Any) -> Any:
            log.append(("random", a))
            return self.g.random(*a)

        def choice(self, a: Any, *rest: Any, **kw: Any) -> Any:
            log.append(("choice", (a if isinstance(a, int) else np.array(a), *rest), kw))
            return self.g.choice(a, *rest, **kw)

    draw.seeded_rng = Recording  # the sampler's draw module looks it up at each step
    try:
        for _ in sampler.batches(steps):
            pass
    finally:
        draw.seeded_rng = real
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        g: Any = None
        for entry in log:
            if entry[0] == "new":
                g = real(*entry[1])
            elif entry[0] == "random":
                g.random(*entry[1])
            else:
                g.choice(*entry[1], **entry[2])
        best = min(best, time.process_time() - t0)
    return best / steps * 1e6


def rows_only(rows: list[dict], steps: int, k: int) -> float:
    """µs per step of the least a sampler of Python row dicts does, whatever its draws: k rows taken from
    the stream, each row's id, language, query and passage put into the batch's lists, its id into and
    out of the set of buffered groups (best of three; rows in stream order, so kinder to the CPU caches
    than a draw from a buffer of thousands)."""
    best = float("inf")
    for _ in range(3):
        it = iter(rows * (1 + steps * k // len(rows)))
        in_buffer: set = set()
        t0 = time.process_time()
        for _ in range(steps):
            taken = [next(it) for _ in range(k)]
            ids = [row["group_id"] for row in taken]
            in_buffer.update(ids)
            langs = [row["langs"][0] for row in taken]
            queries = [row["queries"][0] for row in taken]
            passages = [row["passages"][0] for row in taken]
            in_buffer.difference_update(ids)
        best = min(best, time.process_time() - t0)
        del langs, queries, passages
    return best / steps * 1e6


def arrow_floor(rows: list[dict], rows_per_shard: int = 2000) -> tuple[float, float]:
    """(decode, to_pylist) µs per row of the rows written as Parquet shards (best of two passes), measured
    in a fresh process that holds nothing else: a process holding many Python objects pays the garbage
    collector's scans of them on every allocation, which is not the rows' own cost."""
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp:
        files = write_row_shards(rows, Path(tmp), rows_per_shard)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_arrow_costs, ([str(f) for f in files],))


def _arrow_costs(files: list[str]) -> tuple[float, float]:
    decode = convert = float("inf")
    for _ in range(2):
        t0 = time.process_time()
        tables = [pq.read_table(f) for f in files]
        t1 = time.process_time()
        n = sum(len(t.to_pylist()) for t in tables)  # one table's rows alive at a time
        t2 = time.process_time()
        decode, convert = min(decode, (t1 - t0) / n * 1e6), min(convert, (t2 - t1) / n * 1e6)
        del tables
    return decode, convert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--buffer-groups", type=int, default=4096)
    ap.add_argument("--groups", type=int, default=None, help="use the first N DDTP groups (default: all)")
    ap.add_argument("--out", default=None, help="also write the report (with its provenance) to this file")
    args = ap.parse_args()
    if args.out:
        sys.stdout = _Tee(sys.stdout, open(args.out, "w", encoding="utf-8"))
    from hbt_ray.provenance import load_average, provenance, provenance_lines

    print("# scripts/profile_sampler.py: where the batch sampler's time goes, and its floors")
    print(provenance_lines(provenance()))
    print(f"- load average at start (1/5/15 min): {load_average()} (other work on the box shows here)")
    rows = read_ddtp_rows(data_dir() / "ddtp" / "pairs.jsonl.gz")[: args.groups]
    print(f"DDTP: {len(rows)} groups; batch {args.batch_size}, buffer {args.buffer_groups}, {args.steps} steps; "
          f"CPU µs per step (one core); the phases are inclusive (picks and recycle are parts of draw)")  # fmt: skip
    target = args.batch_size / 200_000 * 1e6
    floor_rows = rows_only(rows, args.steps, args.batch_size)
    head = ["strategy", "µs/step", "pairs/s", *PHASES, "RNG only", "floor", "floor pairs/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    result: dict[str, float] = {}
    for strategy in STRATEGIES:
        sampler = _sampler(rows, strategy, args)
        t0 = time.process_time()
        for _ in sampler.batches(args.steps):
            pass
        plain = (time.process_time() - t0) / args.steps * 1e6
        parts = phases(_sampler(rows, strategy, args), args.steps)
        rng = rng_only(_sampler(rows, strategy, args), args.steps)
        cells = [strategy, f"{plain:.0f}", f"{args.batch_size / plain * 1e6:,.0f}", *(f"{parts[p]:.0f}" for p in PHASES),
                 f"{rng:.0f}", f"{rng + floor_rows:.0f}", f"{args.batch_size / (rng + floor_rows) * 1e6:,.0f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
        key = strategy.replace("-", "_")
        result[f"{key}_step_us"], result[f"{key}_rng_us"] = plain, rng
    print(f"floor: the RNG calls of the stream plus the least row handling of a step ({floor_rows:.0f} µs: "
          f"{args.batch_size} rows read, their ids, languages, queries and passages listed, ids into and out of a set)")  # fmt: skip
    result["rows_only_us"] = floor_rows
    decode, convert = arrow_floor(rows)
    print(f"200k pairs/s at batch {args.batch_size} is {target:.0f} µs per step.")
    print(f"stream rows before Ray Data and the sampler: Parquet decode {decode:.1f} µs/row, to_pylist {convert:.1f} "
          f"µs/row: at most {1e6 / (decode + convert):,.0f} rows/s on one core")  # fmt: skip
    result["arrow_row_us"] = decode + convert
    print(f"- load average at end (1/5/15 min): {load_average()}")
    print("RESULT " + " ".join(f"{k}={v:.0f}" if k != "arrow_row_us" else f"{k}={v:.1f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
