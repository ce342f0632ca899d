"""Render a copy of cluster.yaml with another region, spot setting or worker instance types, and validate it
against Ray's cluster-config schema.

    python scripts/render_cluster.py --region eu-west-1 --no-spot --storage s3://my-bucket/hbt --out my-cluster.yaml
    ray up my-cluster.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import jsonschema
import yaml

from hbt_ray.cluster import load_cluster_config, render_cluster_config, validate_cluster_config
from hbt_ray.config import error_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(Path(__file__).resolve().parents[1] / "cluster.yaml"))
    parser.add_argument("--region", default=None, help="AWS region, e.g. eu-west-1 (zones follow: a, b, c)")
    parser.add_argument("--spot", dest="spot", action="store_true", default=None, help="workers on spot")
    parser.add_argument("--no-spot", dest="spot", action="store_false", help="workers on demand")
    parser.add_argument("--max-workers", type=int, default=None)
    parser.add_argument("--storage", default=None,
                        help="where runs, shards, checkpoints, models and sweeps live: s3://bucket/prefix (or any "
                             "URI pyarrow knows), or an absolute path every node mounts (NFS/EFS); "
                             "HBT_STORAGE on every node")  # fmt: skip
    parser.add_argument("--out", default="-", help="output file (default: stdout)")
    args = parser.parse_args(argv)
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # Ray's "setting max workers …" INFO line

    try:
        config = _render(args)
    except jsonschema.ValidationError as err:  # Ray's cluster schema: the key and the first line
        where = ".".join(str(p) for p in err.absolute_path) or "cluster config"
        return error_line(f"{args.base}: {where}: {err.message}"[:500])
    except (ValueError, OSError) as err:  # ClusterConfigError, Ray's other checks, an unreadable --base
        return error_line(" ".join(str(err).split())[:500])
    text = yaml.safe_dump(config, sort_keys=False)
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    try:  # whole or not at all: an earlier file there stays until the new one is complete
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as err:
        return error_line(f"--out {args.out}: cannot write it ({err.strerror or err})")
    print(f"wrote {args.out} (validated against Ray's cluster schema)", file=sys.stderr)
    return 0


def _render(args: argparse.Namespace) -> dict:
    config = render_cluster_config(
        load_cluster_config(args.base), region=args.region, spot=args.spot, max_workers=args.max_workers,
        storage=args.storage,
    )
    validate_cluster_config(config)
    return config


if __name__ == "__main__":
    raise SystemExit(main())
