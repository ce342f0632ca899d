"""Bitext retrieval (Tatoeba): per language L, each L sentence's nearest English neighbour (``to_eng``)
and each English sentence's nearest L neighbour (``from_eng``), among that language's pairs; and the
**pooled** variant: each English sentence against the sentences of every language at once.

Metrics per language and direction, named as MTEB's ``BitextMiningEvaluator`` names them and computed
as it does (the gold of query i is candidate i; sklearn's ``average="weighted"`` over the candidate
indices, each of which is the gold of exactly one query): ``accuracy`` (share of queries whose top-1 is
their translation, = ``recall``), ``precision`` (mean over candidates c of [c found by its own query] /
[queries whose top-1 is c]) and ``f1`` (mean of 2 / (1 + that count) over candidates found by their own
query). MTEB's Tatoeba main score is ``f1`` with the language side as the query, i.e. our ``to_eng``
``f1``, averaged over languages. Differences from mteb: we search with FAISS's exact inner product on
the L2-normalised embeddings (= cosine; a tie goes to the lower row, torch.topk breaks ties as it
likes), and both sides are encoded as ``query`` (the encoder's query prefix: a symmetric task).

Averages (:func:`summarize`): macro over languages, over all of them and over each ``langs.tsv`` group
(inside / outside XLM-R). ``acc`` is the mean of the two directions' accuracy (LASER's convention:
the Tatoeba error rate is the mean of both directions').

    >>> mteb_scores(np.array([0, 0, 2]))  # query 1 found candidate 0: two queries claim 0, none claims 1
    {'accuracy': 0.6666666666666666, 'precision': 0.5, 'recall': 0.6666666666666666, 'f1': 0.5555555555555555}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from hbt_ray.config import bars_off
from hbt_ray.data.records import BITEXT_GROUPS, BitextSet
from hbt_ray.evaluate.bitext_result import BitextResult
from hbt_ray.evaluate.config import EvalConfig
from hbt_ray.evaluate.encode import ModelSpec, TextEncoder, is_model_spec, model_config
from hbt_ray.evaluate.placement import encode_texts
from hbt_ray.evaluate.search import LocalSearcher, RaySearcher, make_searcher

DIRECTIONS = ("to_eng", "from_eng")
#: MTEB's BitextMining metric names, in its order.
MTEB_METRICS = ("accuracy", "precision", "recall", "f1")
#: The pooled variant's cutoff for the reciprocal rank (its full ranking would be pool × pool).
POOLED_MRR = "mrr@10"


def mteb_scores(predictions: np.ndarray) -> dict[str, float]:
    """MTEB's bitext-mining scores of top-1 ``predictions`` (row i = the candidate query i retrieved;
    query i's translation is candidate i): sklearn's weighted precision / recall / F1 and accuracy, in
    closed form (every candidate index is the gold of one query, so the weights are equal)."""
    pred = np.asarray(predictions, dtype=np.int64)
    n = len(pred)
    correct = pred == np.arange(n)
    claimed = np.bincount(pred[pred >= 0], minlength=n)[:n]  # queries whose top-1 is candidate c
    safe = np.maximum(claimed, 1)
    return {
        "accuracy": float(correct.mean()),
        "precision": float(np.where(correct, 1.0 / safe, 0.0).mean()),
        "recall": float(correct.mean()),
        "f1": float(np.where(correct, 2.0 / (1.0 + safe), 0.0).mean()),
    }


def bitext_texts(bitext: BitextSet) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every distinct text once (English sentences recur across languages), and per language the rows
    of its sentences and of its English side in that list.

    >>> b = BitextSet("t", {"deu": ["Ja.", "Nein."], "nld": ["Ja."]},
    ...               {"deu": ["Yes.", "No."], "nld": ["Yes."]})
    >>> texts, rows, eng_rows = bitext_texts(b)
    >>> texts, rows["nld"].tolist(), eng_rows["nld"].tolist()
    (['Ja.', 'Nein.', 'Yes.', 'No.'], [0], [2])
    """
    index: dict[str, int] = {}
    rows, eng_rows = {}, {}
    for side, out in (("sentences", rows), ("english", eng_rows)):
        for lang in bitext.langs:
            out[lang] = np.asarray(
                [index.setdefault(t, len(index)) for t in getattr(bitext, side)[lang]], np.int64
            )
    return list(index), rows, eng_rows


def evaluate_bitext_embeddings(
    bitext: BitextSet,
    sentences: dict[str, np.ndarray],
    english: dict[str, np.ndarray],
    cfg: EvalConfig,
    searcher_factory: Callable[[EvalConfig], LocalSearcher | RaySearcher] = make_searcher,
) -> BitextResult:
    """Both directions per language, the pooled variant and the averages, on precomputed (L2-normalised)
    embeddings: ``sentences[lang]`` / ``english[lang]`` rows follow ``bitext``'s lines."""
    t0 = time.perf_counter()
    langs = bitext.langs
    for lang in langs:
        n = len(bitext.sentences[lang])
        if sentences[lang].shape[0] != n or english[lang].shape[0] != n:
            raise ValueError(f"{bitext.name}/{lang}: embeddings do not match its {n} pairs")
    searcher = searcher_factory(cfg)
    per_lang: dict[str, dict[str, dict[str, float]]] = {}
    bar = tqdm(total=len(langs) + 1, desc=f"search {bitext.name}", disable=bars_off(cfg.show_progress))
    try:
        for lang in langs:
            searcher.add_pool(lang, sentences[lang])
            searcher.add_pool(f"eng@{lang}", english[lang])
            _, to_eng = searcher.search(f"eng@{lang}", sentences[lang], 1)
            _, from_eng = searcher.search(lang, english[lang], 1)
            per_lang[lang] = {"to_eng": mteb_scores(to_eng[:, 0]), "from_eng": mteb_scores(from_eng[:, 0])}
            bar.update()
        pooled = _pooled(bitext, sentences, english, searcher)
        bar.update()
    finally:
        bar.close()
        searcher.close()
    result = BitextResult(bitext.name, {}, per_lang, pooled, dict(bitext.groups), config=asdict(cfg))
    result.summary = summarize(per_lang, pooled["per_lang"], bitext.groups)
    result.counts = {"langs": langs, "pairs": bitext.counts()}
    result.timings["search_metrics_s"] = time.perf_counter() - t0
    return result


def _pooled(
    bitext: BitextSet,
    sentences: dict[str, np.ndarray],
    english: dict[str, np.ndarray],
    searcher: LocalSearcher | RaySearcher,
) -> dict:
    """Every English sentence against the sentences of all languages: accuracy and MRR@10 per language
    of the English side, and which languages the wrong top-1 hits fall into."""
    langs = bitext.langs
    sizes = [len(bitext.sentences[lang]) for lang in langs]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.repeat(np.arange(len(langs)), sizes)  # pool row → its language
    searcher.add_pool("*pooled*", np.concatenate([sentences[lang] for lang in langs]))
    k = min(int(POOLED_MRR.partition("@")[2]), int(offsets[-1]))
    per_lang: dict[str, dict[str, float]] = {}
    wrong: dict[str, dict[str, int]] = {}
    for li, lang in enumerate(langs):
        _, ids = searcher.search("*pooled*", english[lang], k)
        gold = offsets[li] + np.arange(sizes[li])
        # One relevant row per query: its rank is where it sits in the top k (metrics.relevant_ranks would
        # allocate queries × pool).
        found = ids == gold[:, None]
        ranks = np.where(found.any(axis=1), found.argmax(axis=1) + 1.0, np.inf)
        hit = ids[:, 0] == gold
        per_lang[lang] = {"accuracy": float(hit.mean()), POOLED_MRR: float(np.mean(1.0 / ranks))}
        absorbed = np.bincount(owner[ids[~hit, 0]], minlength=len(langs))
        wrong[lang] = {langs[j]: int(c) for j, c in enumerate(absorbed) if c}
    absorbed_total = {m: sum(w.get(m, 0) for w in wrong.values()) for m in langs}
    from_other = {m: sum(w.get(m, 0) for src, w in wrong.items() if src != m) for m in langs}
    n_all = int(offsets[-1])
    return {
        "per_lang": per_lang,
        "wrong_top1": wrong,  # language of the English query → language of a wrong top-1 hit → count
        "absorbed": {m: c for m, c in sorted(absorbed_total.items(), key=lambda t: -t[1]) if c},
        "absorbed_from_other_langs": {m: c for m, c in sorted(from_other.items(), key=lambda t: -t[1]) if c},
        "micro": {
            "queries": n_all,
            "pool": n_all,
            "accuracy": sum(per_lang[x]["accuracy"] * n for x, n in zip(langs, sizes)) / max(n_all, 1),
        },  # fmt: skip
    }


def summarize(
    per_lang: dict[str, dict[str, dict[str, float]]],
    pooled: dict[str, dict[str, float]],
    groups: dict[str, str],
) -> dict[str, float]:
    """The flat summary (Ray Tune objectives): for all languages (prefix ``tatoeba_``) and each group
    with languages (``tatoeba_inside_xlmr_``, …): ``acc`` (both directions), ``{to,from}_eng_{accuracy,f1}``
    and the pooled ``tatoeba_pooled_[group_]{acc,mrr@10}``. Macro averages over languages.

    >>> s = summarize({"deu": {"to_eng": {"accuracy": 1.0, "f1": 1.0},
    ...                        "from_eng": {"accuracy": 0.5, "f1": 0.4}}},
    ...               {"deu": {"accuracy": 0.5, "mrr@10": 0.75}}, {"deu": "inside_xlmr"})
    >>> s["tatoeba_acc"], s["tatoeba_inside_xlmr_to_eng_f1"], s["tatoeba_pooled_acc"]
    (0.75, 1.0, 0.5)
    >>> "tatoeba_outside_xlmr_acc" in s  # no language of that group: no key (never a NaN objective)
    False
    """
    out: dict[str, float] = {}
    selections = [("", sorted(per_lang))]
    selections += [(f"{g}_", [x for x in sorted(per_lang) if groups.get(x) == g]) for g in BITEXT_GROUPS]
    for prefix, langs in selections:
        if not langs:
            continue  # no NaN objective: a group without languages has no key
        out[f"tatoeba_{prefix}acc"] = _mean(
            [(per_lang[x]["to_eng"]["accuracy"] + per_lang[x]["from_eng"]["accuracy"]) / 2 for x in langs]
        )
        for d in DIRECTIONS:
            for m in ("accuracy", "f1"):
                out[f"tatoeba_{prefix}{d}_{m}"] = _mean([per_lang[x][d][m] for x in langs])
        out[f"tatoeba_pooled_{prefix}acc"] = _mean([pooled[x]["accuracy"] for x in langs])
        out[f"tatoeba_pooled_{prefix}{POOLED_MRR}"] = _mean([pooled[x][POOLED_MRR] for x in langs])
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def subset_bitext(bitext: BitextSet, cfg: EvalConfig) -> BitextSet:
    """Apply ``cfg.langs``, ``cfg.max_pairs`` and ``cfg.skip_pairs``; a no-op on the set
    ``load_eval_data(cfg)`` returns."""
    if cfg.langs:
        bitext = bitext.select_langs(cfg.langs)
    # a set load_eval_data already cut has had its skip: skipping again would drop other pairs
    skip = 0 if "skip_pairs" in bitext.meta else cfg.skip_pairs
    if cfg.max_pairs is not None or skip:
        bitext = bitext.head(cfg.max_pairs, skip)
    return bitext


def evaluate_bitext(model: ModelSpec | TextEncoder, bitext: BitextSet, cfg: EvalConfig) -> BitextResult:
    """Encode every distinct text once (Ray Data actors for a spec, this process for an encoder; the
    embedding cache of ``cfg.cache_dir``), then :func:`evaluate_bitext_embeddings`."""
    t0 = time.perf_counter()
    bitext = subset_bitext(bitext, cfg)
    texts, rows, eng_rows = bitext_texts(bitext)
    matrix = encode_texts(model, texts, ["query"] * len(texts), cfg)
    encode_s = time.perf_counter() - t0
    sentences = {lang: matrix[rows[lang]] for lang in bitext.langs}
    english = {lang: matrix[eng_rows[lang]] for lang in bitext.langs}
    result = evaluate_bitext_embeddings(bitext, sentences, english, cfg)
    result.counts["distinct_texts"] = len(texts)
    result.timings = {"encode_s": encode_s, **result.timings, "total_s": time.perf_counter() - t0}
    result.config["model"] = model_config(model).name if is_model_spec(model) else type(model).__name__
    return result
