"""Throughput of the hybrid batch sampler: alone (in-memory DDTP rows) and fed by Ray Data shards.

Side by side with baselines: a naive pure-Python buffer sampler (scan the buffer per step) for the
sampler alone, and the bare Ray Data row stream (no sampler) for the streamed case.

    python scripts/bench_sampler.py [--steps 5000] [--batch-size 64] [--stream-groups 49790]

Ends with ``RESULT sampler_pairs_per_s=<n> slowest_strategy_pairs_per_s=<n> worst_ratio_vs_naive=<x>
stream_pairs_per_s=<n> stream_vs_default_gc=<x> stream_vs_prime_at_open=<x>`` (the first: hybrid; the scan
runs before and after each strategy, and a strategy's ratio is against the mean of the two): the stream
runs twice as shipped and twice each, interleaved, with Python's default collector thresholds (what the
sampler ran with before it raised them while open) and with the next pass started as soon as the current
one opens (what the stream did before ``PRIME_LEAD_ROWS``). The sampler-alone rate is pairs per
second of this process's CPU time (one core: the sampler is single-threaded; CPU time is what counts
on a shared machine); the stream rate is wall-clock (Ray Data runs in worker processes).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from hbt_ray.data import streams
from hbt_ray.data.records import PAIR_SCHEMA, data_dir
from hbt_ray.sampler import HybridBatchSampler, SamplerConfig, count_pairs, hybrid


def read_ddtp_rows(path: Path) -> list[dict]:
    rows: list[dict] = []
    cur: dict | None = None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in tqdm(f, desc="read DDTP", unit=" rec", mininterval=2):
            rec = json.loads(line)
            if cur is None or cur["group_id"] != rec["group_id"]:
                cur = {
                    "group_id": rec["group_id"],
                    "source": "ddtp",
                    "langs": [],
                    "queries": [],
                    "passages": [],
                }
                cur["negatives"] = []
                rows.append(cur)
            cur["langs"].append(rec["lang"])
            cur["queries"].append(rec["query"])
            cur["passages"].append(rec["passage"])
            cur["negatives"].append([])
    return rows


def write_row_shards(rows: list[dict], out: Path, rows_per_shard: int = 2000) -> list[Path]:
    """``rows`` as Parquet pair shards of ``rows_per_shard`` rows in ``out``; → their paths."""
    paths = []
    for i in range(0, len(rows), rows_per_shard):
        paths.append(out / f"part-{i // rows_per_shard:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[i : i + rows_per_shard], schema=PAIR_SCHEMA), paths[-1])
    return paths


def naive_pairs(
    rows: list[dict], steps: int, batch_size: int, alpha: float, buffer_groups: int
) -> tuple[float, int]:
    """The straightforward sampler: a list buffer scanned per step, random.sample, per-pair languages;
    → (CPU seconds, pairs) of the steps."""
    rng = random.Random(0)
    counts, _ = count_pairs(rows)
    langs = sorted(counts)
    weights = [counts[lang] for lang in langs]

    def stream():
        while True:
            yield from rows

    it = stream()
    buffer = [next(it) for _ in range(buffer_groups)]
    pairs = 0
    t0 = time.process_time()  # setup not timed, as for the sampler
    for _ in range(steps):
        if rng.random() < alpha:
            lang = rng.choices(langs, weights)[0]
            cands = [i for i, r in enumerate(buffer) if lang in r["langs"]]
            chosen = rng.sample(cands, min(batch_size, len(cands)))
            batch = []
            for i in chosen:
                r = buffer[i]
                j = r["langs"].index(lang)
                batch.append((r["queries"][j], r["passages"][j]))
        else:
            cands = [i for i, r in enumerate(buffer) if len(r["langs"]) >= 2]
            chosen = rng.sample(cands, min(batch_size, len(cands)))
            batch = []
            for i in chosen:
                r = buffer[i]
                a, b = rng.sample(range(len(r["langs"])), 2)
                batch.append((r["queries"][a], r["passages"][b]))
        pairs += len(batch)
        for i in chosen:
            buffer[i] = next(it)
    return time.process_time() - t0, pairs


def stream_run(shards: str, cfg: SamplerConfig, counts: dict, n: int, epochs: int) -> tuple[float, float, float, str]:
    """One sampler on the Ray Data stream of ``shards`` for ``epochs`` passes: (pairs/s wall, pairs/s
    after the first batch, seconds to the first batch, the sampler's stats line)."""
    sampler = HybridBatchSampler(cfg, streams.shard_streams(shards, 0, 1, seed=0), 0, 1, counts, num_groups=n)
    t0 = time.perf_counter()
    batches = sampler.batches(epochs * len(sampler))
    first = len(next(batches))
    t_first = time.perf_counter() - t0
    rest = epochs * len(sampler) - 1
    pairs = first + sum(len(b) for b in tqdm(batches, total=rest, desc="on stream", mininterval=2, leave=False))
    total = time.perf_counter() - t0
    sampler.close()
    return pairs / total, (pairs - first) / (total - t_first), t_first, sampler.format_stats().splitlines()[0]


def run_sampler(rows, cfg: SamplerConfig, steps: int) -> tuple[float, int]:
    """(CPU seconds, pairs) of ``steps`` batches, after the buffer is warm (setup not timed)."""
    counts, n = count_pairs(rows)
    sampler = HybridBatchSampler(cfg, lambda n_pass: iter(rows), 0, 1, counts, num_groups=n)
    for _ in sampler.batches(200):  # warm the buffer
        pass
    pairs = 0
    t0 = time.process_time()
    for batch in tqdm(sampler.batches(steps), total=steps, desc=cfg.strategy, mininterval=2, leave=False):
        pairs += len(batch)
    sec = time.process_time() - t0
    sampler.close()
    return sec, pairs


class _Tee:
    """Write to the terminal and to the report file."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, …: the terminal's (Ray asks)
        return getattr(self.streams[0], name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--buffer-groups", type=int, default=4096)
    ap.add_argument(
        "--stream-groups", type=int, default=49_790, help="groups written as shards for the stream run"
    )
    ap.add_argument("--stream-epochs", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the report (with its provenance) to this file")
    args = ap.parse_args()
    if args.out:
        sys.stdout = _Tee(sys.stdout, open(args.out, "w", encoding="utf-8"))
    from hbt_ray.provenance import load_average, provenance, provenance_lines

    default_thresholds = gc.get_threshold()  # Python's, before any sampler raised them
    print("# scripts/bench_sampler.py: the hybrid batch sampler's pairs/s (one core) vs a naive buffer scan")
    print(provenance_lines(provenance()))
    print(f"- load average at start (1/5/15 min): {load_average()} (other work on the box shows here)")

    rows = read_ddtp_rows(data_dir() / "ddtp" / "pairs.jsonl.gz")
    print(
        f"DDTP: {len(rows)} groups; batch {args.batch_size}, buffer {args.buffer_groups}, {args.steps} steps"
    )

    def naive_rate() -> float:
        sec, pairs = naive_pairs(rows, args.steps, args.batch_size, args.alpha, args.buffer_groups)
        return pairs / sec

    # side by side, interleaved: the scan runs before and after every strategy, and each ratio is taken
    # against the mean of its two neighbours (this host's speed drifts between runs)
    print(f"{'strategy':<14}{'pairs/s (CPU)':>16}{'naive baseline':>16}{'ratio':>8}")
    sampler_rate, worst_ratio, slowest = 0.0, float("inf"), float("inf")
    before = naive_rate()
    for strategy in ["hybrid", "x-x-mono", "x-y", "x-x", "hybrid-sample"]:
        cfg = SamplerConfig(
            strategy=strategy, alpha=args.alpha, batch_size=args.batch_size, buffer_groups=args.buffer_groups
        )
        sec, pairs = run_sampler(rows, cfg, args.steps)
        rate = pairs / sec
        after = naive_rate()
        naive = (before + after) / 2
        if strategy == "hybrid":
            sampler_rate = rate
        worst_ratio, slowest = min(worst_ratio, rate / naive), min(slowest, rate)
        print(f"{strategy:<14}{rate:>16,.0f}{naive:>16,.0f}{rate / naive:>8.1f}")
        before = after
    # a split just above the buffer (as a small training set meets a large buffer): at every pass
    # boundary most rows read wait for their group to leave the buffer
    small = rows[: args.buffer_groups + args.buffer_groups // 64]
    cfg = SamplerConfig(alpha=args.alpha, batch_size=args.batch_size, buffer_groups=args.buffer_groups)
    sec, pairs = run_sampler(small, cfg, args.steps)
    print(f"hybrid on a split of {len(small):,} groups (rows wait at every pass boundary): {pairs / sec:,.0f} pairs/s")

    import ray

    from hbt_ray.cluster import init_ray

    init_ray("local", num_cpus=args.cpus, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            subset = rows[: args.stream_groups]
            write_row_shards(subset, Path(tmp))
            counts, n = count_pairs(subset)
            stream = streams.shard_streams(tmp, 0, 1, seed=0)
            t0 = time.perf_counter()
            raw = sum(1 for _ in tqdm(stream(0), total=n, desc="raw stream", mininterval=2, leave=False))
            raw_rate = raw / (time.perf_counter() - t0)
            stream.close()  # drop the pass it prefetched
            cfg = SamplerConfig(
                alpha=args.alpha, batch_size=args.batch_size, buffer_groups=args.buffer_groups
            )
            # side by side, interleaved: the sampler as shipped, with Python's default collector
            # thresholds (what it ran with before it raised them; GC_YOUNG_THRESHOLD), and with the next
            # pass started as soon as the current one opens (before PRIME_LEAD_ROWS)
            sides = ("default gc", "prime at open", "shipped")
            runs: dict[str, list[tuple[float, float, float, str]]] = {side: [] for side in sides}
            shipped_threshold, shipped_lead = hybrid.GC_YOUNG_THRESHOLD, streams.PRIME_LEAD_ROWS
            for _ in range(2):
                for side in sides:
                    gc.set_threshold(*default_thresholds)
                    hybrid.GC_YOUNG_THRESHOLD = 0 if side == "default gc" else shipped_threshold
                    streams.PRIME_LEAD_ROWS = 2**62 if side == "prime at open" else shipped_lead
                    runs[side].append(stream_run(tmp, cfg, counts, n, args.stream_epochs))
            hybrid.GC_YOUNG_THRESHOLD, streams.PRIME_LEAD_ROWS = shipped_threshold, shipped_lead
            print(
                f"{f'{args.stream_epochs} epochs on shards':<34}pairs/s (wall)  after 1st batch  first batch (s)"
                "   (2 runs each)"
            )
            means = {}
            for side, results in runs.items():
                for rate, steady, t_first, _ in results:
                    print(f"{'sampler + ray data, ' + side:<34}{rate:>14,.0f}{steady:>17,.0f}{t_first:>17.1f}")
                means[side] = sum(r[0] for r in results) / len(results)
            print(f"raw Ray Data rows/s (1 pass, no sampler): {raw_rate:,.0f}")
            print(f"shipped vs default gc (mean of the runs): {means['shipped'] / means['default gc']:.2f}x")
            print(f"shipped vs prime at open (mean of the runs): {means['shipped'] / means['prime at open']:.2f}x")
            print(runs["shipped"][-1][3])  # the stats line of the last run as shipped
            print(f"- load average at end (1/5/15 min): {load_average()}")
            print(
                f"RESULT sampler_pairs_per_s={sampler_rate:.0f} slowest_strategy_pairs_per_s={slowest:.0f} "
                f"worst_ratio_vs_naive={worst_ratio:.2f} stream_pairs_per_s={means['shipped']:.0f} "
                f"stream_vs_default_gc={means['shipped'] / means['default gc']:.2f} "
                f"stream_vs_prime_at_open={means['shipped'] / means['prime at open']:.2f}"
            )
            sys.stdout.flush()
            time.sleep(2)  # let Ray Data's iterator threads of the closed passes wind down before shutdown
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
