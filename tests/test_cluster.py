import importlib.metadata
import os
import re
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
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "hbt_ray" in c for c in prepared[key]), key
    assert "~/hbt_ray/hbt_ray" in prepared["file_mounts"]


def _torch_pin() -> str:
    makefile = (ROOT / "Makefile").read_text()
    return re.search(r"^TORCH_SPEC \?= (torch==\S+)$", makefile, re.M).group(1)


def test_gpu_workers_pin_an_image_whose_cuda_is_the_torch_builds():
    """The GPU image's CUDA, the CUDA of the torch wheel the workers install, and the torch release the
    Makefile pins: one set, not three guesses (an image's ``-gpu`` alias moves with Ray's releases)."""
    config = load_cluster_config(ROOT / "cluster.yaml")
    docker = config["docker"]
    cuda = re.fullmatch(r"rayproject/ray:[\d.]+-py\d+-cu(\d+)", docker["worker_image"]).group(1)
    assert docker["image"] == docker["worker_image"] and docker["head_image"].endswith("-cpu")
    installs = [c for c in config["worker_setup_commands"] if re.search(r"pip install .*\btorch==", c)]
    assert len(installs) == 1, config["worker_setup_commands"]
    assert f"{_torch_pin()} --index-url https://download.pytorch.org/whl/cu{cuda}" in installs[0]
    head = [c for c in config["head_setup_commands"] if "torch==" in c]
    assert len(head) == 1 and f"{_torch_pin()} --index-url https://download.pytorch.org/whl/cpu" in head[0]
    ray_version = re.search(r"ray:([\d.]+)-", docker["worker_image"]).group(1)
    assert ray_version == importlib.metadata.version("ray")  # the image runs the Ray the drivers import


def test_gpu_worker_setup_fails_without_cuda():
    """The worker's CUDA check, run as the node's shell would run it, on this machine (no GPU): it must
    fail the setup (a non-zero exit, so `ray up` stops that node), not print and go on."""
    config = load_cluster_config(ROOT / "cluster.yaml")
    checks = [c for c in config["worker_setup_commands"] if "torch.cuda.is_available()" in c]
    assert len(checks) == 1
    import torch

    assert not torch.cuda.is_available()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", "-c", checks[0]], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "torch.cuda.is_available() is False on a GPU node" in proc.stderr


def test_the_storage_is_set_once_for_every_node_and_rendered():
    config = load_cluster_config(ROOT / "cluster.yaml")
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert sum("HBT_STORAGE=" in c for c in starts) == 2
    rendered = render_cluster_config(config, storage="s3://team-bucket/hbt")
    validate_cluster_config(rendered)
    starts = [c for c in rendered["head_start_ray_commands"] + rendered["worker_start_ray_commands"] if "ray start" in c]
    assert all("HBT_STORAGE=s3://team-bucket/hbt;" in c for c in starts), starts
    nfs = render_cluster_config(config, storage="/mnt/efs/hbt")
    assert all("HBT_SHARED_STORAGE=/mnt/efs/hbt" in c for c in nfs["worker_start_ray_commands"] if "ray start" in c)
    with pytest.raises(ClusterConfigError, match="neither a URI"):
        render_cluster_config(config, storage="runs")
    text = (ROOT / "cluster.yaml").read_text()
    assert "s3:ListBucket" in text and "s3:PutObject" in text  # the IAM permissions the nodes need
    proc = subprocess.run([sys.executable, "scripts/render_cluster.py", "--storage", "s3://team-bucket/hbt"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "HBT_STORAGE=s3://team-bucket/hbt" in proc.stdout, proc.stderr[-2000:]
    bad = subprocess.run([sys.executable, "scripts/render_cluster.py", "--storage", "runs"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: storage: 'runs' is neither a URI")


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
            1, c["worker_start_ray_commands"][1].replace("RAY_AUTH_MODE=token ", "")), "token auth"),
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
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:  # no key in a job's runtime env
        assert "--runtime-env-json '" not in page.read_text(), page


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


def test_the_hook_silences_the_autoscaling_requests_warning_of_a_busy_box():
    """On one machine no autoscaler reads Ray Train's resource requests; a late answer (busy CPUs) was a
    warning with a whole traceback in the run's output. Its errors still show."""
    import logging

    from ray.train.v2._internal.execution.controller import placement_group_cleaner
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    from hbt_ray.cluster import quiet_worker_logs

    quiet_worker_logs()
    for module in (client, placement_group_cleaner):
        assert not module.logger.isEnabledFor(logging.WARNING), module.logger.name
        assert module.logger.isEnabledFor(logging.ERROR), module.logger.name


@pytest.mark.slow
def test_train_cli_on_a_new_local_ray_is_quiet(tmp_path, shared_data):
    """``python -m hbt_ray.train`` starts its own Ray (the user's path: no cluster to join): no
    PlacementGroupCleaner warnings, no TrainingReport dict per report; the progress and the result
    still show."""
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "hbt_ray.train", "--config", str(ROOT / "hbt_ray/configs/train_tiny.yaml"),
           f"run.storage_path={tmp_path}", "run.num_workers=1", "run.max_steps=8", "run.report_every_s=0",
           "run.checkpoint_every=4", "data.limit_groups=300", "run.eval_every=4", "eval.langs=[en,de]",
           "eval.max_paragraphs=2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert '"steps": 8' in out.stdout
    assert "Reporting training result" not in text
    assert "PlacementGroupCleaner" not in text
    # stderr is a pipe here, as in a log file: no progress bars (each update would be a line), no Ray
    # Data lines per pass over the shards; the run's length in passes is said once
    assert "\r" not in text and "Starting execution of Dataset" not in text and "it/s]" not in text, text[-3000:]
    assert "Loading weights" not in text and "Writing model shards" not in text  # transformers' bars
    assert text.count("8 steps of 32 pairs = ") == 1 and " passes over 300 groups" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-workers", "-3"], "max_workers: -3 is below 0"),
        (["--region", "xx"], "region: 'xx' is not an AWS region name"),
        (["--storage", "s3://"], "names no bucket"),
        (["--out", "/no/such/dir/cluster.yaml"], "--out /no/such/dir/cluster.yaml: cannot write it"),
        (["--base", "BASE_BAD_SCHEMA"], ": max_workers: 'many' is not of type 'integer'"),
    ],
)
def test_render_cluster_errors_are_one_line_and_leave_the_old_file(tmp_path, capsys, args, needle):
    """Each of these ended in a traceback (Ray's schema error, an unwritable --out) or was accepted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_cluster", ROOT / "scripts" / "render_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bad_base = tmp_path / "bad.yaml"
    bad_base.write_text(re.sub(r"(?m)^max_workers: \d+$", "max_workers: many", (ROOT / "cluster.yaml").read_text()))
    args = [str(bad_base) if a == "BASE_BAD_SCHEMA" else a for a in args]
    out = tmp_path / "mine.yaml"
    out.write_text("my earlier cluster file\n")
    if "--out" not in args:
        args += ["--out", str(out)]
    assert module.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert out.read_text() == "my earlier cluster file\n"
