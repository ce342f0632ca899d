"""What a training run trained on: every step's pairs per query language and source (summed over the
workers), the run's totals beside each language's target share (``mix.json``), and the fallback ceiling
(``sampler.max_fallback_share``)."""

from __future__ import annotations

from typing import Any

from hbt_ray.data.records import DataError

#: Steps before the fallback share is held to ``sampler.max_fallback_share`` (one short early step of a
#: few pairs is not yet a share).
FALLBACK_GRACE_STEPS = 10


class FallbackShareError(DataError):
    """Too many pairs were not of their step's kind (see the sampler's "Shortage"); never retried."""


MIX_FILE = "mix.json"


def mix_counts(batch: Any, langs: list[str], sources: list[str]) -> list[float]:
    """A batch slice as counts: pairs per query language, per source, then fallback pairs and pairs."""
    lang_index = {lang: i for i, lang in enumerate(langs)}
    out = [0.0] * (len(langs) + len(sources) + 2)
    for lang in batch.query_langs:
        out[lang_index[lang]] += 1
    source_index = {src: len(langs) + i for i, src in enumerate(sources)}
    for src in batch.sources:
        if src in source_index:
            out[source_index[src]] += 1
    out[-2], out[-1] = float(batch.fallback_pairs), float(len(batch.queries))
    return out


def mix_summary(mix: dict[str, Any], target: dict[str, float], sampler: Any = None) -> dict[str, Any]:
    """The run's mix with each language's share of query pairs beside its target p(L)::

        >>> mix_summary({"pairs": 4, "fallback_pairs": 0, "pairs_by_lang": {"en": 3, "de": 1},
        ...              "pairs_by_source": {"ddtp": 4}}, {"en": 0.7, "de": 0.3})["share_by_lang"]
        {'de': {'pairs': 1, 'share': 0.25, 'target': 0.3}, 'en': {'pairs': 3, 'share': 0.75, 'target': 0.7}}
    """
    pairs = max(1, mix["pairs"])
    out = {**mix, "fallback_share": mix["fallback_pairs"] / pairs}
    out["share_by_lang"] = {
        lang: {"pairs": mix["pairs_by_lang"].get(lang, 0), "share": mix["pairs_by_lang"].get(lang, 0) / pairs,
               "target": target[lang]}  # fmt: skip
        for lang in sorted(target)
    }
    if sampler is not None:
        out["excluded_langs"] = dict(sampler.excluded_langs)
        if sampler.sources:  # sampler.source_weights: each source's share beside its weight's
            weights = sampler.cfg.source_weights
            total = sum(weights.values())
            out["share_by_source"] = {
                src: {"pairs": mix["pairs_by_source"].get(src, 0), "share": mix["pairs_by_source"].get(src, 0) / pairs,
                      "target": weights[src] / total}  # fmt: skip
                for src in sampler.sources
            }
        out["strategy"], out["alpha"] = sampler.cfg.strategy, sampler.cfg.alpha
    return out
