"""The Ray cluster: :func:`init_ray` starts or joins it as hbt_ray's drivers do; the cluster file
(``cluster.yaml``): load, re-render for another region / spot setting, and validate offline against Ray's
own cluster-config schema (the same check ``ray up`` runs)::

    >>> cfg = load_cluster_config(Path(__file__).parents[1] / "cluster.yaml")
    >>> eu = render_cluster_config(cfg, region="eu-west-1", spot=False)
    >>> eu["provider"]["availability_zone"]
    'eu-west-1a,eu-west-1b,eu-west-1c'
    >>> find_secrets(eu), find_exposures(eu)
    ([], [])

``validate_cluster_config(eu)`` then runs Ray's own checks (``tests/test_cluster.py``).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any

from hbt_ray.config import NO_BARS_ENV, ConfigError, read_yaml

#: Keys whose values must never be written into a cluster file.
SECRET_KEY_RE = re.compile(r"(api[_-]?key|secret|password|token|aws_access_key_id|aws_secret_access_key)", re.I)


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init`` as hbt_ray's drivers call it: no dashboard (its extra dependencies are not installed),
    Ray's logging config left alone. ``address`` None joins ``$RAY_ADDRESS`` or a cluster started on this
    machine, else starts one; ``"local"`` always starts a new instance. A new instance, which surely has
    no dashboard, also runs :func:`quiet_worker_logs` in every worker. ``kwargs`` go to ``ray.init``. It
    is the only ``ray.init`` call of the repo::

        init_ray("local", num_cpus=2)
    """
    import ray

    from hbt_ray.storage import worker_env

    if starts_new_instance(address):
        hook = f"{__name__}.quiet_worker_logs"
        kwargs.setdefault("runtime_env", {"worker_process_setup_hook": hook})
    env = worker_env()  # the storage endpoint and shared mounts: every task and actor reaches the same storage
    if os.environ.get(NO_BARS_ENV) == "1":  # the driver writes to a file: no bars anywhere, and no Ray Data
        env.update({NO_BARS_ENV: "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # bars or a few log lines
                    "RAY_DATA_LOG_LEVEL": "WARNING",  # per dataset run (every pass over the shards)
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1"})  # nor transformers' loading and saving bars
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if env:
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
        kwargs["runtime_env"] = runtime_env
    ray.init(address=address, include_dashboard=False, configure_logging=False, **kwargs)


def starts_new_instance(address: str | None) -> bool:
    """Whether Ray started with ``address`` is a new local instance rather than a cluster joined (Ray's own
    resolution: ``$RAY_ADDRESS``, then the cluster ``ray start`` last started on this machine).

    >>> starts_new_instance("local"), starts_new_instance("10.0.0.1:6379")
    (True, False)
    """
    if address == "local":
        return True
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # Ray's private helper moved or failed: assume a cluster, add nothing
        return False


def quiet_worker_logs() -> None:
    """Ray worker setup hook for a new local instance. Three loggers talk about things that are not
    trouble there:

    - Ray Train's PlacementGroupCleaner (one detached actor per run) asks the State API, served by the
      dashboard we do not start, whether the run's controller is alive, and warns each time it cannot;
    - every Ray Train worker logs each ``ray.train.report`` with its whole ``TrainingReport`` at INFO
      (per-step detail lives in ``steps.jsonl`` and the progress bar);
    - Ray Train's controller tells the autoscaling coordinator what its workers need (no autoscaler
      reads it on one machine) and, when the answer is late because the CPUs are busy (a sweep's trials
      starting together on a small box), warns with a whole traceback.

    Their errors still show (the report logger's warnings too); the cleaner is also told its own
    cluster's address (see below). It runs in every worker process before its first task: it and this
    module must not import torch (that would fix torch's thread count before Ray sets
    ``OMP_NUM_THREADS`` for the worker's CPUs), so the report logger, named after its file, is found
    by path rather than by import."""
    import logging
    import os

    import ray

    for name in ("controller.placement_group_cleaner", "scaling_policy.autoscaling_coordinator_client"):
        logging.getLogger(f"ray.train.v2._internal.execution.{name}").setLevel(logging.ERROR)
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)
    # The cleaner looks its cluster up by address None; with another Ray instance on this machine (a
    # second sweep, an evaluation, a test session) that lookup dies with "Found multiple active Ray
    # instances" and a traceback. Name this worker's own cluster.
    if os.environ.get("RAY_ADDRESS", "") in ("", "local", "auto"):
        try:
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # not connected yet: the cleaner then resolves the address as before
            pass


class ClusterConfigError(ValueError):
    pass


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """The cluster file as a mapping (read by :func:`hbt_ray.config.read_yaml`, the one YAML reader)."""
    try:
        return read_yaml(path)
    except ConfigError as err:
        raise ClusterConfigError(str(err)) from None


def render_cluster_config(
    config: dict[str, Any],
    region: str | None = None,
    spot: bool | None = None,
    max_workers: int | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """A copy of ``config`` with the region (and its zones a/b/c), spot market, max workers or storage
    changed. ``storage`` (a URI, or an absolute path every node mounts) becomes ``HBT_STORAGE`` on every
    node; a path is also declared shared (``HBT_SHARED_STORAGE``)::

        >>> cfg = {"head_start_ray_commands": ["export RAY_AUTH_MODE=token HBT_STORAGE=s3://YOUR-BUCKET/hbt; ray start"]}
        >>> render_cluster_config(cfg, storage="s3://runs-bucket/team")["head_start_ray_commands"]
        ['export RAY_AUTH_MODE=token HBT_STORAGE=s3://runs-bucket/team; ray start']
        >>> render_cluster_config(cfg, storage="/mnt/efs/hbt")["head_start_ray_commands"]
        ['export RAY_AUTH_MODE=token HBT_STORAGE=/mnt/efs/hbt HBT_SHARED_STORAGE=/mnt/efs/hbt; ray start']
    """
    out = copy.deepcopy(config)
    if region is not None and not re.fullmatch(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+", region):
        raise ClusterConfigError(f"region: {region!r} is not an AWS region name (like eu-west-1)")
    if max_workers is not None and max_workers < 0:
        raise ClusterConfigError(f"max_workers: {max_workers} is below 0")
    if storage is not None:
        from urllib.parse import urlparse

        from hbt_ray.storage import SHARED_ENV, is_uri

        if not (is_uri(storage) or storage.startswith("/")):
            raise ClusterConfigError(f"storage: {storage!r} is neither a URI (s3://bucket/prefix) nor an "
                                     "absolute path of a mount every node shares")  # fmt: skip
        if is_uri(storage) and not urlparse(storage).netloc:
            raise ClusterConfigError(f"storage: {storage!r} names no bucket (s3://bucket/prefix)")
        value = storage.rstrip("/") if is_uri(storage) else f"{storage} {SHARED_ENV}={storage}"
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            commands = out.get(key) or []
            if commands and not any("HBT_STORAGE=" in c for c in commands):
                raise ClusterConfigError(f"{key}: no `export … HBT_STORAGE=…` to set the storage in")
            out[key] = [re.sub(r"HBT_STORAGE=\S+?(?=;|\s|$)", lambda _m: f"HBT_STORAGE={value}", c) for c in commands]
    if region:
        out["provider"]["region"] = region
        out["provider"]["availability_zone"] = ",".join(f"{region}{z}" for z in "abc")
    if max_workers is not None:
        out["max_workers"] = max_workers
    if spot is not None:
        for name, node_type in out["available_node_types"].items():
            if name == out["head_node_type"]:
                continue
            node_config = node_type.setdefault("node_config", {})
            if spot:
                node_config["InstanceMarketOptions"] = {"MarketType": "spot"}
            else:
                node_config.pop("InstanceMarketOptions", None)
    return out


def find_secrets(node: Any, path: str = "") -> list[str]:
    """Paths of keys that look like credentials, or values that look like AWS / W&B keys. The keys of
    ``file_mounts`` are remote paths (``~/.ray/auth_token``), not settings: only their values count."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if SECRET_KEY_RE.search(str(key)) and path != "file_mounts":
                found.append(sub)
            found.extend(find_secrets(value, sub))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(find_secrets(value, f"{path}[{i}]"))
    elif isinstance(node, str):
        if re.search(r"AKIA[0-9A-Z]{16}", node) or re.search(r"WANDB_API_KEY=\S+", node):
            found.append(path)
    return found


def find_exposures(config: dict[str, Any]) -> list[str]:
    """What would open the cluster to others: a dashboard (whose Jobs API runs code) bound beyond
    localhost, a node that starts Ray without token authentication, or the whole working directory
    uploaded (with any stray credential file in it) instead of the package."""
    found = []
    starts = [("head_start_ray_commands", c) for c in config.get("head_start_ray_commands", [])]
    starts += [("worker_start_ray_commands", c) for c in config.get("worker_start_ray_commands", [])]
    for where, command in starts:
        if "ray start" not in command:
            continue
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        if "--head" in command and (host is None or host.group(1) not in ("127.0.0.1", "localhost")):
            found.append(f"{where}: the dashboard must listen on 127.0.0.1 (--dashboard-host=127.0.0.1)")
        if not re.search(r"RAY_AUTH_MODE=token\b", command):
            found.append(f"{where}: start Ray with token authentication (export RAY_AUTH_MODE=token)")
    for remote, local in (config.get("file_mounts") or {}).items():
        if str(local).rstrip("/") in (".", "./", "") or Path(str(local)).name in ("", ".", ".."):
            found.append(f"file_mounts[{remote}]: uploads the whole working directory; mount the package only")
    return found


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate like ``ray up`` does (defaults filled in, Ray's JSON schema, node-type checks), offline,
    and refuse secrets in the file and an exposed cluster (:func:`find_exposures`).

    Returns the prepared config. Raises ``jsonschema.ValidationError`` / ``ValueError`` on a bad file.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    secrets = find_secrets(config)
    if secrets:
        raise ClusterConfigError(f"cluster config holds secrets at: {', '.join(secrets)}")
    exposures = find_exposures(config)
    if exposures:
        raise ClusterConfigError("cluster config is not locked down: " + "; ".join(exposures))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    head = prepared["head_node_type"]
    gpu_types = [
        name
        for name, node_type in prepared["available_node_types"].items()
        if name != head and str(node_type.get("node_config", {}).get("InstanceType", "")).startswith(("g", "p"))
    ]
    if not gpu_types:
        raise ClusterConfigError("cluster config has no GPU worker node type")
    return prepared
