"""Distributed FAISS evaluation: mono, cross and multi retrieval, language bias.

Stage modules: :mod:`~hbt_ray.evaluate.config` (:class:`EvalConfig`: what to evaluate and how;
:data:`METRIC_MODES`) → :mod:`~hbt_ray.evaluate.encode` (in process, or Ray Data over a pool of
:class:`EncoderActor`, cached on disk) → :mod:`~hbt_ray.evaluate.search` (FAISS, optionally sharded
across Ray actors) → :mod:`~hbt_ray.evaluate.metrics` (mAP, recall@k, nDCG@k, MRR@k, rank distance) →
:mod:`~hbt_ray.evaluate.result` (:class:`EvalResult`: JSON, markdown, heatmap);
:mod:`~hbt_ray.evaluate.bitext` (Tatoeba: bitext retrieval both ways, MTEB's metrics, the pooled variant)
→ :mod:`~hbt_ray.evaluate.bitext_result` (:class:`BitextResult`: JSON, markdown, accuracy PNG);
:mod:`~hbt_ray.evaluate.run` ties them together (:func:`evaluate`, :func:`evaluate_embeddings`,
:func:`load_eval_data`). The CLI is ``python -m hbt_ray.evaluate`` (``__main__.py``).

    >>> cfg = EvalConfig(langs=["en", "de"], max_paragraphs=2, show_progress=False)
    >>> eval_set = load_eval_data(cfg)
    >>> from hbt_ray.model import ModelConfig, load_dual_encoder
    >>> result = evaluate(load_dual_encoder(ModelConfig(name="tiny")), eval_set, cfg)
    >>> sorted(result.cross), 0.0 <= result.summary["multi_map"] <= 1.0
    (['de→en', 'en→de'], True)
"""

from hbt_ray.evaluate.bitext import (
    DIRECTIONS,
    MTEB_METRICS,
    evaluate_bitext,
    evaluate_bitext_embeddings,
    mteb_scores,
    summarize,
)
from hbt_ray.evaluate.bitext_result import BitextResult
from hbt_ray.evaluate.config import (
    DEFAULT_METRICS,
    METRIC_FAMILIES,
    METRIC_MODES,
    SETTINGS,
    EvalConfig,
    IndexConfig,
    parse_metric,
)
from hbt_ray.evaluate.encode import (
    EncoderActor,
    EvalEmbeddings,
    ModelSpec,
    TextEncoder,
    encode_eval_set,
    encode_texts_ray,
    is_model_spec,
    load_encoder,
    model_config,
    model_fingerprint,
    spec_fingerprint,
    texts_fingerprint,
)
from hbt_ray.evaluate.metrics import metrics_from_ranks, rank_distance, relevant_ranks
from hbt_ray.evaluate.placement import (
    encode_eval_set_model,
    encode_model,
    encode_texts,
    encodes_here,
    release_encoders,
)
from hbt_ray.evaluate.result import EvalResult
from hbt_ray.evaluate.run import evaluate, evaluate_embeddings, load_eval_data, subset_eval_set
from hbt_ray.evaluate.search import (
    LocalSearcher,
    RaySearcher,
    SearchShard,
    build_index,
    make_searcher,
    merge_topk,
    search_index,
)

__all__ = [
    "DEFAULT_METRICS",
    "DIRECTIONS",
    "MTEB_METRICS",
    "BitextResult",
    "METRIC_FAMILIES",
    "METRIC_MODES",
    "SETTINGS",
    "EncoderActor",
    "EvalConfig",
    "EvalEmbeddings",
    "EvalResult",
    "IndexConfig",
    "LocalSearcher",
    "ModelSpec",
    "RaySearcher",
    "SearchShard",
    "TextEncoder",
    "build_index",
    "encode_eval_set",
    "encode_eval_set_model",
    "encode_texts",
    "encode_model",
    "encode_texts_ray",
    "encodes_here",
    "evaluate_bitext",
    "evaluate_bitext_embeddings",
    "mteb_scores",
    "summarize",
    "evaluate",
    "evaluate_embeddings",
    "is_model_spec",
    "load_encoder",
    "load_eval_data",
    "make_searcher",
    "merge_topk",
    "metrics_from_ranks",
    "model_config",
    "model_fingerprint",
    "parse_metric",
    "rank_distance",
    "relevant_ranks",
    "release_encoders",
    "search_index",
    "spec_fingerprint",
    "subset_eval_set",
    "texts_fingerprint",
]
