"""``python -m hbt_ray.data prepare``: read a source, write Parquet pair shards + manifest, print a summary.

python -m hbt_ray.data prepare --source pairs --in ../shared/data/ddtp/pairs.jsonl.gz --out runs/shards/ddtp
python -m hbt_ray.data prepare --source lareqa --in ../shared/data/lareqa/mlqa-r --out runs/shards/mlqa-r
python -m hbt_ray.data prepare --source miracl --in tests/fixtures/miracl --out runs/shards/miracl --split train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hbt_ray import storage
from hbt_ray.config import ConfigError, error_line, note_terminal
from hbt_ray.data.records import LANG_RE, BadRecords, DataError
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
    prep.add_argument(
        "--max-bad-fraction", type=float, default=0.01,
        help="--skip-bad: fail when more than this share of the records is bad (default 0.01)",
    )  # fmt: skip
    prep.add_argument("--langs", nargs="+", default=None, help="keep only these languages")
    prep.add_argument("--limit", type=int, default=None, help="stop after this many groups")
    prep.add_argument(
        "--passage", choices=["sentence", "paragraph"], default="sentence", help="LAReQA passage"
    )
    prep.add_argument("--split", default="train", help="MIRACL split (topics/qrels file suffix)")
    prep.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """What the flags alone can tell, checked before any input is read or output written."""
    if args.rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard: must be >= 1, got {args.rows_per_shard}")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ConfigError(f"--max-bad-fraction: must be in [0, 1], got {args.max_bad_fraction}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    for lang in args.langs or []:
        if not LANG_RE.match(lang):
            raise ConfigError(f"--langs: {lang!r} is not a language code (ISO 639-1/-3, e.g. en, pt-br)")
    if args.out.exists() and not args.out.is_dir():
        raise DataError("--out exists and is not a directory", args.out)
    storage.check_writable(args.out, "--out")
    if not args.input.exists():
        raise DataError("no such file or directory", args.input)
    if args.source == "pairs" and args.input.is_dir():
        raise DataError("is a directory: --source pairs reads one .jsonl, .jsonl.gz or .parquet file", args.input)


def prepare(args: argparse.Namespace) -> int:
    check_args(args)
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
        max_bad_fraction=args.max_bad_fraction,
    )
    print(manifest.summary_table())
    print(f"wrote {args.out}/manifest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return prepare(args)
    except (ConfigError, DataError) as err:
        message = str(err)
    # Printed once the exception is gone: it held the failed readers, whose progress bars close (and
    # clear their line) only then; printed inside, the error would share a line with a stale bar.
    return error_line(message)


if __name__ == "__main__":
    note_terminal()  # a log file or CI: no progress bars, here or in the workers
    sys.exit(main())
