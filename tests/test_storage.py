"""hbt_ray.storage against a real S3 API (moto's server on 127.0.0.1): shards, models and run files at
a URI, the node-local model cache, and the one-line refusals. The two-node cluster is
tests/test_storage_cluster.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hbt_ray import storage
from hbt_ray.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch, tmp_path):
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server, "AWS_EC2_METADATA_DISABLED": "true", "HBT_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    name = f"b{tmp_path.name.replace('_', '').lower()[-20:]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def test_files_and_folders_at_a_uri(bucket, tmp_path):
    run = storage.join(bucket, "runs", "r1")
    storage.write_text(storage.join(run, "steps.jsonl"), '{"step": 1}\n')
    assert storage.exists(storage.join(run, "steps.jsonl")) and not storage.exists(storage.join(run, "nope"))
    assert storage.read_text(storage.join(run, "steps.jsonl")) == '{"step": 1}\n'
    assert storage.listdir(run) == ["steps.jsonl"] and storage.listdir(storage.join(bucket, "none")) == []
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(run, "nope"))
    storage.remove(run)
    assert not storage.exists(storage.join(run, "steps.jsonl"))


def test_a_published_folder_is_downloaded_once_and_checked(bucket, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    where = storage.publish_dir(src, storage.join(bucket, "m"))
    assert where == f"{bucket}/m"
    copy = storage.local_copy(where)
    assert (copy / "sub" / "w.bin").read_bytes() == b"\0" * 1000 and (copy / "config.json").read_text() == "{}"
    assert copy.is_relative_to(tmp_path / "cache")
    assert storage.local_copy(where) == copy  # cached: same folder, nothing downloaded again
    # A file changed behind the content list is refused, never loaded.
    storage.write_bytes(storage.join(where, "sub", "w.bin"), b"\1" * 1000)
    (copy / storage.CONTENT_FILE).unlink()  # as on another node, which has no copy yet
    with pytest.raises(storage.StorageError, match="content differs"):
        storage.local_copy(where)
    # A folder without its content list (an upload cut short) is not a published folder.
    storage.write_text(storage.join(bucket, "half", "config.json"), "{}")
    with pytest.raises(storage.StorageError, match="not a complete published directory"):
        storage.local_copy(storage.join(bucket, "half"))


def test_an_exported_model_loads_from_the_bucket_as_it_does_from_disk(bucket, tmp_path):
    from hbt_ray.evaluate.encode import model_fingerprint
    from hbt_ray.model import ModelConfig, check_model_name, load_dual_encoder

    cfg = ModelConfig(name="tiny", cache_dir=str(tmp_path / "c"))
    local = tmp_path / "export"
    load_dual_encoder(cfg).save_pretrained(local)
    uri = storage.publish_dir(local, storage.join(bucket, "runs", "x", "model"))
    check_model_name(ModelConfig(name=uri))  # a published model passes the driver's check
    with pytest.raises(ConfigError, match=r"^model\.name: s3://.*/nothing is not an exported model directory"):
        check_model_name(ModelConfig(name=storage.join(bucket, "nothing")))
    texts = ["ein Satz", "a sentence"]
    a = load_dual_encoder(ModelConfig(name=str(local))).encode(texts, kind="query", show_progress=False)
    b = load_dual_encoder(ModelConfig(name=uri)).encode(texts, kind="query", show_progress=False)
    assert (a == b).all()
    assert model_fingerprint(uri) == model_fingerprint(uri) and model_fingerprint(uri).startswith("dir:")
    (local / "config.json").write_text((local / "config.json").read_text() + " ")  # other content, other key
    assert model_fingerprint(storage.publish_dir(local, storage.join(bucket, "m2"))) != model_fingerprint(uri)


def test_shards_written_to_the_bucket_read_back_from_it(bucket, shared_data):
    from hbt_ray.data.shards import iter_shard_groups, read_manifest, shard_paths
    from hbt_ray.train.config import DataConfig
    from hbt_ray.train.driver import prepare_shards

    data = DataConfig(train=["ddtp"], limit_groups=30, rows_per_shard=10)
    shard_dir = prepare_shards(data, storage.join(bucket, "runs", "s"))
    assert isinstance(shard_dir, str) and shard_dir.startswith(f"{bucket}/runs/s/shards/")
    paths = shard_paths(shard_dir)
    assert len(paths) == 3 and all(p.startswith(bucket) and p.endswith(".parquet") for p in paths)
    assert read_manifest(shard_dir).groups == 30 and len(list(iter_shard_groups(shard_dir))) == 30
    assert prepare_shards(data, storage.join(bucket, "runs", "s")) == shard_dir  # reused, not rewritten


def test_an_unreachable_bucket_is_one_line_before_anything_trains(bucket, tmp_path):
    with pytest.raises(ConfigError, match=r"^run\.storage_path: cannot write to s3://no-such-bucket-hbt/runs"):
        storage.check_reachable("s3://no-such-bucket-hbt/runs", "run.storage_path")
    proc = subprocess.run(
        [sys.executable, "-m", "hbt_ray.train", "--config", "hbt_ray/configs/train_tiny.yaml",
         "run.storage_path=s3://no-such-bucket-hbt/runs", "run.max_steps=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run.storage_path: cannot write to s3://no-such-bucket-hbt")
    assert "writing the shards" not in proc.stderr  # refused before the shards


def test_declared_shared_mounts(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.SHARED_ENV, f"{tmp_path / 'efs'}{':'}{tmp_path / 'nfs'}")
    assert storage.cluster_visible(tmp_path / "efs" / "runs") and storage.cluster_visible(tmp_path / "nfs")
    assert not storage.cluster_visible(tmp_path / "efs-other") and not storage.cluster_visible(tmp_path)
    assert storage.cluster_visible("gs://bucket/x") and not storage.cluster_visible("file:///tmp/x")
    env = storage.worker_env()
    assert env[storage.SHARED_ENV] == f"{tmp_path / 'efs'}:{tmp_path / 'nfs'}"


def test_a_local_path_is_refused_where_workers_run_elsewhere(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.SHARED_ENV, raising=False)
    shapes = iter([(1, True), (3, True), (1, False)])
    monkeypatch.setattr(storage, "cluster_shape", lambda: next(shapes))
    storage.check_cluster_storage({"run.storage_path": str(tmp_path)})  # one node with CPUs: fine
    with pytest.raises(ConfigError, match=r"^run\.storage_path: .* a 3-node Ray cluster cannot read: give a URI"):
        storage.check_cluster_storage({"run.storage_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="whose driver node has no CPUs"):
        storage.check_cluster_storage({"run.storage_path": str(tmp_path)})
    storage.check_cluster_storage({"run.storage_path": "s3://bucket/runs"})  # a URI: never asks


def test_use_gpu_auto_asks_the_cluster_not_the_driver(monkeypatch):
    import ray
    import torch

    from hbt_ray.train.driver import cluster_has_gpus

    assert not torch.cuda.is_available()  # a CPU driver, as a cluster's head is
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 96.0, "GPU": 8.0})
    assert cluster_has_gpus()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert not cluster_has_gpus()


def test_paths_and_uris():
    assert storage.resolve("s3://b/p/") == "s3://b/p" and storage.resolve("file:///tmp/x") == "/tmp/x"
    assert storage.resolve("rel") == str(Path("rel").resolve())
    assert storage.join("/a", "b", "c") == "/a/b/c" and storage.join("gs://b", "/x/") == "gs://b/x"
    assert json.loads(json.dumps(storage.worker_env())) == storage.worker_env()
