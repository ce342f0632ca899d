"""The driver side of training: write the shards once, start Ray Train's ``TorchTrainer`` on the
workers' :func:`~hbt_ray.train.worker.train_loop_per_worker`, and collect the result.

    from hbt_ray.config import load_config
    from hbt_ray.train import TrainConfig, train
    cfg = load_config(TrainConfig, "hbt_ray/configs/train_tiny.yaml", ["run.max_steps=20"])
    result = train(cfg)
    print(result.model_path, result.metrics["loss"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.config import ConfigError
from hbt_ray.data.records import DataError
from hbt_ray.data.shards import (
    Manifest,
    interleave,
    iter_shard_groups,
    read_manifest,
    shard_paths,
    write_shards,
)
from hbt_ray.data.sources import iter_pair_groups, known_langs, spec_files
from hbt_ray.model import check_model_name
from hbt_ray.sampler import HybridBatchSampler
from hbt_ray.train.config import DataConfig, TrainConfig, TrainJob, TrainResult
from hbt_ray.train.deepspeed import worker_env_vars
from hbt_ray.train.mix import MIX_FILE
from hbt_ray.train.runfiles import (
    STOP_FILE,
    check_run_setup,
    clear_run,
    stop_on_interrupt,
    write_run_setup,
)
from hbt_ray.train.worker import train_loop_per_worker

#: Bump when the shards' content for the same inputs changes (schema, reader behaviour).
#: 2: groups interleaved across sources (data.shards.interleave); 3: pairs per source and language;
#: 4: LAReQA hard negatives leave out the sentences answering any question of the paragraph
SHARD_FORMAT = 4


def shard_fingerprint(data: DataConfig) -> dict[str, Any]:
    """What the shards of ``data`` are built from: sources, their files (size, modification time),
    languages, limits, reader options and the shard format. Shards are reused only for an equal one."""
    files = {spec: [[str(p), st.st_size, st.st_mtime_ns] for p in spec_files(spec) for st in [p.stat()]]
             for spec in data.train}  # fmt: skip
    return {"format": SHARD_FORMAT, "train": list(data.train), "langs": sorted(data.langs),
            "limit_groups": data.limit_groups, "rows_per_shard": data.rows_per_shard,
            "download": data.download, "lareqa_negatives": data.lareqa_negatives, "files": files}  # fmt: skip


def shard_dir_for(data: DataConfig, run_dir: str | Path, fingerprint: dict[str, Any] | None = None) -> Any:
    """``<data.shard_dir or run dir/shards>/<key>``, ``key`` a hash of :func:`shard_fingerprint`: a Path
    on a local disk, a URI (str) in remote storage."""
    fingerprint = fingerprint or shard_fingerprint(data)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    root = data.shard_dir or storage.join(run_dir, "shards")
    # absolute: the workers read these paths from their own working directories
    return storage.join(root, key) if storage.is_uri(root) else Path(storage.resolve(root)) / key


def prepare_shards(data: DataConfig, run_dir: str | Path) -> Any:
    """The shard directory of ``data`` (:func:`shard_dir_for`), written on first use. Another source,
    language list, limit or a changed input file gives another folder, so shards are never reused for
    data they were not built from. In remote storage the shards are written on this machine, then
    uploaded; the workers read them from there."""
    fingerprint = shard_fingerprint(data)
    shard_dir = shard_dir_for(data, run_dir, fingerprint)
    # remote: the content list is uploaded last, so its presence means every shard is there
    marker = storage.CONTENT_FILE if storage.is_uri(shard_dir) else "manifest.json"
    if storage.exists(storage.join(shard_dir, marker)):
        if read_manifest(shard_dir).fingerprint == fingerprint:
            return shard_dir
        raise DataError(f"manifest's fingerprint is not the one its folder name stands for: delete {shard_dir}",
                        storage.join(shard_dir, "manifest.json"))  # fmt: skip
    langs = data.langs or None

    def groups() -> Any:
        for spec in data.train:
            spec_langs, known = langs, known_langs(spec)
            if langs and known is not None:  # a source lacking some of the languages gives the others
                spec_langs = [lang for lang in langs if lang in known]
                if not spec_langs:
                    continue
            yield from iter_pair_groups(spec, langs=spec_langs, limit=data.limit_groups, download=data.download,
                                        lareqa_negatives=data.lareqa_negatives)  # fmt: skip

    stream = groups()
    first = next(stream, None)
    if first is None:  # refused before write_shards: a manifest of nothing would be reused next run
        if data.langs:
            raise ConfigError(f"data.langs: {data.langs} have no pairs in data.train {data.train}")
        raise DataError("hold no pair groups", f"data.train {data.train}")
    print(f"[hbt_ray.train] writing the shards of {'+'.join(data.train)} to {shard_dir}", file=sys.stderr, flush=True)
    remote = storage.is_uri(shard_dir)
    local = Path(tempfile.mkdtemp(prefix="hbt_shards_")) / "shards" if remote else shard_dir
    try:
        # Interleaved: read one after the other, the sources would sit in different shards (and ranks).
        write_shards(interleave(itertools.chain([first], stream)), local, data.rows_per_shard,
                     source="+".join(data.train), fingerprint=fingerprint)  # fmt: skip
        if remote:
            storage.publish_dir(local, shard_dir)  # the manifest is in it: complete shards or none
    finally:
        if remote:
            shutil.rmtree(local.parent, ignore_errors=True)
    return shard_dir


def check_inputs(cfg: TrainConfig, manifest: Manifest, shard_dir: Path) -> float:
    """Raise here, on the driver and before Ray starts, what every training worker would otherwise find
    only after Ray Train started it and DeepSpeed built its engine (and again on every run.max_failures
    retry): shards without groups, ``data.langs`` or ``sampler.languages`` the shards lack, and every
    other check the workers' samplers make on the config against the data's languages and size (the
    same constructor, on a stream that is never read). ``run.epochs`` or ``run.pairs`` becomes
    ``run.max_steps`` here;
    → the run's length in passes over the data, which it prints."""
    if manifest.groups == 0:
        raise DataError("holds no pair groups", shard_dir)
    missing = [lang for lang in cfg.data.langs if lang not in manifest.pairs_per_lang]
    if missing:
        raise ConfigError(
            f"data.langs: {missing} have no pairs in the shards {shard_dir} "
            f"(they have {', '.join(sorted(manifest.pairs_per_lang))})"
        )
    counts, world = dict(manifest.pairs_per_lang), cfg.run.num_workers
    sampler = HybridBatchSampler(cfg.sampler, lambda _pass: iter(()), 0, world, counts, num_groups=manifest.groups,
                                 source_lang_counts=manifest.pairs_per_source_lang or None)  # fmt: skip
    if sampler.excluded_langs:
        rare = ", ".join(f"{k} ({v})" for k, v in sampler.excluded_langs.items())
        print(f"[hbt_ray.train] not drawn, fewer groups than sampler.min_lang_groups: {rare}", file=sys.stderr)
    per_pass = sampler.steps_per_epoch
    if cfg.run.epochs is not None:
        cfg.run.max_steps = max(1, math.ceil(cfg.run.epochs * per_pass))
    if cfg.run.pairs is not None:
        cfg.run.max_steps = math.ceil(cfg.run.pairs / (cfg.sampler.batch_size * cfg.optim.grad_accum))
    passes = cfg.run.max_steps / per_pass
    print(f"[hbt_ray.train] {cfg.run.max_steps:,} steps of {cfg.sampler.batch_size} pairs = {passes:.2f} passes over "
          f"{manifest.groups:,} groups (one pass: {per_pass:,} steps, each group once"
          + (f"; run.epochs={cfg.run.epochs:g}" if cfg.run.epochs is not None else "; or set run.epochs") + ")",
          file=sys.stderr, flush=True)  # fmt: skip
    return passes


def cluster_has_gpus() -> bool:
    """``run.use_gpu=auto``: train on GPUs when the Ray cluster has any. Asked of the cluster, not of the
    driver's own torch: on a CPU head of a GPU cluster that would train on CPU with gloo, saying nothing."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def check_placement(num_workers: int, strategy: str, alive_nodes: int) -> None:
    """``STRICT_SPREAD`` puts every worker on a node of its own: with more workers than nodes Ray waits
    for nodes that never come (e.g. 16 workers on two 8-GPU nodes), so it is refused before any start.

    >>> check_placement(2, "STRICT_SPREAD", alive_nodes=2)
    >>> check_placement(16, "STRICT_SPREAD", alive_nodes=2)
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: run.placement_strategy: STRICT_SPREAD puts each of the 16 workers on its own node, and the cluster has 2 nodes; use SPREAD (workers spread over the nodes as evenly as they fit) or PACK
    """
    if strategy == "STRICT_SPREAD" and num_workers > alive_nodes:
        raise ConfigError(
            f"run.placement_strategy: STRICT_SPREAD puts each of the {num_workers} workers on its own node, and "
            f"the cluster has {alive_nodes} node{'s' if alive_nodes != 1 else ''}; use SPREAD (workers spread over the nodes as evenly as "
            "they fit) or PACK"
        )


#: Errors of the configuration or of the data: a retry reads the same config and the same files and
#: fails the same way, after starting a worker group and building the model again.
FINAL_ERRORS = (ConfigError, DataError)


def final_errors_callback() -> Any:
    """A Ray Train callback that ends the run at a worker's ConfigError or DataError, never retried.

    Ray Train V2 decides retries in its failure policy, which ``FailureConfig`` only sets limits for:
    any exception in a worker is a WorkerGroupError, counted against ``max_failures`` and retried; a
    ControllerError is retried only when a worker group failed to start. No public setting makes an
    exception final, but user callbacks run on the controller as it polls the workers, before that
    policy decides, and an error a callback raises is the policy's to judge: a ControllerError around
    the worker's error is final, and :func:`train` unwraps it. (The class is built here, not at import,
    so the CLI does not import Ray Train to print an error; Ray pickles it by value.)
    """
    import ray.train

    class FinalErrors(ray.train.UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for err in worker_exceptions.values():
                base = getattr(err, "_base_exc", err)  # Ray's wrapper that carries the traceback text
                if isinstance(base, FINAL_ERRORS):
                    raise ray.train.ControllerError(base)

    return FinalErrors()


def tokenizer_texts(shard_dir: Path, max_groups: int) -> list[str]:
    """Queries + passages of the first ``max_groups`` groups (the tiny preset's tokenizer corpus)."""
    texts: list[str] = []
    for i, group in enumerate(iter_shard_groups(shard_dir)):
        if i >= max_groups:
            break
        for pair in group.pairs.values():
            texts += [pair.query, pair.passage]
    return texts


def train(cfg: TrainConfig, callbacks: list[Any] | None = None, overwrite: bool = False) -> TrainResult:
    """Run training as configured; returns the last metrics, checkpoint and exported model path.

    Callable from a driver or from inside a Ray task / Tune trial (uses the running Ray instance);
    ``callbacks`` are Ray Train callbacks, e.g. ``TuneReportCallback()`` inside a Tune trial. A run dir
    that holds a run resumes it when the setup is the same (:func:`~hbt_ray.train.runfiles.check_run_setup`);
    ``overwrite`` replaces that run instead, once every check has passed.
    """
    check_model_name(cfg.model)  # a wrong name fails here in seconds, not in every worker
    root = storage.resolve(cfg.run.storage_path)
    run_dir = storage.join(root, cfg.run.name)
    # a missing bucket, credentials or write permission: one line now, not a worker's traceback
    storage.check_writable(run_dir, "run.storage_path")
    if cfg.data.shard_dir:
        storage.check_writable(cfg.data.shard_dir, "data.shard_dir")
    if not overwrite:  # a changed setting is never taken for a resume
        check_run_setup(cfg, run_dir)
    import ray

    from hbt_ray.cluster import init_ray, starts_new_instance

    if ray.is_initialized() or not starts_new_instance(None):
        # Joining a cluster starts nothing: ask it now whether its nodes can see these locations, so a
        # refused run leaves nothing behind (no run folder, no shards on the driver's disk).
        if not ray.is_initialized():
            init_ray()
        shard_root = cfg.data.shard_dir or storage.join(run_dir, "shards")
        storage.check_cluster_storage({"run.storage_path": root, "data.shard_dir": shard_root})
    if not storage.is_uri(root):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    shard_dir = prepare_shards(cfg.data, run_dir)
    manifest = read_manifest(shard_dir)
    passes = check_inputs(cfg, manifest, shard_dir)
    paths = [str(p) for p in shard_paths(shard_dir)]  # schema-checked here, once
    texts = None
    if cfg.model.name == "tiny":
        from hbt_ray.model import tiny_tokenizer

        texts = tokenizer_texts(shard_dir, cfg.model.tiny_sample_records)
        tiny_tokenizer(cfg.model, texts)  # build + cache once here, the workers load it

    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():  # a new local instance only now: every check above runs without it
        init_ray()
    # Before any worker starts: on a cluster, what the workers read and write must be visible to them.
    storage.check_cluster_storage({"run.storage_path": root, "data.shard_dir": str(shard_dir)})
    if overwrite:  # only now, every check passed: the old run goes, the shards (keyed by data) stay
        clear_run(run_dir)
    write_run_setup(cfg, run_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own tqdm shows the steps
    check_placement(cfg.run.num_workers, cfg.run.placement_strategy, len([n for n in ray.nodes() if n.get("Alive")]))
    gpu = cluster_has_gpus() if cfg.run.use_gpu == "auto" else cfg.run.use_gpu == "true"
    # The workers follow the driver's decision (a worker alone cannot tell what its peers got).
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, use_gpu="true" if gpu else "false"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": TrainJob(
            cfg=cfg, run_dir=str(run_dir), shard_paths=paths, lang_counts=dict(manifest.pairs_per_lang),
            num_groups=manifest.groups, sources=sorted(manifest.groups_per_source),
            source_lang_counts=manifest.pairs_per_source_lang or None, tokenizer_texts=texts,
        )},  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if gpu else {})},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=root,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=[*(callbacks or []), final_errors_callback()],  # last: the others see the error too
            worker_runtime_env={"env_vars": {**worker_env_vars(cfg.run), **storage.worker_env()}},
        ),
    )
    # Ray Train's own Ctrl-C handler aborts the run without a checkpoint (the rerun then started from
    # step 1): ours asks the workers to checkpoint and stop instead (runfiles.stop_on_interrupt).
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    stop_file = storage.join(run_dir, STOP_FILE)
    storage.remove(stop_file)  # a stop asked of an earlier attempt is not asked of this one
    try:
        with stop_on_interrupt(run_dir):
            result = trainer.fit()
    except ray.train.ControllerError as err:
        if isinstance(err.controller_failure, FINAL_ERRORS):  # from final_errors_callback
            raise err.controller_failure from None
        raise
    steps = int((result.metrics or {}).get("step", 0))
    stopped = storage.exists(stop_file) and steps < cfg.run.max_steps
    storage.remove(stop_file)
    steps_log = storage.join(run_dir, "steps.jsonl")
    history = []
    if storage.exists(steps_log):
        history = [json.loads(line) for line in storage.read_text(steps_log).splitlines() if line.strip()]
    model_dir = storage.join(run_dir, "model")
    model_path = model_dir if cfg.run.export and storage.exists(storage.join(model_dir, "config.json")) else None
    if model_path is not None and cfg.run.wise_ft < 1.0 and not stopped:
        from hbt_ray.model.interpolate import wise_ft_run_model

        model_path = wise_ft_run_model(cfg.model, run_dir, cfg.run.wise_ft)
    mix_file = storage.join(run_dir, MIX_FILE)
    return TrainResult(
        run_dir=run_dir,
        steps=steps,
        stopped=stopped,
        metrics=dict(result.metrics or {}),
        checkpoint_path=_checkpoint_location(result.checkpoint, root),
        model_path=model_path,
        history=history,
        mix=json.loads(storage.read_text(mix_file)) if storage.exists(mix_file) else {},
        passes=passes,
    )


def _checkpoint_location(checkpoint: Any, root: str) -> str | None:
    """The checkpoint as a location (a URI again when the storage is remote: Ray keeps the path on
    the filesystem, without its scheme)."""
    if checkpoint is None:
        return None
    if not storage.is_uri(root):
        return checkpoint.path
    scheme = root.split("://", 1)[0]
    return f"{scheme}://{checkpoint.path.lstrip('/')}"
