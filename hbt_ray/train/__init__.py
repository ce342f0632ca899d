"""Training: Ray Train + DeepSpeed ZeRO on hybrid batches (``python -m hbt_ray.train``).

``config`` (the typed sections) → ``driver`` (shards, TorchTrainer) → ``worker`` (the per-worker
recipe: setup, resume, step, log, checkpoint, export), with ``batches`` (prefetch, token balancing),
``deepspeed`` (engine config, optimizer) and ``checkpoint`` (exact resume) beside it.
"""

from hbt_ray.train.config import (
    DataConfig,
    DeepSpeedConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    TrainResult,
)
from hbt_ray.train.driver import prepare_shards, tokenizer_texts, train
from hbt_ray.train.worker import NonFiniteLossError

__all__ = [
    "DataConfig",
    "DeepSpeedConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "prepare_shards",
    "tokenizer_texts",
    "train",
]
