"""Benchmark: what DeepSpeed ZeRO buys a large encoder — peak memory per worker and time per step at ZeRO
0, 1, 2, 3 and 3 with the optimizer and parameters offloaded.

Two gloo worker processes (DeepSpeed's CPU accelerator) train an encoder of xlm-roberta-large's shape
(24 layers, hidden 1024, 16 heads, a 250,002-token vocabulary: ~560M parameters; ``--size base`` for
xlm-roberta-base's, ``tiny`` for the test) from random weights — nothing to download — the way the trainer
does: :class:`~hbt_ray.loss.ContrastiveModule` (InfoNCE, in-batch negatives gathered over the workers),
the trainer's AdamW, and DeepSpeed's engine built by :func:`hbt_ray.train.deepspeed.deepspeed_config`
(fp32; the CPU box has no bf16 units). The batches are random token ids, ``--seq`` tokens, ``--pairs``
pairs per worker: memory is dominated by the weights, gradients and optimizer state, which is what ZeRO
partitions. Every side runs in fresh processes, so a worker's peak RSS (``ru_maxrss``) is that side's;
its step time is the slowest worker's, the median over ``--steps`` timed steps after ``--warmup``. As in
the trainer, each worker builds the whole model before DeepSpeed partitions it, so the peak includes one
full copy of the weights at every stage; the report also gives the memory a worker still holds after its
steps (``VmRSS``), which is what the stage keeps while it trains.

    python scripts/bench_zero.py --out results/bench_zero.txt

``--freeze-word-embeddings`` (default on, as the CPU recipe trains e5-small) leaves the 256M-parameter
word-embedding table out of the gradients and optimizer state, so that stage 0 (every worker holding all
of them) fits this 23.5 GiB box twice; ``--no-freeze-word-embeddings`` trains it too, where memory allows.

Ends with ``RESULT mem_zero1=<peak RSS stage 1 / stage 0> mem_zero2=... mem_zero3=... mem_zero3_offload=...
time_zero1=<s per step stage 1 / stage 0> time_zero2=... time_zero3=... time_zero3_offload=...``; a side whose
workers did not finish (on this box: killed for memory) is reported, and its ratios are ``failed``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import resource
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import Report  # noqa: E402  (scripts/, beside this file)

#: (name, ZeRO stage, offload optimizer and parameters), in the order they run
SIDES = [("zero0", 0, False), ("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False),
         ("zero3_offload", 3, True)]  # fmt: skip
#: transformers XLMRobertaConfig fields of the encoder shapes
SHAPES = {
    "large": {"vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096},
    "base": {"vocab_size": 250002, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072},
    "tiny": {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64},
}  # fmt: skip


def _worker(rank: int, world: int, init: str, out: str, side: tuple, args_dict: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from hbt_ray.loss import ContrastiveModule, LossConfig
    from hbt_ray.model import ModelConfig
    from hbt_ray.model.encoder import DualEncoder
    from hbt_ray.train.config import DeepSpeedConfig, OptimConfig
    from hbt_ray.train.deepspeed import build_optimizer, deepspeed_config

    _, stage, offload = side
    torch.set_num_threads(args_dict["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3600))  # fmt: skip
    torch.manual_seed(0)
    shape = SHAPES[args_dict["size"]]
    config = XLMRobertaConfig(**shape, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    backbone = XLMRobertaModel(config, add_pooling_layer=False)
    # The encoder as the trainer builds it, minus the tokenizer: the batches are token ids already.
    model_cfg = ModelConfig(name="tiny", pooling="mean", freeze_word_embeddings=args_dict["freeze_word_embeddings"])
    module = ContrastiveModule(DualEncoder(model_cfg, backbone, tokenizer=None), LossConfig(temperature=0.05))
    optim = OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant")
    ds = DeepSpeedConfig(zero_stage=stage, offload_optimizer=offload, offload_param=offload, single_worker_stage=None)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=build_optimizer(module, optim, ds), dist_init_required=False,
        config=deepspeed_config(optim, ds, 100, args_dict["pairs"], world),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(rank)
    n, seq, vocab = args_dict["pairs"], args_dict["seq"], shape["vocab_size"]
    ids = [torch.randint(5, vocab, (n, seq), generator=gen) for _ in range(2)]
    mask = torch.ones(n, seq, dtype=torch.long)
    times = []
    for step in range(args_dict["warmup"] + args_dict["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = engine(ids[0], mask, ids[1], mask)
        engine.backward(loss)
        engine.step()
        dist.barrier()
        if step >= args_dict["warmup"]:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"{out}/rank{rank}.pkl", "wb") as fh:
        pickle.dump({"times": times, "peak_mb": peak_mb, "held_mb": _rss_mb(), "params": total,
                     "trainable": trainable}, fh)  # fmt: skip
    dist.destroy_process_group()


def _rss_mb() -> float:
    """This process's resident memory now (after the timed steps: what the stage holds while training)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_side(side: tuple, args: argparse.Namespace) -> dict:
    """One side in fresh worker processes → its step time (slowest worker, median) and peak RSS per worker."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.workers, f"{tmp}/pg", tmp, side, vars(args)), nprocs=args.workers, join=True)
        ranks = [pickle.loads(Path(f"{tmp}/rank{r}.pkl").read_bytes()) for r in range(args.workers)]
    times = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]
    return {"name": side[0], "stage": side[1], "offload": side[2], "times": times, "step_s": statistics.median(times),
            "peak_mb": max(r["peak_mb"] for r in ranks), "held_mb": max(r["held_mb"] for r in ranks),
            "params": ranks[0]["params"],
            "trainable": ranks[0]["trainable"]}  # fmt: skip


def ratios(results: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """(peak memory, step time) of every side relative to stage 0.

    >>> r = ratios({"zero0": {"peak_mb": 100.0, "step_s": 2.0}, "zero2": {"peak_mb": 40.0, "step_s": 3.0}})
    >>> r["zero2"]
    (0.4, 1.5)
    """
    base = results["zero0"]
    return {name: (r["peak_mb"] / base["peak_mb"], r["step_s"] / base["step_s"])
            for name, r in results.items() if name != "zero0"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="large")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per worker and step")
    parser.add_argument("--seq", type=int, default=16, help="tokens per text")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    parser.add_argument("--freeze-word-embeddings", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None, help="also write the report here")
    args = parser.parse_args()

    from hbt_ray.provenance import provenance, provenance_lines

    report = Report()
    say = report.say

    say("# scripts/bench_zero.py: DeepSpeed ZeRO stages on a large encoder (peak memory, time per step)")
    say(provenance_lines(provenance(), f"random weights, xlm-roberta-{args.size}'s shape {SHAPES[args.size]}"))
    say(f"- {args.workers} gloo workers x {args.threads} torch threads, fp32, AdamW; {args.pairs} pairs per worker of "
        f"{args.seq}-token texts; word embeddings {'frozen' if args.freeze_word_embeddings else 'trained'}; "
        f"{args.warmup} untimed + {args.steps} timed steps per side, each side in fresh processes")  # fmt: skip
    from torch.multiprocessing import ProcessExitedException

    results, failed = {}, {}
    for side in SIDES:
        try:
            with redirect_stdout(sys.stderr):
                results[side[0]] = run_side(side, args)
        except ProcessExitedException as err:  # e.g. a worker the kernel's OOM killer ended: it does not fit
            failed[side[0]] = str(err)
            say(f"  ran {side[0]:>13}: FAILED ({err}; SIGKILL: most likely out of memory)")
            continue
        r = results[side[0]]
        say(f"  ran {r['name']:>13}: step times {', '.join(f'{t:.2f}' for t in r['times'])} s")
    if "zero0" not in results:
        raise SystemExit("ZeRO stage 0 did not run: no ratios")
    first = next(iter(results.values()))
    say(f"parameters {first['params'] / 1e6:,.1f}M, trained {first['trainable'] / 1e6:,.1f}M")
    say(f"{'side':>14} {'ZeRO':>5} {'offload':>8} {'peak RSS/worker':>16} {'held after':>11} {'s/step':>8} "
        f"{'mem vs 0':>9} {'time vs 0':>10}")  # fmt: skip
    rel = ratios(results)
    for name, r in results.items():
        mem, t = rel.get(name, (1.0, 1.0))
        say(f"{name:>14} {r['stage']:>5} {'yes' if r['offload'] else 'no':>8} {r['peak_mb']:>13,.0f} MB "
            f"{r['held_mb']:>8,.0f} MB {r['step_s']:>8.2f} {mem:>9.2f} {t:>10.2f}")  # fmt: skip
    for name in failed:
        say(f"{name:>14}: did not run to the end here ({failed[name]})")
    rel.update(dict.fromkeys(failed, ("failed", "failed")))
    names = [name for name, *_ in SIDES if name in rel]

    def fmt(x: float | str) -> str:
        return x if isinstance(x, str) else f"{x:.2f}"

    say("RESULT " + " ".join(f"mem_{n}={fmt(rel[n][0])}" for n in names) + " "
        + " ".join(f"time_{n}={fmt(rel[n][1])}" for n in names))  # fmt: skip
    report.save(args.out)


if __name__ == "__main__":
    main()
