"""The Ray cluster: :func:`init_ray` starts or joins it as hbt_ray's drivers do; the cluster file
(``cluster.yaml``): load, re-render for another region / spot setting, and validate offline against Ray's
own cluster-config schema (the same check ``ray up`` runs)::

    >>> cfg = load_cluster_config(Path(__file__).parents[1] / "cluster.yaml")
    >>> eu = validate_cluster_config(render_cluster_config(cfg, region="eu-west-1", spot=False))
    >>> eu["provider"]["region"]
    'eu-west-1'
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from hbt_ray.config import ConfigError, read_yaml

#: Keys whose values must never be written into a cluster file.
SECRET_KEY_RE = re.compile(r"(api[_-]?key|secret|password|token|aws_access_key_id|aws_secret_access_key)", re.I)


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init`` as hbt_ray's drivers call it: no dashboard (its extra dependencies are not installed),
    Ray's logging config left alone. ``address`` None joins ``$RAY_ADDRESS`` or a cluster started on this
    machine, else starts one; ``"local"`` always starts a new instance, and that one, which surely has no
    dashboard, also runs :func:`quiet_state_api_warnings` in every worker. ``kwargs`` go to ``ray.init``. It is the only ``ray.init`` call of the repo::

        init_ray("local", num_cpus=2)
    """
    import ray

    if address == "local":
        hook = f"{__name__}.quiet_state_api_warnings"
        kwargs.setdefault("runtime_env", {"worker_process_setup_hook": hook})
    ray.init(address=address, include_dashboard=False, configure_logging=False, **kwargs)


def quiet_state_api_warnings() -> None:
    """Ray worker setup hook for an instance without a dashboard, hence without the State API: Ray Train's
    PlacementGroupCleaner (one detached actor per run) asks that API every few seconds whether the run's
    controller is alive and, where it cannot, logs a warning each time — 300 lines in 7 minutes of
    ``make run``, about a check that cannot work there. Its errors still show. It runs in every worker
    process before its first task: it and this module must not import torch (that would fix torch's
    thread count before Ray sets ``OMP_NUM_THREADS`` for the worker's CPUs)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )


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
) -> dict[str, Any]:
    """A copy of ``config`` with the region (and its zones a/b/c), spot market and max workers changed."""
    out = copy.deepcopy(config)
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
    """Paths of keys that look like credentials, or values that look like AWS / W&B keys."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if SECRET_KEY_RE.search(str(key)):
                found.append(sub)
            found.extend(find_secrets(value, sub))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(find_secrets(value, f"{path}[{i}]"))
    elif isinstance(node, str):
        if re.search(r"AKIA[0-9A-Z]{16}", node) or re.search(r"WANDB_API_KEY=\S+", node):
            found.append(path)
    return found


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate like ``ray up`` does (defaults filled in, Ray's JSON schema, node-type checks), offline.

    Returns the prepared config. Raises ``jsonschema.ValidationError`` / ``ValueError`` on a bad file.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    secrets = find_secrets(config)
    if secrets:
        raise ClusterConfigError(f"cluster config holds secrets at: {', '.join(secrets)}")
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
