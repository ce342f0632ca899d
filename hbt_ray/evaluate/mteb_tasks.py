"""MTEB's own evaluator on our local eval sets (the ``mteb`` extra: ``pip install -e .[mteb]``).

``python -m hbt_ray.evaluate --mteb --model M --data tatoeba|xquad-r|mlqa-r|lareqa:PATH --out DIR`` runs
mteb's evaluation code — not ours — on the data hbt_ray reads from disk, with no hub access:

- Tatoeba: mteb's ``TatoebaBitextMining`` task (its metadata, its ``BitextMiningEvaluator``), whose
  ``load_data`` is replaced by our reader's pairs; subsets ``<lang>-eng``, ``sentence1`` = the language
  side, ``sentence2`` = English. mteb mines one direction, language → English: our ``to_eng``.
- XQuAD-R / MLQA-R (any LAReQA set): a retrieval task per language (subset = language; corpus = that
  language's candidate sentences, queries = its questions, qrels = the LAReQA labels): our ``mono``
  setting, scored by mteb's ``RetrievalEvaluator`` (pytrec_eval). Its ``map_at_1000`` is our ``map``
  when a language's pool has at most 1,000 candidates (mteb keeps the top 1,000 per query; full
  XQuAD-R pools hold 1,190, where its MAP can only be lower). The cross and multi settings and the
  language bias have no mteb counterpart.

The model is our :class:`~hbt_ray.model.DualEncoder` behind mteb's encoder protocol (queries with the
query prefix, documents with the passage prefix, both sides of a bitext pair as queries, as our own
evaluation does), so the two evaluations see the same embeddings. mteb writes its result JSON under
``DIR/mteb/``; :func:`compare` sets its scores beside ours (``tests/test_eval_mteb.py`` holds them equal).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from hbt_ray.config import ConfigError
from hbt_ray.data.records import BitextSet, EvalSet

#: Our LAReQA metric names → mteb's retrieval score keys (mteb ranks the top 1,000 per query).
RETRIEVAL_KEYS = {"map": "map_at_1000"}
#: The bitext scores both report, by the same names.
BITEXT_KEYS = ("accuracy", "precision", "recall", "f1")


def require_mteb() -> Any:
    """The ``mteb`` module, or a ConfigError saying how to install it (checked before Ray starts)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # our tasks load local data: the hub is never needed
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import mteb
    except ImportError as err:
        raise ConfigError(f"--mteb: needs the mteb package ({err}): pip install -e '.[mteb]'") from None
    return mteb


def mteb_key(metric: str) -> str:
    """``map`` → ``map_at_1000``, ``recall@10`` → ``recall_at_10`` (mteb's retrieval score names).

    >>> mteb_key("map"), mteb_key("ndcg@10")
    ('map_at_1000', 'ndcg_at_10')
    """
    if metric in RETRIEVAL_KEYS:
        return RETRIEVAL_KEYS[metric]
    family, _, k = metric.partition("@")
    return f"{family}_at_{k}"


def _encoder_adapter(encoder: Any, name: str, batch_size: int) -> Any:
    """Our DualEncoder as an mteb encoder (``AbsEncoder`` supplies mteb's cosine similarity)."""
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ScoringFunction
    from mteb.types import PromptType

    class HbtEncoder(AbsEncoder):
        def __init__(self) -> None:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
            self.mteb_model_meta = ModelMeta.create_empty(
                overwrites={"name": f"hbt_ray/{safe}", "revision": "local", "similarity_fn_name": ScoringFunction.COSINE}
            )

        def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
                   prompt_type: Any = None, **kwargs: Any) -> np.ndarray:  # fmt: skip
            kind = "passage" if prompt_type == PromptType.document else "query"
            texts = [t for batch in inputs for t in batch["text"]]
            return encoder.encode(texts, kind=kind, batch_size=batch_size)

    return HbtEncoder()


def tatoeba_task(bitext: BitextSet) -> Any:
    """mteb's Tatoeba task, loaded with ``bitext``'s pairs (subsets ``<lang>-eng``)."""
    from datasets import Dataset, DatasetDict
    from mteb.tasks.bitext_mining.multilingual.tatoeba_bitext_mining import TatoebaBitextMining

    known = set(TatoebaBitextMining.metadata.eval_langs)
    subsets = [f"{lang}-eng" for lang in bitext.langs]
    missing = [s for s in subsets if s not in known]
    if missing:
        raise ConfigError(f"--mteb: mteb's Tatoeba task has no subset {missing}")

    class LocalTatoeba(TatoebaBitextMining):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {
                f"{lang}-eng": DatasetDict({"test": Dataset.from_dict(
                    {"sentence1": bitext.sentences[lang], "sentence2": bitext.english[lang]})})  # fmt: skip
                for lang in bitext.langs
            }
            self.data_loaded = True

    task = LocalTatoeba()
    task.filter_languages(None, hf_subsets=subsets)
    return task


def retrieval_task(eval_set: EvalSet) -> Any:
    """A multilingual mteb retrieval task over ``eval_set``: one subset per language (its mono setting)."""
    from datasets import Dataset
    from mteb import TaskMetadata
    from mteb.abstasks import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    langs = eval_set.langs
    unknown = [lang for lang in langs if lang not in _LANGS]
    if unknown:
        raise ConfigError(f"--mteb: no ISO 639-3 code and script known for {unknown} (known: {sorted(_LANGS)})")
    scripts = {lang: [_LANGS[lang]] for lang in langs}
    name = "".join(c for c in eval_set.name.title() if c.isalnum()) or "Local"

    class LocalLareqa(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=f"HbtRay{name}Mono",
            description=f"{eval_set.name} (LAReQA) as monolingual retrieval per language, read by hbt_ray.",
            dataset={"path": f"local/{eval_set.name}", "revision": "local"},
            type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"],
            eval_langs=scripts, main_score="map_at_1000",
        )  # fmt: skip

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {}
            for lang in langs:
                cands, queries = eval_set.candidates[lang], eval_set.queries[lang]
                self.dataset[lang] = {"test": RetrievalSplitData(
                    corpus=Dataset.from_dict({"id": [c.cid for c in cands], "text": [c.text for c in cands],
                                              "title": [""] * len(cands)}),
                    queries=Dataset.from_dict({"id": [q.qid for q in queries], "text": [q.text for q in queries]}),
                    relevant_docs={q.qid: dict.fromkeys(q.relevant, 1) for q in queries},
                    top_ranked=None,
                )}  # fmt: skip
            self.data_loaded = True

    return LocalLareqa()


#: mteb's ``lang-Script`` codes (ISO 639-3, ISO 15924) of the XQuAD-R / MLQA-R languages.
_LANGS = {"ar": "ara-Arab", "de": "deu-Latn", "el": "ell-Grek", "en": "eng-Latn", "es": "spa-Latn",
          "hi": "hin-Deva", "ru": "rus-Cyrl", "th": "tha-Thai", "tr": "tur-Latn", "vi": "vie-Latn",
          "zh": "zho-Hans"}  # fmt: skip


def run_mteb(model: str, eval_set: EvalSet | BitextSet, out_dir: str | os.PathLike, batch_size: int = 64) -> dict:
    """Run mteb's evaluator on ``eval_set`` with ``model`` (a model spec or exported dir); mteb writes its
    result JSON under ``out_dir/mteb``. → ``{"task": name, "scores": {subset: {metric: value}}, "files": [...]}``."""
    mteb = require_mteb()
    from hbt_ray.evaluate.encode import load_encoder

    encoder = load_encoder(model)
    task = tatoeba_task(eval_set) if isinstance(eval_set, BitextSet) else retrieval_task(eval_set)
    cache_dir = Path(out_dir) / "mteb"
    result = mteb.evaluate(
        _encoder_adapter(encoder, str(model), batch_size), [task], cache=mteb.ResultCache(str(cache_dir)),
        overwrite_strategy="always", co2_tracker=False, show_progress_bar=False,
        encode_kwargs={"batch_size": batch_size},
    )  # fmt: skip
    (task_result,) = result.task_results
    scores = {
        row["hf_subset"].removesuffix("-eng"): {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        for row in task_result.scores["test"]
    }
    files = sorted(str(p) for p in cache_dir.rglob(f"{task_result.task_name}.json"))
    return {"task": task_result.task_name, "scores": scores, "files": files}


def compare(ours: Any, theirs: dict) -> list[dict[str, Any]]:
    """Per language and metric: our score, mteb's, the difference — our ``to_eng`` bitext scores, or our
    ``mono`` retrieval scores (:data:`RETRIEVAL_KEYS`)."""
    rows = []
    for lang, scores in sorted(theirs["scores"].items()):
        if hasattr(ours, "per_lang"):  # a BitextResult
            mine = {k: ours.per_lang[lang]["to_eng"][k] for k in BITEXT_KEYS}
        else:
            mine = {mteb_key(k): v for k, v in ours.mono[lang].items() if mteb_key(k) in scores}
        for key, value in mine.items():
            rows.append({"lang": lang, "metric": key, "hbt_ray": value, "mteb": scores[key],
                         "diff": value - scores[key]})  # fmt: skip
    return rows


def to_markdown(theirs: dict, comparison: list[dict[str, Any]] | None = None) -> str:
    """mteb's scores per subset (main score and the metrics both report), or the comparison table."""
    lines = [f"# mteb {theirs['task']}", ""]
    if comparison:
        lines += ["| lang | metric | hbt_ray | mteb | diff |", "|---|---|---|---|---|"]
        lines += [f"| {r['lang']} | {r['metric']} | {r['hbt_ray']:.6f} | {r['mteb']:.6f} | {r['diff']:+.1e} |"
                  for r in comparison]  # fmt: skip
    else:
        keys = ["main_score", *[k for k in (*BITEXT_KEYS, "map_at_1000", "ndcg_at_10", "mrr_at_10")
                                if any(k in s for s in theirs["scores"].values())]]  # fmt: skip
        lines += ["| subset | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for subset, s in sorted(theirs["scores"].items()):
            lines.append(f"| {subset} | " + " | ".join(f"{s.get(k, float('nan')):.4f}" for k in keys) + " |")
    lines += ["", "mteb result files: " + ", ".join(f"`{f}`" for f in theirs["files"])]
    return "\n".join(lines) + "\n"
