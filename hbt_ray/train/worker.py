"""The training loop of one Ray Train worker, as a recipe with one method per phase.

:func:`train_loop_per_worker` is what Ray Train runs on every worker; it builds a
:class:`TrainRecipe` and calls its phases in order::

    recipe = TrainRecipe(cfg, rank, world, ...)
    recipe.setup()      # model + τ in a DeepSpeed engine, this rank's sampler and prefetched batches
    recipe.resume()     # from ray.train.get_checkpoint(), or fresh per-rank seeds
    while not done:
        recipe.step()       # one optimizer step over run.grad_accum micro-batches
        recipe.log()        # steps.jsonl, progress bar, intermediate evaluation
        recipe.checkpoint() # save + report, or a plain report when one is due
    recipe.export()     # the consolidated model as a sentence-transformers directory

Each worker builds the same model (seeded), draws its slice of every global batch from the hybrid batch
sampler over its own part of the shards, and every ``run.checkpoint_every`` steps saves DeepSpeed state
+ batch-stream state + RNG states, so a restarted worker continues the same batch stream.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hbt_ray import storage
from hbt_ray.config import bars_off
from hbt_ray.data.streams import shard_streams
from hbt_ray.loss import ContrastiveModule, host_group, row_lengths
from hbt_ray.model import export_from_state_dict, load_dual_encoder
from hbt_ray.sampler import HybridBatchSampler
from hbt_ray.train import checkpoint as ckpt
from hbt_ray.train.batches import (
    PrefetchedBatches,
    all_reduce_mean,
    batch_fingerprint,
    batch_preparer,
    deal_by_tokens,
)
from hbt_ray.train.config import TrainJob
from hbt_ray.train.deepspeed import (
    accumulation_marks,
    build_optimizer,
    consolidated_state_dict,
    deepspeed_config,
    enable_tf32,
    rewind_accumulation,
    zero_stage,
)
from hbt_ray.train.gradcache import cached_step, num_chunks
from hbt_ray.train.mix import FALLBACK_GRACE_STEPS, MIX_FILE, FallbackShareError, mix_counts, mix_summary
from hbt_ray.train.runfiles import PLACEMENT_GROUP_FILE, StepLog, debug_kill, stop_requested
from hbt_ray.train.teacher import Teacher
from hbt_ray.train.temperature import TemperatureStepper, training_dtype_keeps_fp32_temperature

PHASES = ("data", "forward", "sync", "backward", "optimizer")
class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step."""


def use_gpu(setting: str) -> bool:
    if setting == "auto":
        import torch

        return torch.cuda.is_available()
    return setting == "true"


class TrainRecipe:
    """One worker's run: state lives on the instance, each phase is a method (see the module doc)."""

    def __init__(self, job: TrainJob, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world, self.run_dir, self.job = job.cfg, rank, world, job.run_dir, job
        self.step_no, self.skipped = 0, 0
        self.metrics: dict[str, Any] = {}
        self.last_report, self.report_now, self.confirm_checkpoint = time.perf_counter(), False, False
        self.rank_tokens: list[int] = []  # every rank's real tokens this step, before and after the deal
        self.eval_set: Any = None
        self.progress: Any = None
        # What the run trained on (every rank's pairs, summed each step): query language, source, fallbacks.
        self.mix: dict[str, Any] = {"pairs": 0, "fallback_pairs": 0, "pairs_by_lang": {}, "pairs_by_source": {}}
        self.step_mix: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed
        import ray.data
        import ray.train
        import ray.train.torch
        import torch
        import torch.distributed as dist

        cfg, rank, world = self.cfg, self.rank, self.world
        if cfg.run.torch_threads > 0:
            torch.set_num_threads(cfg.run.torch_threads)
        self.device = ray.train.torch.get_device() if use_gpu(cfg.run.use_gpu) else torch.device("cpu")
        enable_tf32(self.device)
        ckpt.seed_everything(cfg.run.seed)  # same init on every rank
        self.encoder = load_dual_encoder(cfg.model, train_texts=self.job.tokenizer_texts)
        # loss.distill's target, the starting encoder: copied before DeepSpeed partitions or casts it
        self.teacher = Teacher(self.encoder, self.device, cfg.deepspeed.precision, cfg.loss.chunk_size) \
            if cfg.loss.distill > 0 else None  # fmt: skip
        fp32_tau = training_dtype_keeps_fp32_temperature(cfg.deepspeed.precision)
        module = ContrastiveModule(self.encoder, cfg.loss, fp32_temperature=fp32_tau)
        self.tau = TemperatureStepper(module.temperature, cfg.optim, self.device) if fp32_tau else None
        stage = zero_stage(cfg.deepspeed, world)
        module.same_calls_every_rank = stage == 3 and world > 1
        if rank == 0 and stage != cfg.deepspeed.zero_stage:
            print(f"[hbt_ray.train] one worker, no offload: ZeRO stage {stage} instead of "
                  f"{cfg.deepspeed.zero_stage} (deepspeed.single_worker_stage)", flush=True)  # fmt: skip
        micro = cfg.sampler.batch_size // world
        chunks = num_chunks(micro, cfg.loss.chunk_size) if cfg.loss.grad_cache else 1
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=build_optimizer(module, cfg.optim, cfg.deepspeed),
            config=deepspeed_config(cfg.optim, cfg.deepspeed, cfg.run.max_steps, math.ceil(micro / chunks), world,
                                    chunks=chunks, on_gpu=self.device.type == "cuda"),  # fmt: skip
            dist_init_required=False,
        )
        # Each rank streams its own disjoint part of the shards (files r::world, read lazily by Ray Data
        # in a seeded, order-preserving way), so a restarted worker re-reads exactly the same rows: the
        # resumed batch stream is exact, and no group can meet its parallel copy on another rank.
        ray.data.DataContext.get_current().enable_progress_bars = False
        paths = self.job.shard_paths  # local paths or URIs: Ray Data reads either where it is
        sampler = HybridBatchSampler(
            cfg.sampler, shard_streams(paths, rank, world, seed=cfg.sampler.seed), rank, world,
            self.job.lang_counts, self.job.num_groups, self.job.source_lang_counts,
        )  # fmt: skip
        prepare = batch_preparer(self.encoder, cfg.loss.hard_negatives, pin=self.device.type == "cuda")
        self.batches = PrefetchedBatches(sampler, prepare, depth=cfg.run.prefetch_batches)
        self.balance = cfg.run.balance_tokens and cfg.loss.gather and world > 1
        # Where each rank runs (Ray node ids, rank order), logged in steps.jsonl: shows the placement.
        self.node_ids = [ray.get_runtime_context().get_node_id()]
        if dist.is_available() and dist.is_initialized() and world > 1:
            self.node_ids = [None] * world
            # the host-side group, made here where every rank is at the same point (hbt_ray.loss.host_group)
            dist.all_gather_object(self.node_ids, ray.get_runtime_context().get_node_id(), group=host_group())

    def resume(self) -> None:
        """Continue from Ray Train's last checkpoint if there is one; set up logs, evaluation, progress."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self.step_no, self.skipped, mix, tau = ckpt.load_checkpoint(checkpoint, self.engine, self.batches,
                                                                        self.rank)  # fmt: skip
            if self.tau is not None and tau is not None:
                self.tau.load_state_dict(tau)
            self.mix.update(mix)
            if self.rank == 0:
                print(f"[hbt_ray.train] resumed at step {self.step_no} from {checkpoint.path}", flush=True)
        else:
            ckpt.seed_everything(self.cfg.run.seed + 1000 * self.rank)  # per-rank stream of dropout etc.
        if self.cfg.run.eval_every:
            from hbt_ray.evaluate import load_eval_data

            self.eval_set = load_eval_data(self.cfg.eval)
        self.steps_log = StepLog(storage.join(self.run_dir, "steps.jsonl"), self.cfg.run.report_every_s) \
            if self.rank == 0 else None  # fmt: skip
        group = ray.util.get_current_placement_group() if self.rank == 0 else None
        if group is not None:
            storage.write_text(storage.join(self.run_dir, PLACEMENT_GROUP_FILE), group.id.hex())
        self.attempt, self.stopping = f"{os.getpid()}-{time.time():.0f}", False
        if self.rank == 0 and not bars_off(self.cfg.run.progress):
            from tqdm import tqdm

            self.progress = tqdm(total=self.cfg.run.max_steps, initial=self.step_no, desc="train", unit="step",
                                 mininterval=5)  # fmt: skip

    @property
    def done(self) -> bool:
        return self.step_no >= self.cfg.run.max_steps or self.stopping

    # -------------------------------------------------------------------------------------- step
    def step(self) -> None:
        """One optimizer step: ``optim.grad_accum`` micro-batches, forward + backward each."""
        import torch

        cfg, world = self.cfg, self.world
        t0 = time.perf_counter()
        langs, strategies, prints, pairs = set(), [], [], 0
        mix_langs, mix_sources = self.batches.sampler.langs, self.job.sources
        phase = dict.fromkeys(PHASES, 0.0)
        marks = accumulation_marks(self.engine)
        # this step's lr and fp16 loss scale, as DeepSpeed's update will use them (for a τ kept in fp32)
        lr, loss_scale = self.engine.get_lr()[0], float(getattr(self.engine.optimizer, "cur_scale", 1.0))
        # Loss and τ stay on the device until the step's one read, after its last backward is queued (the
        # GPU runs it while the host waits). The host's own numbers go on the host group (hbt_ray.loss).
        device_stats: list[Any] = []
        n_locals: list[float] = []  # passages + hard negatives, per micro-batch
        mix_local = [0.0] * (len(mix_langs) + len(mix_sources) + 2)
        due = self.rank == 0 and time.perf_counter() - self.last_report >= cfg.run.report_every_s
        last = cfg.optim.grad_accum - 1
        for micro_index in range(cfg.optim.grad_accum):
            t_phase = time.perf_counter()
            batch, prepared = self.batches.next()
            if self.balance:
                prepared, self.rank_tokens = deal_by_tokens(prepared, self.encoder.tokenizer)
            lengths = row_lengths(prepared[1], prepared[3], prepared[5])  # on the host, before the copy
            q_ids, q_mask, p_ids, p_mask, n_ids, n_mask = (
                None if t is None else t.to(self.device, non_blocking=True) for t in prepared[:6]
            )
            n_locals.append(float(len(prepared[6]) + sum(prepared[6])))
            t_phase = _add_time(phase, "data", t_phase)
            teacher = self.teacher and self.teacher.embed(q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, lengths)
            if cfg.loss.grad_cache:  # embed without a graph, loss, gradients w.r.t. the embeddings
                batch_on_device = (q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, prepared[6])
                loss, replay = cached_step(self.engine, self.engine.module, batch_on_device, cfg.loss.chunk_size,
                                           lengths, teacher)  # fmt: skip
                tau = self.engine.module.temperature().detach()
            else:
                loss, tau = self.engine(q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, lengths=lengths, teacher=teacher)
            t_phase = _add_time(phase, "forward", t_phase)
            if self.step_no + 1 == cfg.run.debug_nan_at_step and micro_index == last:
                loss = loss * float("nan")  # the test hook poisons the step's last micro-batch
            device_stats += [loss.detach().float().reshape(1), tau.detach().float().reshape(-1)[:1]]
            # every backward runs; the boundary's engine.step() waits for the verdict (losses finite, below)
            if cfg.loss.grad_cache:  # each chunk re-encoded with its dropout, one engine micro-step each
                replay(final_step=micro_index < last)
            else:
                self.engine.backward(loss)
                if micro_index < last:
                    self.engine.step()
            t_phase = _add_time(phase, "backward", t_phase)
            local = mix_counts(batch, mix_langs, mix_sources)
            mix_local = [a + b for a, b in zip(mix_local, local)]
            pairs += len(batch.queries) * world
            langs.update(batch.query_langs)
            langs.update(batch.passage_langs)
            strategies.append(batch.strategy)
            prints.append(batch_fingerprint(list(batch.queries), list(batch.passages)))
        # The read: losses and τ averaged over the ranks (all take the same decision); then the candidates,
        # rank 0's "report due" and the mix (query languages, sources, fallback pairs, pairs).
        t_phase = time.perf_counter()
        means = all_reduce_mean(torch.cat(device_stats))
        losses, taus = means[0::2], means[1::2]
        host = all_reduce_mean([*n_locals, float(due), *mix_local], host=True)
        k = len(n_locals)
        candidates = [round(c * world) for c in host[:k]] if cfg.loss.gather else [int(c) for c in n_locals]
        step_counts = [c * world for c in host[k + 1 :]]
        self.report_now = self.report_now or host[k] > 0  # rank 0's decision, on every rank
        t_phase = _add_time(phase, "sync", t_phase)
        nonfinite_at = next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v)), 0)
        if not nonfinite_at:
            self.engine.step()  # the accumulation boundary: the optimizer update (ZeRO reductions included)
        _add_time(phase, "optimizer", t_phase)
        self.step_no += 1  # a skipped step still consumed its batches: the stream stays aligned
        self._add_mix(step_counts, mix_langs, mix_sources)
        if nonfinite_at:
            self._skip_nonfinite(f"step {self.step_no} (micro-batch {nonfinite_at}/{cfg.optim.grad_accum})", marks)
            losses = []  # skipped, whatever micro-batches went before the non-finite one
            if self.tau is not None:
                self.tau.zero_grad()
        elif self.tau is not None and self.engine.was_step_applied():  # (fp16 skips overflowing steps)
            self.tau.step(lr, loss_scale)
        dt = time.perf_counter() - t0
        self.losses, self.prints = losses, prints
        if not losses:
            self.metrics = {**self.metrics, "step": self.step_no, "skipped_steps": self.skipped}
            return
        self.metrics = {
            "step": self.step_no,
            "loss": sum(losses) / len(losses),
            "temperature": taus[-1],
            # the lr this step's update used, read off the optimizer before it (the scheduler's last lr
            # is the next update's)
            "lr": float(lr),
            "pairs_per_s": pairs / dt,
            "step_time_s": dt,
            "strategy": ",".join(sorted(set(strategies))),
            "langs": ",".join(sorted(langs)),
            "skipped_steps": self.skipped,
            "fallback_pairs": self.mix["fallback_pairs"],
            "fallback_share": self.mix["fallback_pairs"] / max(1, self.mix["pairs"]),
            "candidates": max(candidates),
            "optimizer_steps": self.engine.global_steps,  # DeepSpeed's count: steps taken minus skipped
            "micro_steps": self.engine.micro_steps,  # grad_accum (x GradCache chunks) per optimizer step
            **{f"time_{k}_s": v for k, v in phase.items()},
        }

    def _add_mix(self, counts: list[float], langs: list[str], sources: list[str]) -> None:
        """Add one step's summed counts to the run's mix; fail when the fallback share is too high."""
        n = [round(c) for c in counts]
        by_lang = {lang: c for lang, c in zip(langs, n) if c}
        by_source = {src: c for src, c in zip(sources, n[len(langs) :]) if c}
        fallback, pairs = n[-2], n[-1]
        self.step_mix = {"pairs_by_lang": by_lang, "pairs_by_source": by_source, "fallback_pairs": fallback}
        mix = self.mix
        mix["pairs"] += pairs
        mix["fallback_pairs"] += fallback
        for key, new in (("pairs_by_lang", by_lang), ("pairs_by_source", by_source)):
            for name, c in new.items():
                mix[key][name] = mix[key].get(name, 0) + c
        share, limit = mix["fallback_pairs"] / max(1, mix["pairs"]), self.cfg.sampler.max_fallback_share
        if share > limit and self.step_no >= min(FALLBACK_GRACE_STEPS, self.cfg.run.max_steps):
            short = self.batches.sampler.stats()["mono_fallback_pairs_by_lang"]
            raise FallbackShareError(
                f"{mix['fallback_pairs']} of {mix['pairs']} pairs ({share:.1%}) were fallbacks, not of their "
                f"step's kind (short languages on rank {self.rank}: {short or 'none'}; cross/x-x shortages "
                f"otherwise); more than sampler.max_fallback_share={limit}: raise sampler.buffer_groups, "
                "lower sampler.batch_size or lang_temperature, or allow it (sampler.max_fallback_share=1)",
                f"step {self.step_no}",
            )

    def _skip_nonfinite(self, where: str, marks: tuple[int, int | None]) -> None:
        run = self.cfg.run
        if run.nan_policy == "error":
            raise NonFiniteLossError(f"non-finite loss at {where}; set run.nan_policy=skip to skip such steps")
        self.skipped += 1
        rewind_accumulation(self.engine, marks)
        if self.rank == 0:
            print(f"[hbt_ray.train] non-finite loss at {where}: skipped ({self.skipped} so far)", flush=True)
        if self.skipped > run.max_skipped_steps:
            raise NonFiniteLossError(
                f"non-finite loss at {where}: {self.skipped} steps skipped, more than "
                f"run.max_skipped_steps={run.max_skipped_steps}"
            )

    # --------------------------------------------------------------------------------------- log
    def log(self) -> None:
        """Rank 0 appends the step to steps.jsonl and moves the bar; every rank runs a due evaluation."""
        import torch

        if self.rank == 0:
            record = {
                **self.metrics, "skipped": not self.losses, "batches": self.prints, "attempt": self.attempt,
                "node_ids": self.node_ids,
                "t_end": time.time(),  # wall clock: the gaps include reporting and logging too
                "torch_threads": torch.get_num_threads(),
                "rank_tokens": self.rank_tokens,  # balance_tokens: per rank, before then after the deal
                "malloc_mmap_max": os.environ.get("MALLOC_MMAP_MAX_"),
                **self.step_mix,  # every rank's pairs of this step: query languages, sources, fallbacks
            }  # fmt: skip
            self.steps_log.append(json.dumps(record))
            if self.progress is not None:
                self.progress.update(1)
                if self.losses:
                    self.progress.set_postfix(
                        loss=f"{self.metrics['loss']:.3f}", pairs_s=f"{self.metrics['pairs_per_s']:.0f}"
                    )
        if self._eval_due():
            with self.batches.paused():  # the evaluation tokenizes with the same tokenizer
                self.metrics.update(self._intermediate_eval())

    def _eval_due(self) -> bool:
        return self.eval_set is not None and self.step_no % self.cfg.run.eval_every == 0

    def _intermediate_eval(self) -> dict[str, Any]:
        """Evaluate the in-training encoder (every rank runs it: ZeRO-3 gathers parameters collectively)."""
        from dataclasses import replace

        from hbt_ray.evaluate import evaluate

        result = evaluate(self.encoder, self.eval_set, replace(self.cfg.eval, show_progress=False))
        return {f"eval/{k}": float(v) for k, v in result.summary.items() if isinstance(v, (int, float))}

    # -------------------------------------------------------------------------------- checkpoint
    def checkpoint(self) -> None:
        """Save + report at checkpoint steps and the last step; else report when due (see run.report_every_s)."""
        import ray.train

        run = self.cfg.run
        if self.step_no % run.log_every == 0:  # Ctrl-C on the driver: checkpoint this step, then stop
            self.stopping = stop_requested(self.run_dir, self.rank, self.device)
        if (run.checkpoint_every and self.step_no % run.checkpoint_every == 0) or self.done:
            if self.rank == 0:
                self.steps_log.flush()  # the log in storage covers at least every checkpointed step
            ckpt.save_checkpoint(self.engine, self.batches, step=self.step_no, skipped=self.skipped,
                                 rank=self.rank, world=self.world, metrics=self.metrics, mix=self.mix,
                                 temperature=self.tau.state_dict() if self.tau is not None else None)  # fmt: skip
            # The controller registers a reported checkpoint when it drains the worker's result queue;
            # a crash before that loses it. The next step's report blocks until the queue is drained,
            # so from then on the checkpoint is safe.
            self.last_report, self.report_now, self.confirm_checkpoint = time.perf_counter(), False, True
        elif (self.report_now and self.step_no % run.log_every == 0) or self._eval_due() or self.confirm_checkpoint:
            ray.train.report(self.metrics)
            self.last_report, self.report_now, self.confirm_checkpoint = time.perf_counter(), False, False
        debug_kill(run, self.step_no, self.rank, self.run_dir, self.steps_log.flush if self.rank == 0 else None)

    # ------------------------------------------------------------------------------------ export
    def export(self) -> None:
        """Close the batch stream; write the consolidated model to <run dir>/model (rank 0, atomically)."""
        import torch.distributed as dist

        if self.progress is not None:
            self.progress.close()
        self.batches.close()  # the prefetch thread, and the sampler's Ray Data iterators (they hold resources)
        if self.rank == 0:
            self.steps_log.flush()
            sampler = self.batches.sampler
            target = {lang: float(p) for lang, p in zip(sampler.langs, sampler.p)}
            storage.write_text(storage.join(self.run_dir, MIX_FILE),
                               json.dumps(mix_summary(self.mix, target, sampler), indent=1))  # fmt: skip
        if not self.cfg.run.export or self.stopping:  # a stopped run exports when it is resumed and ends
            return
        state_dict = consolidated_state_dict(self.engine)  # collective under ZeRO-3
        if self.rank == 0:
            # Written on this node (beside the run on a local disk, so it is moved, not copied), then
            # published as a whole: uploaded once to remote storage, where every loader downloads it
            # into its node's cache (hbt_ray.storage.local_copy).
            remote = storage.is_uri(self.run_dir)
            parent = Path(tempfile.mkdtemp(prefix="hbt_export_")) if remote else Path(self.run_dir)
            staging = parent / f".model_staging_{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                export_from_state_dict(self.cfg.model, state_dict, staging, tokenizer=self.encoder.tokenizer,
                                       train_texts=self.job.tokenizer_texts)  # fmt: skip
                storage.publish_dir(staging, storage.join(self.run_dir, "model"))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                if remote:
                    shutil.rmtree(parent, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()


def _add_time(phase: dict[str, float], key: str, since: float) -> float:
    """Add the time since ``since`` to ``phase[key]``; returns now (the start of the next phase)."""
    now = time.perf_counter()
    phase[key] += now - since
    return now


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry: ``loop_config["job"]``, the :class:`TrainJob` built (and its config
    validated) by :func:`hbt_ray.train.driver.train`."""
    job: TrainJob = loop_config["job"]
    cfg = job.cfg
    if not use_gpu(cfg.run.use_gpu):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import ray.train

    ctx = ray.train.get_context()
    recipe = TrainRecipe(job, ctx.get_world_rank(), ctx.get_world_size())
    recipe.setup()
    recipe.resume()
    while not recipe.done:
        recipe.step()
        recipe.log()
        recipe.checkpoint()
    recipe.export()
