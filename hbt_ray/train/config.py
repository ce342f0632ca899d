"""The training config: one typed section per concern, loaded from YAML with ``key=value`` overrides.

Every function of the training stage receives only its own section (the optimizer gets ``optim``, the
loss ``loss``, the sampler ``sampler``). Keys and defaults: ``python -m hbt_ray.train --help``.

    >>> from hbt_ray.config import load_config
    >>> cfg = load_config(TrainConfig, None, ["sampler.alpha=0.25", "optim.lr=3e-5"])
    >>> cfg.sampler.alpha, cfg.optim.lr, cfg.loss.temperature
    (0.25, 3e-05, 0.05)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from hbt_ray.config import ConfigError
from hbt_ray.data.sources import LAREQA_NAMES, absolute_spec, check_spec
from hbt_ray.evaluate.config import EvalConfig, check_langs
from hbt_ray.loss import LossConfig
from hbt_ray.model import ModelConfig
from hbt_ray.sampler import SamplerConfig


@dataclass
class DataConfig:
    """Training pairs: source specs (``ddtp``, ``mlqa-r``, ``pairs:PATH``) written once into shards."""

    train: list[str] = field(default_factory=lambda: ["ddtp"])
    langs: list[str] = field(default_factory=list)  # empty: every language of the sources
    limit_groups: int | None = None  # per source spec
    #: where shards are kept, one folder per fingerprint of these keys and the input files (reused only
    #: for the same); default <run dir>/shards
    shard_dir: str | None = None
    rows_per_shard: int = 2000
    #: xquad-r / mlqa-r not in the data folder: fetch the public files (checksum-verified); false = an error
    download: bool = False
    #: LAReQA sources (mlqa-r, xquad-r, lareqa:PATH): up to N other sentences of the answer's paragraph
    #: stored as each pair's hard negatives, nearest first; sampler.max_negatives draws them
    lareqa_negatives: int = 0

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("train: give at least one source spec")
        for i, spec in enumerate(self.train):
            try:
                check_spec(spec, "pair")
            except ValueError as err:
                raise ConfigError(f"train[{i}]: {err}") from None
        self.train = [absolute_spec(spec) for spec in self.train]
        check_langs("langs", self.langs, self.train)
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard: must be >= 1, got {self.rows_per_shard}")
        if self.limit_groups is not None and self.limit_groups < 1:
            raise ConfigError(f"limit_groups: must be >= 1, got {self.limit_groups}")
        if self.lareqa_negatives < 0:
            raise ConfigError(f"lareqa_negatives: must be >= 0, got {self.lareqa_negatives}")
        if self.lareqa_negatives and not any(s in LAREQA_NAMES or s.startswith("lareqa:") for s in self.train):
            raise ConfigError(f"lareqa_negatives: {self.lareqa_negatives}, but no source of data.train "
                              f"{self.train} is a LAReQA set (mlqa-r, xquad-r, lareqa:PATH)")  # fmt: skip


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (DeepSpeed's warmup/decay schedulers)."""

    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0  # cosine: decay to lr × this
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches (sampler batches) per optimizer step
    #: torch's fused AdamW kernel (one pass over all parameters, CPU and CUDA; HF Trainer's default);
    #: false = the per-tensor loop. With deepspeed.offload_optimizer: DeepSpeed's CPU AdamW instead
    fused: bool = True

    def validate(self) -> None:
        # Written as "not (finite and in range)": a NaN fails every comparison, so `x <= 0` would let it
        # through (the loader already refuses NaN/inf; an OptimConfig built in code has not been there).
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: must be finite and > 0, got {self.lr}")
        if not (math.isfinite(self.eps) and self.eps > 0):  # AdamW divides by sqrt(v) + eps
            raise ConfigError(f"eps: must be finite and > 0, got {self.eps}")
        for key, note in (("weight_decay", ""), ("grad_clip", " (0 = off)")):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}: must be finite and >= 0{note}, got {value}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas: need two values, got {self.betas}")
        for i, beta in enumerate(self.betas):  # AdamW's moving averages: beta >= 1 never forgets, diverges
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"betas[{i}]: must be in [0, 1), got {beta}")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine: ZeRO stage, offload, precision."""

    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer states in CPU memory
    offload_param: bool = False  # ZeRO-3: parameters in CPU memory
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    #: ZeRO stage when training on ONE worker without offload, where there is nothing to partition and
    #: stages >= 1 only add their flat-buffer and gradient-hook overhead; null = always zero_stage
    single_worker_stage: int | None = 0
    #: dtype of the gradient all-reduce / reduce-scatter between workers; null = the training dtype.
    #: bf16 halves the bytes on the wire (for GPU nodes on slow links)
    communication_dtype: Literal["bf16", "fp16", "fp32"] | None = None

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.single_worker_stage not in (None, 0, 1, 2, 3):
            raise ConfigError(f"single_worker_stage: must be null, 0, 1, 2 or 3, got {self.single_worker_stage}")
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("offload_param: needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer: needs deepspeed.zero_stage >= 1")


@dataclass
class RunConfig:
    """Where and how the run executes: Ray Train workers, steps, checkpoints, reports, evaluations."""

    name: str = "hbt"
    storage_path: str = "runs"  # Ray Train storage; the run dir is <storage_path>/<name>
    num_workers: int = 2
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0  # leave CPUs for Ray Data: it streams the shards during training
    #: Ray placement of the workers' bundles: SPREAD spreads them over the nodes; STRICT_SPREAD wants a node
    #: per worker (refused with more workers than nodes, where Ray would wait forever)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_steps: int = 100
    #: the run's length in passes over the data instead (one pass: every group once, i.e.
    #: sampler.steps_per_epoch steps); when set, max_steps is computed from it on the driver
    epochs: float | None = None
    #: the run's length in training pairs instead (all workers): max_steps = pairs / (sampler.batch_size ×
    #: optim.grad_accum), rounded up, on the driver — runs with different batch sizes see the same data
    pairs: int | None = None
    checkpoint_every: int = 50  # 0 = only the final checkpoint
    keep_checkpoints: int = 2
    max_failures: int = 1
    seed: int = 0
    log_every: int = 1  # ray.train.report metrics every N steps, but at most once per report_every_s
    #: Ray Train V2 hands a worker's reports to its controller through a queue of one, drained at every
    #: health check: a report per step would block each step. Reports are made at most this often
    #: (rank 0 decides, every rank follows); checkpoints, evaluations and the last step are always
    #: reported. Every step is still in <run dir>/steps.jsonl.
    report_every_s: float = 5.0
    #: batches drawn and tokenized ahead in a background thread (overlaps the model's compute)
    prefetch_batches: int = 2
    #: Re-deal each step's pairs among the workers (same count each) so their real tokens are near-equal:
    #: with the packed forward a worker's compute follows its tokens, and every collective waits for the
    #: slowest. Only with loss.gather (the loss is then the same for any deal) and 2+ workers.
    balance_tokens: bool = True
    nan_policy: Literal["error", "skip"] = "error"
    max_skipped_steps: int = 10  # nan_policy=skip: give up after this many
    eval_every: int = 0  # evaluate on the ``eval`` section every N steps; 0 = no intermediate evaluation
    export: bool = True  # write the consolidated model to <run dir>/model
    #: WiSE-FT (Wortsman et al. 2022): below 1, the run's model (<run dir>/model) is λ·tuned + (1 − λ)·start
    #: and the tuned weights are kept in <run dir>/model_tuned. 1 = the tuned weights as trained.
    wise_ft: float = 1.0
    progress: bool = True  # tqdm bar on rank 0
    #: intra-op threads per worker; 0 = what Ray sets (OMP_NUM_THREADS = the worker's CPUs, at least 1).
    #: On a small CPU box give the workers fractional CPUs (so Ray Data and evaluators fit) and the real threads here.
    torch_threads: int = 0
    #: Training workers keep the memory they free (glibc: one arena, no mmap, no trimming) instead of
    #: handing it back to the OS and page-faulting it in again on the next step: Ray Train runs the loop
    #: in a thread, whose own arena trims after every layer, and large buffers (flattened gradients,
    #: gloo's) are otherwise fresh mmaps every step. false = glibc's defaults.
    keep_freed_memory: bool = True
    # Debug switches for the failure tests (off by default).
    debug_kill_at_step: int | None = None  # SIGKILL rank debug_kill_rank after this step, first attempt only
    debug_kill_rank: int = 1
    debug_nan_at_step: int | None = None  # this step's last micro-batch's loss becomes NaN (every rank)

    def validate(self) -> None:
        # one folder of storage_path: empty, "." or a nested path would put the run among other runs
        if not self.name.strip() or self.name in (".", "..") or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"name: {self.name!r} is not a folder name (the run dir is <storage_path>/<name>)")
        for key in ("num_workers", "max_steps", "keep_checkpoints", "log_every", "prefetch_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("checkpoint_every", "max_failures", "eval_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"epochs: must be finite and > 0, got {self.epochs}")
        if self.pairs is not None and self.pairs < 1:
            raise ConfigError(f"pairs: must be >= 1, got {self.pairs}")
        if self.pairs is not None and self.epochs is not None:
            raise ConfigError(f"pairs: {self.pairs} and epochs: {self.epochs:g} both set the run's length; set one")
        if not (math.isfinite(self.report_every_s) and self.report_every_s >= 0):
            raise ConfigError(f"report_every_s: must be finite and >= 0, got {self.report_every_s}")
        if not 0.0 <= self.wise_ft <= 1.0:  # NaN fails this too
            raise ConfigError(f"wise_ft: must be in [0, 1], got {self.wise_ft}")
        if self.wise_ft < 1.0 and not self.export:
            raise ConfigError(f"wise_ft: {self.wise_ft:g} interpolates the exported model; it needs export: true")
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise ConfigError(f"cpus_per_worker: must be finite and > 0, got {self.cpus_per_worker}")


@dataclass
class TrainConfig:
    """A training run. ``eval`` is the one evaluation section: what and how intermediate evaluations
    (``run.eval_every``) measure; the tuner and ``scripts/reproduce.py`` evaluate with it too."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.sampler.batch_size % self.run.num_workers:
            raise ConfigError(
                f"sampler.batch_size: {self.sampler.batch_size} global pairs do not split over "
                f"run.num_workers={self.run.num_workers} workers"
            )


@dataclass
class TrainResult:
    run_dir: str
    steps: int  # optimizer steps done
    metrics: dict[str, Any]  # last reported metrics
    checkpoint_path: str | None  # the last Ray Train checkpoint
    model_path: str | None  # exported sentence-transformers dir (run.export)
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step log lines of rank 0
    mix: dict[str, Any] = field(default_factory=dict)  # what it trained on: pairs per language / source (mix.json)
    stopped: bool = False  # stopped by Ctrl-C before run.max_steps, with a checkpoint to resume from
    passes: float | None = None  # run.max_steps in passes over the data (sampler.steps_per_epoch steps each)


@dataclass(frozen=True)
class TrainJob:
    """What every training worker is handed (Ray Train's ``train_loop_config["job"]``): the validated
    config and what the driver learnt from the shards, so no worker re-reads the manifest or re-checks."""

    cfg: TrainConfig
    run_dir: str  # local path on a shared mount, or a URI
    shard_paths: list[str]  # schema-checked on the driver; local paths or URIs, read by Ray Data
    lang_counts: dict[str, int]  # pairs per language in the shards
    num_groups: int
    sources: list[str]  # source names, sorted
    source_lang_counts: dict[str, dict[str, int]] | None  # pairs per source and language
    tokenizer_texts: list[str] | None = None  # the tiny preset's tokenizer is built from these
