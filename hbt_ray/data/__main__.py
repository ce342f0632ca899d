"""``python -m hbt_ray.data prepare``: read a source, write Parquet pair shards + manifest, print a summary.

python -m hbt_ray.data prepare --source pairs --in ../shared/data/ddtp/pairs.jsonl.gz --out runs/shards/ddtp
python -m hbt_ray.data prepare --source lareqa --in ../shared/data/lareqa/mlqa-r --out runs/shards/mlqa-r
python -m hbt_ray.data prepare --source miracl --in tests/fixtures/miracl --out runs/shards/miracl --split train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hbt_ray.data.records import BadRecords, DataError
from hbt_ray.data.shards import write_shards
from hbt_ray.data.sources import iter_pair_groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hbt_ray.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="read a source and write pair shards + manifest.json")
    prep.add_argument("--source", required=True, choices=["lareqa", "miracl", "pairs"])
    prep.add_argument("--in", dest="input", required=True, type=Path, help="input file or directory")
    prep.add_argument("--out", required=True, type=Path, help="output shard directory")
    prep.add_argument("--rows-per-shard", type=int, default=10_000, help="groups per Parquet shard")
    prep.add_argument("--skip-bad", action="store_true", help="skip bad records (counted in the manifest)")
    prep.add_argument("--langs", nargs="+", default=None, help="keep only these languages")
    prep.add_argument("--limit", type=int, default=None, help="stop after this many groups")
    prep.add_argument(
        "--passage", choices=["sentence", "paragraph"], default="sentence", help="LAReQA passage"
    )
    prep.add_argument("--split", default="train", help="MIRACL split (topics/qrels file suffix)")
    prep.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return parser


def prepare(args: argparse.Namespace) -> int:
    bad = BadRecords(skip=args.skip_bad)
    if args.source == "miracl":
        from hbt_ray.data.miracl import read_miracl_pairs

        groups = read_miracl_pairs(args.input, langs=args.langs, split=args.split, bad=bad)
        if args.limit is not None:
            groups = (g for i, g in zip(range(args.limit), groups))
    else:
        spec = f"{'lareqa' if args.source == 'lareqa' else 'pairs'}:{args.input}"
        groups = iter_pair_groups(
            spec, langs=args.langs, limit=args.limit, passage=args.passage, bad=bad, progress=True
        )
    manifest = write_shards(
        groups,
        args.out,
        rows_per_shard=args.rows_per_shard,
        skipped=bad.counts,
        skipped_examples=bad.examples,
        source=f"{args.source}:{args.input}",
        overwrite=args.overwrite,
    )
    print(manifest.summary_table())
    print(f"wrote {args.out}/manifest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return prepare(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
