import os
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
    assert "~/hbt_ray/hbt_ray" in prepared["file_mounts"]


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


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["head_start_ray_commands"].__setitem__(
            1, c["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")), "dashboard must listen"),
        (lambda c: c["worker_start_ray_commands"].__setitem__(
            1, c["worker_start_ray_commands"][1].replace("export RAY_AUTH_MODE=token; ", "")), "token auth"),
        (lambda c: c["file_mounts"].__setitem__("~/hbt_ray", "."), "whole working directory"),
        (lambda c: c["file_mounts"].__setitem__("~/repo", "./"), "whole working directory"),
    ],
    ids=["dashboard-on-all-interfaces", "worker-without-token-auth", "mount-dot", "mount-dot-slash"],
)
def test_an_exposed_cluster_is_refused(change, message):
    config = load_cluster_config(ROOT / "cluster.yaml")
    change(config)
    with pytest.raises(ClusterConfigError, match=message):
        validate_cluster_config(config)


def test_the_cluster_file_is_locked_down():
    """The dashboard on localhost only, token auth on every node, only the package uploaded, the auth
    token file mounted (its path is no secret), no W&B key anywhere in the file."""
    config = load_cluster_config(ROOT / "cluster.yaml")
    validate_cluster_config(config)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    starts = config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "." not in config["file_mounts"].values()
    assert "--runtime-env-json '" not in (ROOT / "README.md").read_text()  # no key in a job's runtime env


def test_ray_setup_hook_does_not_import_torch():
    # init_ray's worker_process_setup_hook runs in every Ray worker before its first task; importing torch
    # there would fix torch's thread count before Ray sets OMP_NUM_THREADS for the worker's CPUs.
    code = "import sys, hbt_ray.cluster as c; c.quiet_worker_logs(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_hook_finds_ray_trains_report_logger_by_path():
    """Ray Train names that logger after its file; the hook rebuilds the name without importing it."""
    import logging

    from ray.train.v2._internal.execution import context

    from hbt_ray.cluster import quiet_worker_logs

    quiet_worker_logs()
    assert context.logger.name.endswith("context.py")
    assert context.logger.getEffectiveLevel() == logging.WARNING
    assert not context.logger.isEnabledFor(logging.INFO)


def test_train_cli_on_a_new_local_ray_is_quiet(tmp_path, shared_data):
    """``python -m hbt_ray.train`` starts its own Ray (the user's path: no cluster to join): no
    PlacementGroupCleaner warnings, no TrainingReport dict per report; the progress and the result
    still show."""
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "hbt_ray.train", "--config", str(ROOT / "hbt_ray/configs/train_tiny.yaml"),
           f"run.storage_path={tmp_path}", "run.num_workers=1", "run.max_steps=8", "run.report_every_s=0",
           "run.checkpoint_every=4", "run.export=false", "data.limit_groups=300"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert '"steps": 8' in out.stdout
    assert "Reporting training result" not in text
    assert "PlacementGroupCleaner" not in text
