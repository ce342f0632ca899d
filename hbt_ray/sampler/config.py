"""What the sampler is asked for and what it hands out: :class:`SamplerConfig` (validated), the
language weights p(L), the language selection every rank agrees on, and :class:`Batch`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hbt_ray.config import ConfigError
from hbt_ray.data.records import LANG_RE, PairGroup

Strategy = Literal["x-x-mono", "x-x", "x-y", "hybrid", "hybrid-sample"]
OnShort = Literal["next-lang", "x-x", "error"]
#: Fewest recently used groups kept per language for recycling (more for large per-rank batches).
RESERVOIR_MIN = 256
StreamFactory = Callable[[int], Iterable[Any]]


@dataclass
class SamplerConfig:
    """How batches are composed. ``batch_size`` is GLOBAL (all ranks); see the :mod:`hbt_ray.sampler` docstring."""

    strategy: Strategy = "hybrid"
    alpha: float = 0.5  # probability of a monolingual (x-x-mono) batch / pair
    batch_size: int = 64  # global pairs per step; per rank: batch_size // world_size
    lang_temperature: float = 1.0  # p(L) ∝ n_L^(1/T)
    languages: list[str] | None = None  # allow-list; None = every language of lang_counts
    lang_pairs: list[str] | None = None  # ["en-de", "de-en:2"]: restrict / weight cross pairs
    seed: int = 0
    buffer_groups: int = 4096  # per-rank buffer of groups
    shuffle: bool = True  # False: oldest eligible groups first
    steps_per_epoch: int | None = None  # None: num_groups // batch_size
    on_short: OnShort = "next-lang"
    max_fallback_share: float = 0.01  # a run whose fallback pairs exceed this share fails (1.0: allow all)
    #: languages with fewer groups in the data are not drawn (None: batch_size — what one monolingual
    #: batch needs; a language rarer than that cannot fill its share of steps without fallbacks)
    min_lang_groups: int | None = None
    max_negatives: int = 0  # hard negatives per pair (from the group, passage language)
    #: {source: weight}: the share of pairs each source of the data gets (normalised; every source named,
    #: each > 0). None: the sources as the data holds them (see "Sources" in the package docstring)
    source_weights: dict[str, float] | None = None
    step_log: int = 100_000  # per-step records kept (most recent)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha: {self.alpha} is not in [0, 1]")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} must be >= 1")
        if not self.lang_temperature > 0:
            raise ConfigError(f"lang_temperature: {self.lang_temperature} must be > 0")
        if self.buffer_groups < 1:
            raise ConfigError(f"buffer_groups: {self.buffer_groups} must be >= 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch: {self.steps_per_epoch} must be >= 1")
        if self.max_negatives < 0:
            raise ConfigError(f"max_negatives: {self.max_negatives} must be >= 0")
        if self.min_lang_groups is not None and self.min_lang_groups < 1:
            raise ConfigError(f"min_lang_groups: {self.min_lang_groups} must be >= 1")
        if not 0.0 <= self.max_fallback_share <= 1.0:
            raise ConfigError(f"max_fallback_share: {self.max_fallback_share} is not in [0, 1]")
        for lang in self.languages or []:
            if not LANG_RE.match(lang):
                raise ConfigError(f"languages: {lang!r} is not a language code")
        for item in self.lang_pairs or []:
            parse_lang_pair(item)
        if self.source_weights is not None:
            if not self.source_weights:
                raise ConfigError("source_weights: empty; leave it unset (null) for the data's own mix")
            for name, w in self.source_weights.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0 or w == float("inf"):
                    raise ConfigError(f"source_weights.{name}: {w!r} is not a number > 0")


def parse_lang_pair(item: str) -> tuple[str, str, float]:
    """``"en-de"`` → ("en", "de", 1.0); ``"en>pt-br:2"`` → ("en", "pt-br", 2.0).

    ``X-Y`` must split unambiguously into two language codes (use ``X>Y`` for ``en>pt-br``).
    """
    text, weight = item, 1.0
    if ":" in item:
        text, raw = item.rsplit(":", 1)
        try:
            weight = float(raw)
        except ValueError:
            raise ConfigError(f"lang_pairs: {item!r}: weight {raw!r} is not a number") from None
        if not weight > 0:
            raise ConfigError(f"lang_pairs: {item!r}: weight must be > 0")
    if ">" in text:
        src, _, dst = text.partition(">")
        splits = [(src, dst)] if LANG_RE.match(src) and LANG_RE.match(dst) else []
    else:
        parts = text.split("-")
        splits = [
            ("-".join(parts[:i]), "-".join(parts[i:]))
            for i in range(1, len(parts))
            if LANG_RE.match("-".join(parts[:i])) and LANG_RE.match("-".join(parts[i:]))
        ]
    if len(splits) != 1:
        why = "ambiguous, write X>Y" if splits else "not X-Y of two language codes"
        raise ConfigError(f"lang_pairs: {item!r} is {why}")
    src, dst = splits[0]
    if src == dst:
        raise ConfigError(f"lang_pairs: {item!r} is not a cross-lingual pair")
    return src, dst, weight


@dataclass
class Batch:
    """One rank's slice of a global batch. Lists are aligned per pair."""

    step: int
    epoch: int
    strategy: str  # the batch's kind, named as the strategies: x-x-mono, x-y, x-x, hybrid-sample
    lang: str | None  # the step's language (mono), else None
    queries: list[str]
    passages: list[str]
    negatives: list[list[str]]
    query_langs: list[str]
    passage_langs: list[str]
    group_ids: list[str]
    rank: int = 0
    fallback_pairs: int = 0  # pairs of this slice not of the step's kind (shortage)
    sources: list[str] = dataclasses.field(default_factory=list)  # per pair: the group's source

    def __len__(self) -> int:
        return len(self.queries)


def lang_weights(lang_counts: dict[str, int], temperature: float) -> dict[str, float]:
    """p(L) ∝ n_L^(1/T), normalised; languages with n_L = 0 get 0.

    >>> lang_weights({"en": 300, "de": 100}, 1.0)
    {'en': 0.75, 'de': 0.25}
    """
    raw = {lang: (n ** (1.0 / temperature) if n > 0 else 0.0) for lang, n in lang_counts.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"lang_counts has no language with pairs: {lang_counts}")
    return {lang: w / total for lang, w in raw.items()}


def source_mix(
    weights: dict[str, float], source_lang_counts: dict[str, dict[str, int]], langs: list[str], temperature: float
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sources, p(L), p(S | L)) when source S gets the share w_S of the pairs: p(L | S) ∝ n_SL^(1/T)
    within each source over ``langs``, p(L) = Σ_S w_S p(L | S), p(S | L) = w_S p(L | S) / p(L) (rows:
    ``langs``, columns: ``sources``). Names are checked against the data's sources.

    >>> sources, p, p_src = source_mix({"a": 3, "b": 1}, {"a": {"en": 10}, "b": {"en": 5, "de": 5}},
    ...                                ["de", "en"], 1.0)
    >>> sources, p.round(3).tolist(), p_src.round(3).tolist()
    (['a', 'b'], [0.125, 0.875], [[0.0, 1.0], [0.857, 0.143]])
    """
    named, known = set(weights), set(source_lang_counts)
    if named != known:
        what = (f"names {sorted(named - known)}, not a source of the data" if named - known
                else f"leaves out {sorted(known - named)}")  # fmt: skip
        raise ConfigError(f"sampler.source_weights: {what} (the data's sources: {sorted(known)})")
    sources = sorted(weights)
    w = np.array([weights[s] for s in sources], dtype=float)
    w = w / w.sum()
    p_given = np.zeros((len(langs), len(sources)))  # p(L | S), column by column
    for j, src in enumerate(sources):
        counts = source_lang_counts[src]
        raw = np.array([float(counts.get(lang, 0)) ** (1.0 / temperature) for lang in langs])
        if not raw.sum() > 0:
            raise ConfigError(f"sampler.source_weights.{src}: the source has no pairs in the languages drawn")
        p_given[:, j] = raw / raw.sum()
    joint = p_given * w[None, :]
    p = joint.sum(axis=1)
    p_src = np.divide(joint, p[:, None], out=np.zeros_like(joint), where=p[:, None] > 0)
    return sources, p, p_src


def count_pairs(rows: Iterable[Any]) -> tuple[dict[str, int], int]:
    """(pairs per language, number of groups) of rows / PairGroups (when no shard manifest has them)."""
    counts: dict[str, int] = {}
    groups = 0
    for row in rows:
        langs = row.langs if isinstance(row, PairGroup) else row["langs"]
        groups += 1
        for lang in langs:
            counts[lang] = counts.get(lang, 0) + 1
    return counts, groups


def select_languages(
    cfg: SamplerConfig, lang_counts: dict[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """(counts of the languages drawn, languages left out as too rare) from the whole data's counts, so
    that every rank agrees."""
    counts = dict(lang_counts)
    if cfg.languages is not None:
        missing = [lang for lang in cfg.languages if lang not in counts]
        if missing:
            raise ConfigError(f"sampler.languages: {missing} have no pairs (data has {sorted(counts)})")
        counts = {lang: counts[lang] for lang in cfg.languages}
    # Languages too rare to fill their draws are left out: as if the data did not have them, but named in
    # the stats and by the driver.
    min_groups = cfg.min_lang_groups if cfg.min_lang_groups is not None else cfg.batch_size
    rare = {lang: n for lang, n in counts.items() if 0 < n < min_groups}
    if cfg.languages is not None and rare:
        raise ConfigError(
            f"sampler.languages: {sorted(rare)} have fewer groups than sampler.min_lang_groups={min_groups} "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(rare.items()))})"
        )
    if len(rare) < sum(1 for n in counts.values() if n > 0):
        counts = {lang: n for lang, n in counts.items() if lang not in rare}
    else:  # none has enough: draw them all (the shortage shows as fallbacks)
        rare = {}
    if not any(n > 0 for n in counts.values()):
        raise ConfigError("sampler.languages: no language with pairs left")
    return counts, dict(sorted(rare.items()))
