"""Two Ray nodes on this machine: train the tiny preset with one worker per node, negatives gathered
across nodes.

The cluster (``ray.cluster_utils.Cluster``: a head and a worker node, 2 logical CPUs each: a
0.5-CPU train worker + Ray Data read tasks, which need a whole CPU) lives in a child
process, so it never meets the session's ``ray_local`` instance: this test runs before or after
other Ray tests in any order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from hbt_ray.config import load_config
    from hbt_ray.train import TrainConfig, train

    out = sys.argv[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 256 * 1024**2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, configure_logging=False)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cfg = load_config(TrainConfig, "hbt_ray/configs/train_tiny.yaml", [
            f"run.storage_path={out}", "run.name=multinode", "run.num_workers=2",
            "run.cpus_per_worker=0.5", "run.placement_strategy=STRICT_SPREAD", "run.max_steps=12",
            "run.checkpoint_every=0", "run.export=false", "run.progress=false", "loss.gather=true",
            "loss.hard_negatives=false",
            "sampler.batch_size=32", "data.limit_groups=600", "sampler.buffer_groups=128",
            "optim.warmup_steps=0", "optim.schedule=constant",
        ])
        result = train(cfg)
        json.dump({"cluster_nodes": nodes, "history": result.history, "steps": result.steps},
                  open(f"{out}/result.json", "w"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_nodes_one_worker_each_gathers_global_batch(tmp_path: Path, shared_data: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    # both "nodes" run on this machine and see tmp_path: declared shared, as an NFS mount would be
    env = {**os.environ, "HBT_DATA_DIR": str(shared_data), "RAY_DEDUP_LOGS": "0", "HBT_SHARED_STORAGE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True,
        timeout=600,  # 68-121 s since shards are read via Ray Data V1; 366 s before, on a slow day
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads((tmp_path / "result.json").read_text())
    history = out["history"]
    assert out["steps"] == 12 and len(history) == 12
    assert len(out["cluster_nodes"]) == 2
    # rank 0 and rank 1 ran on the two different nodes of the cluster
    node_ids = history[0]["node_ids"]
    assert len(node_ids) == 2 and len(set(node_ids)) == 2, node_ids
    assert sorted(node_ids) == out["cluster_nodes"]
    # each worker holds 16 pairs; every query was scored against the passages of both: the global batch
    assert [h["candidates"] for h in history] == [32] * 12
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-3:]) / 3
    assert last < first, [h["loss"] for h in history]
