"""Two Ray nodes that share no disk, and an S3 server: the cluster hbt_ray is for, on one machine.

- a Ray head with no CPUs (as ``cluster.yaml``'s): the drivers run here, in this test's mount namespace;
- a second Ray node started inside ``unshare --mount`` with private tmpfs mounts over every folder
  where the driver keeps runs, shards, caches and temporary files, and its own private cache and
  temp folders: a file one node writes locally, the other cannot see (proved first);
- moto's S3 server on 127.0.0.1 as the storage (``AWS_ENDPOINT_URL``), plus one folder left visible
  to both nodes and declared shared (``HBT_SHARED_STORAGE``): the NFS/EFS case.

Every training worker, evaluation actor and Tune trial needs CPUs, so all of them land on the second
node. Then the real commands, as a user runs them: train (a worker killed, resumed from the bucket),
evaluate the exported model, a 2-trial sweep with WiSE-FT, and training on the shared mount; a local
path is refused in one line. Needs root (``unshare``, ``mount``), as CI has.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "hbt"

TINY = [
    "--config", "hbt_ray/configs/train_tiny.yaml", "run.num_workers=2", "run.cpus_per_worker=0.5",
    "run.torch_threads=1", "data.limit_groups=400", "data.rows_per_shard=100", "sampler.batch_size=16",
    "sampler.buffer_groups=64", "optim.warmup_steps=0", "run.progress=false", "run.report_every_s=0",
]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (CI has both)"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


class TwoNodes:
    """The cluster of the module docstring; ``run(args)`` runs a driver command on the head's side."""

    def __init__(self, root: Path, data: Path) -> None:
        self.root = root
        self.private = root / "private"  # the driver's: runs, shards, cache, temp — hidden from node 2
        self.shared = root / "shared"  # seen by both nodes, declared shared
        self.node2 = root / "node2"  # node 2's own cache and temp (a private tmpfs there)
        for d in (self.private / "cache", self.private / "tmp", self.shared, self.node2):
            d.mkdir(parents=True, exist_ok=True)
        # Ray's sockets live in its temp dir and a socket's path has at most 107 bytes: pytest's folders
        # (longer under pytest-xdist) are too deep for it
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="hbt-ray-", dir="/tmp"))
        self.port, self.gcs = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.gcs}"
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "HBT_DATA_DIR": str(data),
            "HBT_SHARED_STORAGE": str(self.shared), "RAY_DEDUP_LOGS": "0", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
            # as cluster.yaml starts Ray: token authentication, one token for every node and driver
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(),
        }  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)
        self.driver_env = {**self.env, "HBT_CACHE_DIR": str(self.private / "cache"), "TMPDIR": str(self.private / "tmp"),
                           "RAY_ADDRESS": self.address}  # fmt: skip
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        log = open(self.root / "cluster.log", "w")  # noqa: SIM115 (kept open while the cluster runs)
        self.procs.append(subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log,
            start_new_session=True, env=self.env))  # fmt: skip
        ray = str(BIN / "ray")
        self.procs.append(subprocess.Popen(
            [ray, "start", "--head", "--block", "--num-cpus=0", "--node-ip-address=127.0.0.1", f"--port={self.gcs}", "--include-dashboard=false",
             f"--temp-dir={self.ray_tmp}", "--object-store-memory=200000000", "--disable-usage-stats"],
            stdout=log, stderr=log, start_new_session=True, env=self.driver_env))  # fmt: skip
        # Node 2: its own mount namespace; tmpfs over the driver's folders (empty there) and over its own.
        hide = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in (self.private, self.node2))
        start = (f"mkdir -p {self.node2}/cache {self.node2}/tmp && exec {ray} start --block "
                 f"--address={self.address} --node-ip-address=127.0.0.1 --num-cpus=5 --resources='{{\"node2\": 100}}' "
                 "--object-store-memory=300000000 --disable-usage-stats")  # fmt: skip
        node_env = {**self.env, "HBT_CACHE_DIR": str(self.node2 / "cache"), "TMPDIR": str(self.node2 / "tmp")}
        self.procs.append(subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{hide} && {start}"],
            stdout=log, stderr=log, start_new_session=True, env=node_env))  # fmt: skip
        import boto3

        def bucket() -> bool:
            try:
                s3 = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
                s3.create_bucket(Bucket=BUCKET)
                return True
            except Exception:
                return False

        def two_nodes() -> bool:
            if any(proc.poll() is not None for proc in self.procs):  # a node that failed to start never comes
                raise RuntimeError(f"a cluster process exited: {(self.root / 'cluster.log').read_text()[-3000:]}")
            return self.python("import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))").strip().endswith("2")

        _wait(bucket, 30, "moto server")
        _wait(two_nodes, 120, f"two Ray nodes ({(self.root / 'cluster.log').read_text()[-2000:]})")

    def python(self, code: str, timeout: float = 120) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=self.driver_env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    def on_node2(self, expr: str) -> object:
        """The value of ``expr`` evaluated in a Ray task on node 2 (with ``os`` and ``Path`` imported)."""
        code = textwrap.dedent(f"""
            import json, os, ray
            from pathlib import Path
            ray.init()
            @ray.remote(num_cpus=0.01, resources={{"node2": 1}})
            def probe():
                return {expr}
            print("RESULT", json.dumps(ray.get(probe.remote())))
        """)
        line = [x for x in self.python(code).splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT ") :])

    def run(self, module: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=self.driver_env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def s3(self, key: str) -> bytes:
        import pyarrow.fs as pafs

        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                               endpoint_override=self.env["AWS_ENDPOINT_URL"])  # fmt: skip
        with fs.open_input_stream(f"{BUCKET}/{key}") as fh:
            return fh.read()

    def s3_list(self, prefix: str) -> list[str]:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                               endpoint_override=self.env["AWS_ENDPOINT_URL"])  # fmt: skip
        infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(i.path[len(BUCKET) + 1 :] for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        # Ray's own daemons of this cluster, wherever they were re-parented (named by its temp dir / port)
        subprocess.run(["pkill", "-f", f"{self.ray_tmp}|{self.address}"], check=False)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_data):
    nodes = TwoNodes(tmp_path_factory.mktemp("c"), shared_data)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _last_json(out: str) -> dict:
    """The JSON object a training driver prints last (indented over several lines)."""
    return json.loads(out[out.rindex("\n{") + 1 :] if "\n{" in out else out)


def test_nodes_share_no_disk(cluster):
    """The premise: what the driver writes locally node 2 cannot see; the shared mount it can."""
    (cluster.private / "proof.txt").write_text("driver")
    (cluster.shared / "proof.txt").write_text("driver")
    seen = cluster.on_node2(f"[os.path.exists({str(cluster.private / 'proof.txt')!r}), "
                            f"os.path.exists({str(cluster.shared / 'proof.txt')!r}), "
                            "ray.get_runtime_context().get_node_id()]")  # fmt: skip
    assert seen[:2] == [False, True]


def test_a_local_path_is_refused_in_one_line(cluster):
    proc = cluster.run("hbt_ray.train", *TINY, f"run.storage_path={cluster.private / 'runs'}", "run.max_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: run.storage_path: ") and "local path" in line and "HBT_SHARED_STORAGE" in line
    assert "Traceback" not in proc.stderr
    assert not (cluster.private / "runs").exists()  # refused before anything is written


def test_train_in_the_bucket_resumes_after_a_kill_then_evaluate_there(cluster):
    out = _ok(cluster.run("hbt_ray.train", *TINY, f"run.storage_path=s3://{BUCKET}/runs", "run.name=killed",
                          "run.max_steps=6", "run.checkpoint_every=2", "run.debug_kill_at_step=3",
                          "run.debug_kill_rank=1", "run.max_failures=1"))  # fmt: skip
    result = _last_json(out)
    assert result["model"] == f"s3://{BUCKET}/runs/killed/model" and result["steps"] == 6
    files = cluster.s3_list("runs/killed")
    assert "runs/killed/.debug_killed" in files and "runs/killed/model/config.json" in files
    assert any("/shards/" in f and f.endswith(".parquet") for f in files)
    assert any("checkpoint" in f for f in files), files
    history = [json.loads(x) for x in cluster.s3("runs/killed/steps.jsonl").decode().splitlines()]
    node2 = cluster.on_node2("ray.get_runtime_context().get_node_id()")
    assert {n for h in history for n in h["node_ids"]} == {node2}  # every rank on node 2
    attempts = list(dict.fromkeys(h["attempt"] for h in history))
    assert len(attempts) == 2, attempts
    first = {h["step"]: h["batches"] for h in history if h["attempt"] == attempts[0]}
    second = [h for h in history if h["attempt"] == attempts[1]]
    assert [h["step"] for h in second] == [3, 4, 5, 6]  # resumed from the step-2 checkpoint in the bucket
    assert all(h["batches"] == first[h["step"]] for h in second if h["step"] in first)
    assert not (cluster.private / "runs").exists() and not Path(ROOT, "s3:").exists()

    # The exported model, evaluated where it is: the actors (on node 2) download it into their cache.
    ev = _ok(cluster.run("hbt_ray.evaluate", "--model", f"s3://{BUCKET}/runs/killed/model", "--data", "xquad-r",
                         "--out", str(cluster.private / "eval"), "langs=[en,de]", "max_paragraphs=2",
                         "show_progress=false", "concurrency=1"))  # fmt: skip
    summary = json.loads((cluster.private / "eval" / "eval.json").read_text())
    assert 0 <= summary["summary"]["mono_map"] <= 1, ev
    cached = cluster.on_node2(f"sorted(os.listdir({str(cluster.node2 / 'cache' / 'storage')!r}))")
    assert cached and all(not name.startswith(".") for name in cached)


def test_sweep_in_the_bucket(cluster):
    space = cluster.private / "space.yaml"
    space.write_text("search: grid\nparams:\n  sampler.alpha: {type: grid, values: [0.0, 1.0]}\n")
    out = _ok(cluster.run(
        "hbt_ray.tune", "--space", str(space), f"out_dir=s3://{BUCKET}/sweeps", "name=s", "interpolate=[0.5]",
        "evaluate_untuned=false", "train.model.name=tiny", "train.model.freeze_layers=0",
        "train.model.freeze_word_embeddings=false", "train.data.train=[ddtp]", "train.data.lareqa_negatives=0", "train.data.limit_groups=400",
        "train.sampler.source_weights=null", "train.sampler.min_lang_groups=null", "train.sampler.max_negatives=0",
        "train.loss.grad_cache=false", "train.run.wise_ft=1",
        "train.data.rows_per_shard=100", "train.sampler.batch_size=16", "train.sampler.buffer_groups=64",
        "train.run.num_workers=1", "train.run.cpus_per_worker=0.5", "train.run.max_steps=3",
        "train.run.checkpoint_every=0", "train.run.progress=false", "train.eval.langs=[en,de]",
        "train.eval.max_paragraphs=2", "train.eval.show_progress=false", "wandb.mode=disabled",
        f"train.eval.cache_dir={cluster.private / 'emb'}", "keep_trial_models=true",
    ))  # fmt: skip
    assert f"results: s3://{BUCKET}/sweeps/s " in out and f"best model: s3://{BUCKET}/sweeps/s/best_model" in out
    files = cluster.s3_list("sweeps/s")
    for name in ("results.csv", "results.md", "summary.json", "best_model/config.json"):
        assert f"sweeps/s/{name}" in files, files
    # each trial's model and its WiSE-FT model (written on node 2, uploaded there, evaluated from there)
    for suffix in ("model/config.json", "model_wise_0.5/config.json", "interpolate.json", "steps.jsonl"):
        assert sum(f.startswith("sweeps/s/trials/") and f.endswith(suffix) for f in files) == 2, (suffix, files)
    assert not [f for f in files if "/checkpoint_" in f], files  # deleted in the bucket as each trial ended
    assert cluster.s3("sweeps/s/results.md").decode().strip() in out  # the table printed on the driver
    summary = json.loads(cluster.s3("sweeps/s/summary.json"))
    assert summary["trials"] == 2 and summary["errored"] == 0
    assert summary["best_model_dir"] == f"s3://{BUCKET}/sweeps/s/best_model"


def test_train_on_a_declared_shared_mount(cluster):
    out = _ok(cluster.run("hbt_ray.train", *TINY, f"run.storage_path={cluster.shared / 'runs'}", "run.name=nfs",
                          "run.max_steps=2", "run.checkpoint_every=0"))  # fmt: skip
    result = _last_json(out)
    assert Path(result["model"]) == cluster.shared / "runs" / "nfs" / "model"
    assert (cluster.shared / "runs" / "nfs" / "model" / "config.json").is_file()
    history = [json.loads(x) for x in (cluster.shared / "runs" / "nfs" / "steps.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
