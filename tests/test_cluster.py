import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from hbt_ray.cluster import (
    ClusterConfigError,
    load_cluster_config,
    render_cluster_config,
    validate_cluster_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_ray_schema():
    config = load_cluster_config(ROOT / "cluster.yaml")
    prepared = validate_cluster_config(config)
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    assert {t["node_config"]["InstanceType"] for t in workers.values()} >= {"g5.12xlarge", "p4d.24xlarge"}
    assert all("max_workers" in t and "min_workers" in t for t in workers.values())
    assert "gpu" in prepared["docker"]["image"]
    assert any("pip install" in c and "hbt_ray" in c for c in prepared["setup_commands"])
    assert "~/hbt_ray" in prepared["file_mounts"]


def test_render_changes_region_and_spot_and_still_validates():
    config = load_cluster_config(ROOT / "cluster.yaml")
    on_demand = render_cluster_config(config, region="eu-west-1", spot=False)
    validate_cluster_config(on_demand)
    assert on_demand["provider"]["region"] == "eu-west-1"
    assert on_demand["provider"]["availability_zone"].startswith("eu-west-1a")
    assert all(
        "InstanceMarketOptions" not in t["node_config"] for t in on_demand["available_node_types"].values()
    )
    spot = render_cluster_config(on_demand, spot=True)
    workers = [t for n, t in spot["available_node_types"].items() if n != spot["head_node_type"]]
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)


def test_schema_rejects_a_broken_file():
    config = load_cluster_config(ROOT / "cluster.yaml")
    config["available_node_types"]["worker.a10g.4x"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_config(config)
    config = load_cluster_config(ROOT / "cluster.yaml")
    config["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_cluster_config(config)


def test_secrets_are_refused():
    config = load_cluster_config(ROOT / "cluster.yaml")
    config["setup_commands"].append("export WANDB_API_KEY=abc123")
    with pytest.raises(ClusterConfigError, match="secrets"):
        validate_cluster_config(config)


def test_ray_setup_hook_does_not_import_torch():
    # init_ray's worker_process_setup_hook runs in every Ray worker before its first task; importing torch
    # there would fix torch's thread count before Ray sets OMP_NUM_THREADS for the worker's CPUs.
    code = "import sys, hbt_ray.cluster as c; c.quiet_state_api_warnings(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
