"""The DeepSpeed side of training: the engine's config dict, the ZeRO stage, the optimizer, and the
consolidated weights at export. Each function takes only the config sections it reads."""

from __future__ import annotations

from typing import Any

from hbt_ray.train.config import DeepSpeedConfig, OptimConfig, RunConfig


def zero_stage(ds: DeepSpeedConfig, world_size: int) -> int:
    """The ZeRO stage a run uses: ``zero_stage``, or ``single_worker_stage`` on one worker without
    offload.

    >>> zero_stage(DeepSpeedConfig(), 2), zero_stage(DeepSpeedConfig(), 1)
    (2, 0)
    """
    if world_size == 1 and ds.single_worker_stage is not None and not (ds.offload_optimizer or ds.offload_param):
        return ds.single_worker_stage
    return ds.zero_stage


def worker_env_vars(run: RunConfig) -> dict[str, str]:
    """Environment of the training worker processes (set before they start, as glibc needs).

    >>> worker_env_vars(RunConfig(keep_freed_memory=False))
    {}
    """
    if not run.keep_freed_memory:
        return {}
    return {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def deepspeed_config(
    optim: OptimConfig, ds_cfg: DeepSpeedConfig, max_steps: int, micro_batch_per_worker: int, world_size: int,
    chunks: int = 1, on_gpu: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The DeepSpeed config dict for ``deepspeed.initialize``, built from the typed sections. With GradCache
    (``chunks`` > 1) every chunk is an engine micro-step: ``micro_batch_per_worker`` is then the chunk.

    ``on_gpu``: offloaded states live in pinned host memory (copies to and from the GPU run asynchronously)
    and ZeRO 2/3 overlap their gradient reductions with the backward on a CUDA stream; on CPU workers both
    only cost (there is no device copy to speed up, no second stream).

    >>> ds = deepspeed_config(OptimConfig(), DeepSpeedConfig(), 100, micro_batch_per_worker=16, world_size=2)
    >>> ds["zero_optimization"]["stage"], ds["train_batch_size"], ds["zero_optimization"]["overlap_comm"]
    (2, 32, False)
    """
    o, d = optim, ds_cfg
    zero: dict[str, Any] = {"stage": zero_stage(d, world_size)}
    if zero["stage"] >= 2:
        zero["overlap_comm"] = on_gpu
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_per_worker,
        "gradient_accumulation_steps": o.grad_accum * chunks,
        "train_batch_size": micro_batch_per_worker * o.grad_accum * chunks * world_size,
        "zero_optimization": zero,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "initial_scale_power": 12},
        # We pass our own optimizer (build_optimizer): torch AdamW where it steps on the device, which
        # needs no DeepSpeed op built; DeepSpeedCPUAdam where ZeRO-Offload steps it on the host, and
        # there DeepSpeed is told to refuse any other (a slow torch AdamW would pass unnoticed).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": steps_on_host(d),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.communication_dtype is not None:
        ds["communication_data_type"] = d.communication_dtype
    ds["scheduler"] = _scheduler(o, max_steps)
    return ds


def _scheduler(o: OptimConfig, max_steps: int) -> dict[str, Any]:
    # DeepSpeed's schedulers give the updates before their warm-up has "started" lr 0 and decay toward the
    # warm-up's floor (a floor at lr would hold lr constant). Without warm-up, linear and cosine are started
    # past it (last_batch_iteration; DeepSpeed's linear warm-up lasts at least two steps): the first update
    # keeps the optimizer's lr and the decay runs over the others, one step longer so the last is above 0
    # (linear: lr·(T+1-k)/(T-1) for update k ≥ 2 of T).
    cold = o.warmup_steps == 0
    total = max_steps + 1 if cold else max(max_steps, o.warmup_steps + 1)
    if o.schedule == "linear":
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": 2 if cold else o.warmup_steps,
                "warmup_type": "linear",
                **({"last_batch_iteration": 1} if cold else {}),
            },
        }
    if o.schedule == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": max(o.warmup_steps, 1),
                "warmup_min_ratio": 1.0 if cold else 0.0,
                "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear",
                **({"last_batch_iteration": 0} if cold else {}),
            },
        }
    # constant: DeepSpeed's WarmupLR needs warmup_num_steps >= 1; "no warm-up" = one that starts at lr
    return {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": o.lr if cold else 0.0, "warmup_max_lr": o.lr,
                   "warmup_num_steps": max(o.warmup_steps, 1), "warmup_type": "linear"},
    }  # fmt: skip


def enable_tf32(device: Any) -> bool:
    """On a CUDA device, let fp32 matmuls and convolutions use TF32 tensor cores (fp32 range, a 10-bit
    mantissa, several times the fp32 rate on Ampere and later): what the fp32 parts of a run (and a
    ``precision: fp32`` run) use there; on CPU nothing changes. → whether it was enabled."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def steps_on_host(ds: DeepSpeedConfig) -> bool:
    """Whether ZeRO-Offload runs the optimizer step on the host (CPU): with ``offload_optimizer``, where
    the fp32 master weights and the optimizer states live in CPU memory. ``offload_param`` alone does not:
    ZeRO-3 then keeps the masters on the device and steps them there.

    >>> steps_on_host(DeepSpeedConfig(offload_optimizer=True)), steps_on_host(DeepSpeedConfig(zero_stage=3))
    (True, False)
    """
    return ds.offload_optimizer


def build_optimizer(module: Any, optim: OptimConfig, ds: DeepSpeedConfig | None = None) -> Any:
    """AdamW over the trainable parameters; no weight decay on biases, norms and scalars (τ). ``ds``:
    the run's DeepSpeed section, which decides the implementation (:func:`steps_on_host`); without it,
    torch's. ``optim.fused`` applies to torch's only."""
    import torch

    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or "norm" in name.lower() or name.endswith("bias")
        (no_decay if plain else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    betas = tuple(optim.betas)
    if ds is not None and steps_on_host(ds):
        # ZeRO-Offload steps the optimizer on the CPU, over all the fp32 master weights: DeepSpeed's
        # vectorised C++ AdamW (JIT-built once per machine, cached) is the optimizer its offload path is
        # made for and checks for; torch's unfused AdamW is far slower there. It needs the masters on the
        # host, so it is used only in that case.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps,
                                weight_decay=optim.weight_decay, adamw_mode=True)  # fmt: skip
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=optim.fused)


def accumulation_marks(engine: Any) -> tuple[int, int | None]:
    """Where DeepSpeed's gradient accumulation stands before a step's first micro-batch: the engine's
    micro-step count (it places the accumulation boundary) and the ZeRO optimizer's own micro-step id
    (it decides whether a backward adds to the gradients held so far). See :func:`rewind_accumulation`."""
    return engine.micro_steps, getattr(engine.optimizer, "micro_step_id", None)


def rewind_accumulation(engine: Any, marks: tuple[int, int | None]) -> None:
    """Drop a skipped step's gradients and put the accumulation back where the step began. Zeroing the
    gradients alone leaves the micro-batches already taken counted: with ``grad_accum`` > 1 every later
    optimizer step would then mix the end of one logical step with the start of the next, and a
    ZeRO-Offload optimizer would add the next backward to the skipped step's (non-finite) sums."""
    engine.zero_grad()
    engine.micro_steps = marks[0]
    if marks[1] is not None:
        engine.optimizer.micro_step_id = marks[1]


def consolidated_state_dict(engine: Any) -> dict[str, Any]:
    """Full state dict of the encoder on every rank (a collective: every rank calls it).

    The parameters are the optimizer's fp32 master weights where there are any (ZeRO 1-3 and DeepSpeed's
    bf16 optimizer keep them), not the module's copy: under bf16 / fp16 that copy is the rounded one the
    forward pass used, so an export of it would be lossy for no reason and not comparable with fp32 runs.
    Buffers, and parameters without a master copy (fp32 without ZeRO), come from the module."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    masters = {}
    for name, param in module.encoder.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(param)  # assembled from the ranks' partitions: a collective
        if full is not None:
            masters[name] = full.detach().float().cpu().clone()
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in module.encoder.state_dict().items()}
    state.update((name, value) for name, value in masters.items() if name in state)
    return state
