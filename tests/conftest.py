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
# A driver a test starts (in this process or a child) joins this session's own Ray (``ray_local``: Ray
# sets RAY_ADDRESS to the instance it starts) or, before that one starts, starts its own. Unset, Ray
# would join the cluster `ray start` last started on this machine: another test's, run at the same time
# by pytest-xdist, or a sweep someone runs beside the tests. A test that joins a cluster says which.
os.environ["RAY_ADDRESS"] = "local"


def pytest_collection_modifyitems(config, items) -> None:
    """Files with a slow test first, each file's own order kept: pytest-xdist hands out whole files in
    this order, so the long ones start at once and the short ones fill the end (rather than one long
    file running on its own while the other worker has nothing left)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


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


@pytest.fixture
def unwritable_dir(tmp_path: Path):
    """A folder nobody can write in: read-only by mode, and immutable (``chattr +i``) for root, whom
    modes do not stop (CI runs as root)."""
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        (path / "probe").write_text("x")
    except OSError:
        yield path
    else:
        pytest.skip("no way to make a folder read-only for this user here")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)
