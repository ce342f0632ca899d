"""The eval section: what to evaluate (eval set, languages, subset) and how (settings, metrics, FAISS
index, sharding, encoding). One :class:`EvalConfig` serves the trainer's intermediate evals, the tuner,
``python -m hbt_ray.evaluate`` and ``scripts/reproduce.py``; :data:`METRIC_MODES` is the repo's one table of
which way each summary metric is better.

    >>> cfg = EvalConfig(langs=["en", "de"], max_paragraphs=5, show_progress=False)
    >>> cfg.validate()
    >>> cfg.data, cfg.settings
    ('xquad-r', ['mono', 'cross', 'multi'])
    >>> EvalConfig(num_shards=0).validate()
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: num_shards: must be >= 1, got 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hbt_ray.config import ConfigError
from hbt_ray.data.records import LANG_RE
from hbt_ray.data.sources import absolute_spec, check_spec, is_bitext_spec, known_langs

#: Retrieval settings (see :mod:`hbt_ray.evaluate`).
SETTINGS = ("mono", "cross", "multi")
#: Metric families with a cutoff; with ``map`` (full ranking) a metric is ``map`` or ``family@k``.
METRIC_FAMILIES = ("recall", "ndcg", "mrr")
DEFAULT_METRICS = ["map", "recall@1", "recall@10", "ndcg@10", "mrr@10", "recall@100"]
#: Which way each objective-worthy summary metric is better: every mAP is maximised, the language bias
#: (rank distance) minimised. The one such table of the repo (the tuner and reproduce.py read it).
METRIC_MODES: dict[str, Literal["max", "min"]] = {
    "mono_map": "max",
    "cross_map": "max",
    "multi_map": "max",
    "mean_map": "max",
    "bias": "min",
    # Tatoeba (hbt_ray.evaluate.bitext): nearest-neighbour accuracy, both directions averaged, over all
    # languages and per langs.tsv group; MTEB's main score (F1, language → English); the pooled variant.
    "tatoeba_acc": "max",
    "tatoeba_inside_xlmr_acc": "max",
    "tatoeba_outside_xlmr_acc": "max",
    "tatoeba_to_eng_f1": "max",
    "tatoeba_inside_xlmr_to_eng_f1": "max",
    "tatoeba_outside_xlmr_to_eng_f1": "max",
    "tatoeba_pooled_acc": "max",
    "tatoeba_pooled_mrr@10": "max",
    # MIRACL (monolingual retrieval): its measures, over all languages and the low-resource ones
    "mono_ndcg@10": "max",
    "mono_recall@100": "max",
    "mono_low_resource_ndcg@10": "max",
    "mono_low_resource_recall@100": "max",
}


@dataclass
class IndexConfig:
    """FAISS index per candidate pool. ``flat`` = exact inner product (the default and the reference)."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"  # flat: exact; ivf / hnsw: approximate, for big pools
    nlist: int = 64  # ivf: number of clusters (capped at pool size / 39, FAISS's minimum per cluster)
    nprobe: int = 16  # ivf: clusters searched per query
    hnsw_m: int = 32  # hnsw: neighbours per node
    ef_construction: int = 80  # hnsw: candidate list size while building
    ef_search: int = 256  # hnsw: candidate list size while searching (raised to k when k is larger)

    def validate(self) -> None:
        for key in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class EvalConfig:
    """What to evaluate and how. Load with ``load_config(EvalConfig, yaml, ["index.kind=hnsw"])``;
    :func:`hbt_ray.evaluate.load_eval_data` reads the eval set it names."""

    # --- what: the eval set and its subset
    data: str = "xquad-r"  # eval set spec for hbt_ray.data.sources.load_eval_set (xquad-r, tatoeba, …)
    langs: list[str] | None = None  # languages to keep; None (or empty) = all of the eval set
    max_paragraphs: int | None = None  # keep the first N whole parallel paragraphs; None = all
    subset_seed: int | None = None  # draw the N paragraphs at random with this seed; None = the first N
    #: drop the first N paragraphs before keeping max_paragraphs: a dev pool disjoint from the first one
    skip_paragraphs: int = 0
    max_pairs: int | None = None  # tatoeba: keep the first N pairs of every language; None = all
    #: tatoeba: drop the first N pairs of every language before keeping max_pairs (a dev split disjoint
    #: from the first pairs a report shows)
    skip_pairs: int = 0
    #: xquad-r / mlqa-r not in the data folder: fetch the public files (checksum-verified); false = an error
    download: bool = False
    #: miracl:PATH: the candidates of a language — its whole corpus, or only the passages judged for
    #: some topic of the split (small pools, as MIRACL's judged-only evaluations use)
    miracl_pool: Literal["corpus", "judged"] = "corpus"
    # --- how: settings, metrics, search
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))  # of mono, cross, multi
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))  # map, recall@k, ndcg@k, mrr@k
    index: IndexConfig = field(default_factory=IndexConfig)  # the FAISS index per candidate pool
    num_shards: int = 1  # search actors; 1 = in-process FAISS (no Ray), >1 = Ray actors (search_mode)
    #: ``shard_candidates``: each actor holds a slice of every pool, queries broadcast, top-k merged.
    #: ``split_queries``: each actor holds whole pools and searches a slice of the queries.
    search_mode: Literal["shard_candidates", "split_queries"] = "shard_candidates"
    shard_num_cpus: float = 1.0  # Ray CPUs each search actor asks for
    # --- how: encoding
    #: where a model given by spec or directory is encoded: ``actors`` (a Ray Data pool of ``concurrency``
    #: encoder actors), ``process`` (the evaluating process itself), ``auto``: this process when the pool
    #: would be one CPU actor on this same machine (see ``hbt_ray.evaluate.placement.encodes_here``)
    encode_on: Literal["auto", "process", "actors"] = "auto"
    batch_size: int = 64  # encode batch size (rows per map_batches call)
    concurrency: int = 1  # encoder actors on Ray Data (for a model given by spec or directory)
    cpus_per_actor: float = 1.0  # Ray CPUs each CPU encoder actor asks for
    actor_threads: int = 0  # torch intra-op threads per encoder actor; 0 = what Ray sets (its CPUs)
    num_gpus: float | None = None  # per encoder actor; None = 1 if the cluster has GPUs, else 0
    float16: bool = False  # keep/transfer/cache embeddings as float16 (FAISS still searches float32)
    cache_dir: str | None = None  # on-disk embedding cache; None = no cache
    show_progress: bool = True  # progress bars for encoding and search

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key relative to this section (the loader adds the path)."""
        try:
            check_spec(self.data, "eval")
        except ValueError as err:
            raise ConfigError(f"data: {err}") from None
        self.data = absolute_spec(self.data)
        check_langs("langs", self.langs or [], [self.data])
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ConfigError(f"settings: {bad or self.settings!r} not in {list(SETTINGS)}")
        if not self.metrics:
            raise ConfigError("metrics: give at least one (e.g. [map, recall@10])")
        for name in self.metrics:
            parse_metric(name)
        for key in ("cpus_per_actor", "shard_num_cpus"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.actor_threads < 0:
            raise ConfigError(f"actor_threads: must be >= 0, got {self.actor_threads}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"num_gpus: must be >= 0 (null: by the cluster), got {self.num_gpus}")
        for key in ("num_shards", "batch_size", "concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.skip_paragraphs < 0 or (self.skip_paragraphs and self.max_paragraphs is None):
            raise ConfigError(f"skip_paragraphs: must be >= 0 and needs max_paragraphs, got {self.skip_paragraphs}")
        if self.max_paragraphs is not None and self.max_paragraphs < 1:
            raise ConfigError(f"max_paragraphs: must be >= 1, got {self.max_paragraphs}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"max_pairs: must be >= 1, got {self.max_pairs}")
        if self.skip_pairs < 0:
            raise ConfigError(f"skip_pairs: must be >= 0, got {self.skip_pairs}")
        # Each subset key fits one kind of set; the other one would be dropped without a word.
        if is_bitext_spec(self.data) and self.max_paragraphs is not None:
            raise ConfigError(
                f"max_paragraphs: {self.data} has no paragraphs: set max_pairs (and max_paragraphs=null)"
            )
        if not is_bitext_spec(self.data) and self.max_pairs is not None:
            raise ConfigError(f"max_pairs: only for tatoeba[:PATH]; {self.data} is subset by max_paragraphs")
        if not is_bitext_spec(self.data) and self.skip_pairs:
            raise ConfigError(f"skip_pairs: only for tatoeba[:PATH]; {self.data} has skip_paragraphs")
        if self.data.startswith("miracl:") and self.settings != ["mono"]:
            # MIRACL's topics have no parallel copies: cross is empty, multi would search every corpus
            if self.settings == list(SETTINGS):  # the default: MIRACL's one setting instead
                self.settings = ["mono"]
            else:
                raise ConfigError(f"settings: {self.settings}: MIRACL is monolingual retrieval: settings=[mono]")
        if self.miracl_pool != "corpus" and not self.data.startswith("miracl:"):
            raise ConfigError(f"miracl_pool: only for miracl:PATH, not {self.data}")


def check_langs(key: str, langs: list[str], specs: list[str]) -> None:
    """Every one of ``langs`` a language code and, where every data set of ``specs`` has a known language
    list, a language of one of them; else ConfigError naming ``key``. Reads no data.

    >>> check_langs("langs", ["en", "pt-br"], ["pairs:p.jsonl"])
    >>> check_langs("langs", ["English"], ["ddtp"])
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: langs: 'English' is not a language code (ISO 639-1/-3, optionally with a region: en, pt-br)
    >>> check_langs("langs", ["fr"], ["mlqa-r"])
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: langs: 'fr' is not a language of mlqa-r (ar, de, en, es, hi, vi, zh)
    """
    for lang in langs:
        if not LANG_RE.match(lang):
            raise ConfigError(
                f"{key}: {lang!r} is not a language code (ISO 639-1/-3, optionally with a region: en, pt-br)"
            )
    known = [known_langs(spec) for spec in specs]
    if not known or any(k is None for k in known):
        return  # a data set whose languages only its files know: checked when it is read
    have = sorted({lang for k in known for lang in k or ()})
    for lang in langs:
        if lang not in have:
            raise ConfigError(f"{key}: {lang!r} is not a language of {', '.join(specs)} ({', '.join(have)})")


def parse_metric(name: str) -> tuple[str, int | None]:
    """``"ndcg@10"`` → ``("ndcg", 10)``; ``"map"`` → ``("map", None)``; errors name the metric.

    >>> parse_metric("ndcg@10"), parse_metric("map")
    (('ndcg', 10), ('map', None))
    >>> parse_metric("p@1")
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: metrics: unknown metric 'p@1' (use map, recall@k, ndcg@k, mrr@k)
    """
    if name == "map":
        return "map", None
    family, _, cut = name.partition("@")
    if family not in METRIC_FAMILIES or not cut.isdigit() or int(cut) < 1:
        raise ConfigError(f"metrics: unknown metric {name!r} (use map, recall@k, ndcg@k, mrr@k)")
    return family, int(cut)
