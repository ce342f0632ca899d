"""The driver side of training: write the shards once, start Ray Train's ``TorchTrainer`` on the
workers' :func:`~hbt_ray.train.worker.train_loop_per_worker`, and collect the result.

    from hbt_ray.config import load_config
    from hbt_ray.train import TrainConfig, train
    cfg = load_config(TrainConfig, "hbt_ray/configs/train_tiny.yaml", ["run.max_steps=20"])
    result = train(cfg)
    print(result.model_path, result.metrics["loss"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hbt_ray.config import to_dict
from hbt_ray.data.shards import iter_shard_groups, read_manifest, shard_paths, write_shards
from hbt_ray.data.sources import iter_pair_groups
from hbt_ray.train.config import DataConfig, TrainConfig, TrainResult
from hbt_ray.train.deepspeed import worker_env_vars
from hbt_ray.train.worker import train_loop_per_worker, use_gpu


def prepare_shards(data: DataConfig, run_dir: Path) -> Path:
    """Write the training pairs into shards once (reused when ``manifest.json`` exists); → the shard dir."""
    shard_dir = Path(data.shard_dir).expanduser() if data.shard_dir else run_dir / "shards"
    if not (shard_dir / "manifest.json").exists():
        langs = data.langs or None

        def groups() -> Any:
            for spec in data.train:
                yield from iter_pair_groups(spec, langs=langs, limit=data.limit_groups)

        write_shards(groups(), shard_dir, data.rows_per_shard, source="+".join(data.train))
    return shard_dir


def tokenizer_texts(shard_dir: Path, max_groups: int) -> list[str]:
    """Queries + passages of the first ``max_groups`` groups (the tiny preset's tokenizer corpus)."""
    texts: list[str] = []
    for i, group in enumerate(iter_shard_groups(shard_dir)):
        if i >= max_groups:
            break
        for pair in group.pairs.values():
            texts += [pair.query, pair.passage]
    return texts


def train(cfg: TrainConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Run training as configured; returns the last metrics, checkpoint and exported model path.

    Callable from a driver or from inside a Ray task / Tune trial (uses the running Ray instance);
    ``callbacks`` are Ray Train callbacks, e.g. ``TuneReportCallback()`` inside a Tune trial.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from hbt_ray.cluster import init_ray

    if not ray.is_initialized():
        init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own tqdm shows the steps
    storage = Path(cfg.run.storage_path).expanduser().resolve()
    run_dir = storage / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = prepare_shards(cfg.data, run_dir)
    manifest = read_manifest(shard_dir)
    texts = None
    if cfg.model.name == "tiny":
        from hbt_ray.model import tiny_tokenizer

        texts = tokenizer_texts(shard_dir, cfg.model.tiny_sample_records)
        tiny_tokenizer(cfg.model, texts)  # build + cache once here, the workers load it
    gpu = use_gpu(cfg.run.use_gpu)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "lang_counts": dict(manifest.pairs_per_lang),
            "num_groups": manifest.groups,
            "shard_paths": [str(p) for p in shard_paths(shard_dir)],  # schema-checked here, once
            "run_dir": str(run_dir),
            "tokenizer_texts": texts,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if gpu else {})},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": worker_env_vars(cfg.run)},
        ),
    )
    result = trainer.fit()
    steps_log = run_dir / "steps.jsonl"
    history = []
    if steps_log.exists():
        history = [json.loads(line) for line in steps_log.read_text().splitlines() if line.strip()]
    model_dir = run_dir / "model"
    return TrainResult(
        run_dir=str(run_dir),
        steps=int((result.metrics or {}).get("step", 0)),
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        model_path=str(model_dir) if cfg.run.export and model_dir.exists() else None,
        history=history,
    )
