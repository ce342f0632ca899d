"""Shared fixtures: the real data in ../shared/data (or $HBT_DATA_DIR) and a small local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hbt_ray.data.records import data_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_dir()
    if not (root / "lareqa" / "xquad-r").is_dir():
        pytest.fail(f"real data not found at {root}: set HBT_DATA_DIR or put shared/data next to the repo")
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the whole session (2 CPUs, small object store)."""
    import ray

    from hbt_ray.cluster import init_ray

    if not ray.is_initialized():
        init_ray(  # as the drivers start Ray (no dashboard, quiet PlacementGroupCleaner)
            "local",  # always a fresh instance: never join a cluster another process started
            num_cpus=int(os.environ.get("HBT_TEST_CPUS", "2")),
            object_store_memory=512 * 1024 * 1024,
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()
