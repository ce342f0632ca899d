"""Hybrid batch sampler (arXiv 2408.10536), fed by per-rank Ray Data streams of pair groups.

A training step draws ``batch_size`` pair groups **globally** (``batch_size // world_size`` per rank)
and takes **one pair from each group**, so parallel copies of one item never meet in a batch. What
kind of pair depends on the strategy:

``x-x-mono``  every pair is (L, L) for one language L per step, p(L) ∝ n_L^(1/T).
``x-y``       every pair is (X, Y), X ≠ Y: X drawn per pair ∝ p(X), Y among the group's other languages.
``x-x``       every pair is (L, L), L drawn per pair ∝ p(L): standard multilingual fine-tuning, languages
              mixed within a batch (LAReQA's X-X).
``hybrid``    per step: ``x-x-mono`` with probability ``alpha``, else ``x-y`` (the paper's method).
``hybrid-sample``  the ratio per pair: each pair is (L, L) (L per pair, as ``x-x``) with probability
              ``alpha``, else (X, Y). Batches are labelled ``hybrid-sample``.

Language weights: ``p(L) ∝ n_L^(1/T)`` over the languages of ``lang_counts`` (the whole data's counts,
restricted to ``languages`` if given), T = ``lang_temperature`` (T=1 proportional to data, large T
uniform), over the languages with at least ``min_lang_groups`` groups (default ``batch_size``: what one
monolingual batch needs; rarer ones are left out and listed in ``excluded_langs``). Languages are drawn
first and groups holding them second, so p(L) holds over the data, not
over what the buffer happens to hold: a step's or a pair's language is drawn ∝ p, then a group with it
is taken from the buffer. With ``lang_pairs`` (``["en-de", "de-en:2"]``: query language,
passage language, optional weight after ``:``; ``X>Y`` is accepted too) only the listed pairs are drawn,
with weight p(X)·p(Y)·w.

Distribution. All ranks take the same per-step decision (strategy, L, and for ``hybrid-sample`` which
global positions are mono) from an RNG seeded by ``(seed, epoch, step)``; each rank fills its slice
from its own buffer with an RNG seeded by ``(seed, epoch, step, rank)``. The ranks' streams are disjoint
splits, so a group is never twice in one global batch.

Streaming and epochs. Each rank keeps a bounded buffer of ``buffer_groups`` groups, drawn uniformly
at random (``shuffle=False``: oldest first) and refilled from the rank's stream before every step.
``stream_factory(n)`` returns the rank's n-th pass over its split; when a pass ends the next one is
opened, so a rank never runs dry and **never hangs**: every rank runs exactly ``steps_per_epoch``
steps per epoch (default ``num_groups // batch_size``: each group about once per epoch). A rank
whose split is a little longer or shorter just starts its next pass a bit earlier or later
(``stream_passes`` in :meth:`HybridBatchSampler.stats`). A group already in the buffer is not admitted
twice: its copy from the next pass is deferred until the first has been drawn (``stream_waits``; at
most ``buffer_groups`` deferred rows, then reading pauses).

Recycling. A language drawn more often than the stream brings its groups (a small language at a
tempered p(L): the upsampling T > 1 asks for) takes groups used before: per language the reservoir of
its most recently used groups (at least ``RESERVOIR_MIN``), drawn when the buffer has too few fresh
ones (``recycled_pairs``). So a monolingual step is monolingual even when its language is rare in
the buffer, and the sources and languages trained on follow p(L) even when the stream does not mix
them (the training driver also interleaves the sources when it writes the shards).

Shortage. If a rank has fewer than its share of groups with the step's language L even so (early in
the first pass, or a language with very few groups), the rest of its slice is filled per ``on_short``:
``next-lang`` (default) takes (M, M) pairs of the next most probable languages M, ``x-x`` takes (L', L')
pairs with L' per group, ``error`` raises. Pairs of x-x / x-y draws short of their language are filled
with (L', L') pairs of whatever the buffer holds. Every filled pair is counted (``fallback_pairs``,
``fallback_share``); a training run fails when the share exceeds ``max_fallback_share``.

Determinism and resume: same config + same streams → same batches. :meth:`state_dict` stores the
step, the stream position (pass, rows read), the buffer contents and the deferred rows;
:meth:`load_state_dict` restores them and re-opens the stream at that position (skipping the rows
already read), so steps k+1, … are reproduced exactly when a pass is reproducible (in-memory rows,
or :func:`hbt_ray.data.streams.shard_streams`, which reads in a seeded order with ``preserve_order``).

Why not ``streaming_split`` / ``ray.train.get_dataset_shard``: it hands blocks to whichever split asks
first, so the group → rank mapping changes from pass to pass. The buffer carries groups across a pass
boundary, so rank 0 may still hold group g from pass 0 while rank 1 reads g in pass 1: the same group
twice in one global batch (seen in a test). It also makes each pass a barrier across ranks and is not
reproducible. :func:`hbt_ray.data.streams.shard_streams` gives every rank a disjoint, reproducible stream of its own.

In a Ray Train worker::

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sampler = HybridBatchSampler(cfg, shard_streams(shard_dir, rank, world, seed=cfg.seed), rank, world,
                                 manifest_lang_counts, num_groups=manifest_groups)
    for epoch in range(epochs):
        for batch in sampler:                                # steps_per_epoch batches
            loss = model(batch.queries, batch.passages)
        checkpoint["sampler"] = sampler.state_dict()        # per rank

Stand-alone::

    >>> rows = [PairGroup(f"g{i}", "demo", {"en": Pair(f"q{i}", f"p{i}"),
    ...         "de": Pair(f"Q{i}", f"P{i}")}).to_row() for i in range(8)]
    >>> cfg = SamplerConfig(strategy="hybrid", alpha=0.5, batch_size=4, buffer_groups=8)
    >>> s = HybridBatchSampler(cfg, lambda n: iter(rows), 0, 1, {"en": 8, "de": 8}, num_groups=8)
    >>> [len(b.queries) for b in s]
    [4, 4]
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hbt_ray.config import ConfigError
from hbt_ray.data.records import LANG_RE, DataError, Pair, PairGroup  # noqa: F401 (Pair: doctest)

Strategy = Literal["x-x-mono", "x-x", "x-y", "hybrid", "hybrid-sample"]
OnShort = Literal["next-lang", "x-x", "error"]
#: Fewest recently used groups kept per language for recycling (more for large per-rank batches).
RESERVOIR_MIN = 256
StreamFactory = Callable[[int], Iterable[Any]]


@dataclass
class SamplerConfig:
    """How batches are composed. ``batch_size`` is GLOBAL (all ranks); see the module docstring."""

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


def _plain(value: Any) -> Any:
    """Row values as plain Python (Ray rows may hold numpy arrays) for state_dict."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class HybridBatchSampler:
    """Yields :class:`Batch` slices for one rank; ``iter(sampler)`` runs the current epoch."""

    def __init__(
        self,
        cfg: SamplerConfig,
        stream_factory: StreamFactory,
        rank: int,
        world_size: int,
        lang_counts: dict[str, int],
        num_groups: int | None = None,
    ):
        try:  # a SamplerConfig built in code has not been through the config loader
            cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"sampler.{err}") from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if cfg.batch_size % world_size:
            raise ConfigError(
                f"sampler.batch_size: {cfg.batch_size} is not divisible by world_size {world_size}"
            )
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.per_rank = cfg.batch_size // world_size
        if cfg.buffer_groups < self.per_rank:
            raise ConfigError(
                f"sampler.buffer_groups: {cfg.buffer_groups} is smaller than the per-rank batch {self.per_rank}"
            )
        if cfg.steps_per_epoch is not None:
            self.steps_per_epoch = cfg.steps_per_epoch
        elif num_groups is not None:
            self.steps_per_epoch = max(1, num_groups // cfg.batch_size)
        else:
            raise ConfigError("sampler.steps_per_epoch: not set and no num_groups given to compute it")
        self.num_groups = num_groups
        self._stream_factory = stream_factory

        counts = dict(lang_counts)
        if cfg.languages is not None:
            missing = [lang for lang in cfg.languages if lang not in counts]
            if missing:
                raise ConfigError(f"sampler.languages: {missing} have no pairs (data has {sorted(counts)})")
            counts = {lang: counts[lang] for lang in cfg.languages}
        # Languages too rare to fill their draws are left out (decided from the whole data's counts, so
        # every rank agrees): as if the data did not have them, but named in the stats and by the driver.
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
        self.excluded_langs = dict(sorted(rare.items()))
        self.langs: list[str] = sorted(lang for lang, n in counts.items() if n > 0)
        if not self.langs:
            raise ConfigError("sampler.languages: no language with pairs left")
        self._all_data_langs = set(lang_counts)
        self.lang_index = {lang: i for i, lang in enumerate(self.langs)}
        self._langs_arr = np.array(self.langs, dtype=object)
        weights = lang_weights({lang: counts[lang] for lang in self.langs}, cfg.lang_temperature)
        self.p = np.array([weights[lang] for lang in self.langs])
        self._p_cum = np.cumsum(self.p)
        self._p_order = np.argsort(-self.p, kind="stable")  # next-lang fallback order
        n_langs = len(self.langs)
        self._pair_w: np.ndarray | None = None
        if cfg.lang_pairs:
            pair_w = np.zeros((n_langs, n_langs))
            for item in cfg.lang_pairs:
                src, dst, w = parse_lang_pair(item)
                if src not in self.lang_index or dst not in self.lang_index:
                    raise ConfigError(f"sampler.lang_pairs: {item!r} names a language without pairs")
                pair_w[self.lang_index[src], self.lang_index[dst]] = w
            self._pair_w = pair_w * self.p[:, None] * self.p[None, :]

        # The buffer's slots, plus per_rank spare ones for groups recycled within a step (see _recycle).
        size = cfg.buffer_groups + self.per_rank
        self._rows: list[Any] = [None] * size
        self._ids: list[str | None] = [None] * size
        self._lang_pos = np.full((size, n_langs), -1, dtype=np.int16)  # slot × lang → index in row lists
        self._has = np.zeros((n_langs, size), dtype=bool)  # lang × slot (contiguous per language)
        self._alive = np.zeros(size, dtype=bool)
        self._cross_ok = np.zeros(size, dtype=bool)
        self._arrival = np.zeros(size, dtype=np.int64)
        self._in_buffer: set[str] = set()
        self._arrivals = 0
        self._deferred: list[Any] = []  # stream rows whose group was still in the buffer
        self._pending: Any = None  # a row read by the fast path of _refill, handed to _admit
        self._qs: list[Any] = [None] * size  # per slot: the row's queries / passages lists
        self._ps: list[Any] = [None] * size
        self._plans: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        # Per language, the most recently used groups that hold it: drawn again when the buffer has too
        # few fresh ones (a small language drawn at its tempered p(L) is used more often than the
        # stream brings it — the upsampling lang_temperature asks for).
        self._reservoir_size = max(4 * self.per_rank, RESERVOIR_MIN)
        self._reservoir: list[deque] = [deque(maxlen=self._reservoir_size) for _ in self.langs]
        self._stream: Iterator[Any] | None = None
        self._stream_pass = 0
        self._stream_pos = 0  # rows read from the current pass
        self._pass_rows = 0  # rows yielded by the current pass so far (to detect empty streams)
        self.step = 0
        self._reset_stats()

    # ------------------------------------------------------------------ iteration
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        """The remaining steps of the current epoch."""
        end = (self.epoch + 1) * self.steps_per_epoch
        while self.step < end:
            yield self.next_batch()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def close(self) -> None:
        """Close the open stream pass (and a prefetched one): Ray Data iterators hold resources."""
        for obj in (self._stream, self._stream_factory):
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._stream = None

    def batches(self, num_steps: int) -> Iterator[Batch]:
        """``num_steps`` batches from the current position, across epoch boundaries."""
        for _ in range(num_steps):
            yield self.next_batch()

    def step_decision(self, step: int) -> tuple[str, int, np.ndarray | None]:
        """The rank-independent decision of ``step``: (kind, language index or -1, mono mask or None)."""
        cfg = self.cfg
        epoch = step // self.steps_per_epoch
        rng = np.random.default_rng([cfg.seed, epoch, step])
        strategy = cfg.strategy
        if strategy == "hybrid":
            strategy = "x-x-mono" if rng.random() < cfg.alpha else "x-y"
        if strategy == "x-x-mono":
            cum = self._p_cum
            lang = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            return "x-x-mono", min(lang, len(self.langs) - 1), None
        if strategy == "x-y":
            return "x-y", -1, None
        if strategy == "x-x":
            return "x-x", -1, None
        mono_mask = rng.random(cfg.batch_size) < cfg.alpha
        return "hybrid-sample", -1, mono_mask[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def next_batch(self) -> Batch:
        step, epoch, k = self.step, self.epoch, self.per_rank
        self._refill()
        alive = int(self._alive.sum())
        if alive < k:
            raise DataError(
                f"rank {self.rank}: only {alive} distinct groups available for a per-rank batch of {k} "
                f"(the split is smaller than one batch); lower batch_size",
                f"stream of rank {self.rank}",
                f"pass {self._stream_pass}, row {self._stream_pos}",
            )
        kind, lang, mono_mask = self.step_decision(step)
        rng = np.random.default_rng([self.cfg.seed, epoch, step, 1 + self.rank])
        taken = np.zeros(self._alive.shape[0], dtype=bool)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (slots, qlang, plang)
        fallback = 0
        if kind == "x-x-mono":
            slots = self._pick_lang(rng, lang, k, taken)
            parts.append((slots, np.full(len(slots), lang), np.full(len(slots), lang)))
            missing = k - len(slots)
            if missing:
                fallback += missing
                self._fallback_pairs[lang] += missing
                self._short_steps += 1
                parts += self._fill_short(rng, lang, missing, taken)
        elif kind == "x-y":
            cross, short = self._cross_part(rng, k, taken)
            parts += cross
            fallback += short
        elif kind == "x-x":
            xx, short = self._xx_part(rng, k, taken)
            parts += xx
            fallback += short
        else:
            n_mono = int(mono_mask.sum())
            cross, short = self._cross_part(rng, k - n_mono, taken)
            xx, short_xx = self._xx_part(rng, n_mono, taken)
            parts += cross + xx
            fallback += short + short_xx
        slots = np.concatenate([p[0] for p in parts]).astype(np.int64)
        qlang = np.concatenate([p[1] for p in parts]).astype(np.int64)
        plang = np.concatenate([p[2] for p in parts]).astype(np.int64)
        batch = self._make_batch(step, epoch, kind, lang, slots, qlang, plang, fallback)
        self._record(batch, kind, lang, qlang, plang, fallback)
        self._release(slots)
        self.step += 1
        return batch

    # ------------------------------------------------------------------ drawing
    def _pick(self, rng: np.random.Generator, eligible: np.ndarray, k: int, taken: np.ndarray) -> np.ndarray:
        """Up to k slots among ``eligible & ~taken`` (random, or oldest when not shuffling); marks them."""
        candidates = np.flatnonzero(eligible & ~taken) if taken.any() else np.flatnonzero(eligible)
        if len(candidates) > k:
            if self.cfg.shuffle:
                candidates = rng.choice(candidates, k, replace=False)
            else:
                order = np.argpartition(self._arrival[candidates], k - 1)[:k]
                candidates = candidates[order]
        if not self.cfg.shuffle:
            candidates = candidates[np.argsort(self._arrival[candidates], kind="stable")]
        taken[candidates] = True
        return candidates

    def _draw_lang(
        self,
        rng: np.random.Generator,
        slots: np.ndarray,
        exclude: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        """Per slot a language ∝ p among the group's languages (minus ``exclude``); ``weights``: the
        slots' ``(languages present) * p`` if already computed (modified when excluding)."""
        if weights is None:
            weights = (self._lang_pos[slots] >= 0) * self.p[None, :]
        if exclude is not None:
            weights[np.arange(len(slots)), exclude] = 0.0
        cum = np.cumsum(weights, axis=1)
        u = rng.random(len(slots)) * cum[:, -1]
        return np.minimum((cum <= u[:, None]).sum(axis=1), len(self.langs) - 1)

    def _draw_from_p(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n language indices drawn ∝ p(L) over the data (not over what the buffer holds)."""
        u = rng.random(n) * self._p_cum[-1]
        return np.minimum(np.searchsorted(self._p_cum, u, side="right"), len(self.langs) - 1)

    def _pick_lang(
        self, rng: np.random.Generator, lang: int, n: int, taken: np.ndarray, other: int | None = None
    ) -> np.ndarray:
        """Up to n slots holding ``lang`` (and, with ``other`` ≥ 0, that language too; with -1 any
        second language): fresh groups from the buffer first, then recycled ones (:meth:`_recycle`)."""
        eligible = self._has[lang]
        if other is not None:
            eligible = eligible & (self._cross_ok if other < 0 else self._has[other])
        slots = self._pick(rng, eligible, n, taken)
        if len(slots) < n:
            slots = np.concatenate([slots, self._recycle(rng, lang, n - len(slots), taken, other)])
        return slots

    def _recycle(
        self, rng: np.random.Generator, lang: int, n: int, taken: np.ndarray, other: int | None
    ) -> np.ndarray:
        """Up to n groups of ``lang`` used before (its reservoir), not in the buffer, put into spare slots
        for this step (released, and so back in the reservoirs, with the batch)."""
        in_buffer, seen, rows = self._in_buffer, set(), []
        for row in self._reservoir[lang]:
            gid = row["group_id"]
            if gid in in_buffer or gid in seen:
                continue
            cols = self._lang_plan(row["langs"], gid)[0]
            if other is not None and (len(cols) < 2 if other < 0 else other not in cols):
                continue
            seen.add(gid)
            rows.append(row)
        if not rows:
            return np.zeros(0, dtype=np.int64)
        if len(rows) > n:
            if self.cfg.shuffle:
                rows = [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False).tolist())]
            else:
                rows = rows[:n]  # the least recently used first
        spare = np.flatnonzero(~self._alive[self.cfg.buffer_groups :])[: len(rows)] + self.cfg.buffer_groups
        counts, cols_all, poss_all = [], [], []
        for slot, row in zip(spare.tolist(), rows):
            cols, poss = self._lang_plan(row["langs"], row["group_id"])
            counts.append(len(cols))
            cols_all.extend(cols)
            poss_all.extend(poss)
            self._rows[slot], self._ids[slot] = row, row["group_id"]
            self._qs[slot], self._ps[slot] = row["queries"], row["passages"]
            in_buffer.add(row["group_id"])
        self._index_slots(spare.tolist(), counts, cols_all, poss_all)
        taken[spare] = True
        self._recycled_pairs += len(spare)
        return spare.astype(np.int64)

    def _xx_part(self, rng: np.random.Generator, k: int, taken: np.ndarray) -> tuple[list, int]:
        """k (L, L) pairs, L drawn per pair ∝ p(L); (parts, pairs that had to be filled otherwise)."""
        parts, short = [], 0
        drawn = self._draw_from_p(rng, k)
        for lang in np.unique(drawn).tolist():
            need = int((drawn == lang).sum())
            slots = self._pick_lang(rng, lang, need, taken)
            parts.append((slots, np.full(len(slots), lang), np.full(len(slots), lang)))
            short += need - len(slots)
        if short:  # a language with fewer groups than asked of it: (L', L') pairs of whatever is there
            self._short_steps += 1
            self._xx_fallback += short
            parts.append(self._any_xx(rng, short, taken))
        return parts, short

    def _cross_part(self, rng: np.random.Generator, k: int, taken: np.ndarray) -> tuple[list, int]:
        """k (X, Y) pairs, X ≠ Y: X drawn per pair ∝ p(L), Y among the group's other languages ∝ p (with
        ``lang_pairs``: (X, Y) drawn ∝ their weight); (parts, pairs filled with x-x pairs for want)."""
        parts, short = [], 0
        n_langs = len(self.langs)
        if self._pair_w is None:
            drawn = self._draw_from_p(rng, k)
            for lang in np.unique(drawn).tolist():
                need = int((drawn == lang).sum())
                slots = self._pick_lang(rng, lang, need, taken, other=-1)
                if len(slots):
                    weights = (self._lang_pos[slots] >= 0) * self.p[None, :]
                    qlang = np.full(len(slots), lang)
                    parts.append((slots, qlang, self._draw_lang(rng, slots, exclude=qlang, weights=weights)))
                short += need - len(slots)
        else:
            flat_w = self._pair_w.reshape(-1)
            cum = np.cumsum(flat_w)
            drawn = np.minimum(np.searchsorted(cum, rng.random(k) * cum[-1], side="right"), len(flat_w) - 1)
            for pair in np.unique(drawn).tolist():
                need = int((drawn == pair).sum())
                q, p = divmod(pair, n_langs)
                slots = self._pick_lang(rng, q, need, taken, other=p)
                parts.append((slots, np.full(len(slots), q), np.full(len(slots), p)))
                short += need - len(slots)
        if short:
            self._short_steps += 1
            self._cross_fallback += short
            parts.append(self._any_xx(rng, short, taken))
        return parts, short

    def _any_xx(self, rng: np.random.Generator, n: int, taken: np.ndarray) -> tuple[np.ndarray, ...]:
        """n (L', L') pairs of whatever the buffer holds, L' per group among its languages: the fill of
        every shortage."""
        slots = self._pick(rng, self._alive, n, taken)
        langs = self._draw_lang(rng, slots)
        return slots, langs, langs

    def _fill_short(self, rng: np.random.Generator, lang: int, missing: int, taken: np.ndarray) -> list:
        policy = self.cfg.on_short
        if policy == "error":
            raise DataError(
                f"rank {self.rank}: buffer has too few groups in {self.langs[lang]!r} for step {self.step} "
                f"({missing} of {self.per_rank} missing); raise buffer_groups or set on_short",
                f"stream of rank {self.rank}",
                f"pass {self._stream_pass}, row {self._stream_pos}",
            )
        if policy == "x-x":
            return [self._any_xx(rng, missing, taken)]
        parts = []
        for other in self._p_order:
            if other == lang or missing == 0:
                continue
            slots = self._pick(rng, self._has[other], missing, taken)
            if len(slots):
                parts.append((slots, np.full(len(slots), other), np.full(len(slots), other)))
                missing -= len(slots)
        return parts

    def _make_batch(self, step, epoch, kind, lang, slots, qlang, plang, fallback) -> Batch:
        rows, ids, qs, ps, lang_pos, langs = self._rows, self._ids, self._qs, self._ps, self._lang_pos, self.langs
        qpos = lang_pos[slots, qlang].tolist()
        ppos = lang_pos[slots, plang].tolist()
        slot_list = slots.tolist()
        queries = [qs[s][i] for s, i in zip(slot_list, qpos)]
        passages = [ps[s][i] for s, i in zip(slot_list, ppos)]
        max_neg = self.cfg.max_negatives
        if max_neg:
            negatives = []
            for s, i in zip(slot_list, ppos):
                negs = rows[s].get("negatives")
                negatives.append(list(negs[i][:max_neg]) if negs is not None and negs[i] is not None else [])
        else:
            negatives = [[] for _ in slot_list]
        return Batch(
            step=step,
            epoch=epoch,
            strategy=kind,
            lang=langs[lang] if kind == "x-x-mono" else None,
            queries=queries,
            passages=passages,
            negatives=negatives,
            query_langs=self._langs_arr[qlang].tolist(),
            passage_langs=self._langs_arr[plang].tolist(),
            group_ids=[ids[s] for s in slot_list],
            rank=self.rank,
            fallback_pairs=fallback,
            sources=[rows[s]["source"] if "source" in rows[s] else "" for s in slot_list],
        )

    # ------------------------------------------------------------------ buffer
    def _release(self, slots: np.ndarray, keep: bool = True) -> None:
        """Free slots (their rows stay referenced until overwritten: at most buffer_groups rows); with
        ``keep``, the used groups join the reservoirs of their languages."""
        ids = self._ids
        if keep:
            reservoir, rows = self._reservoir, self._rows
            for slot in slots.tolist():
                for col in np.flatnonzero(self._lang_pos[slot] >= 0).tolist():
                    reservoir[col].append(rows[slot])
        self._in_buffer.difference_update([ids[s] for s in slots.tolist()])
        self._alive[slots] = False
        self._cross_ok[slots] = False
        self._has[:, slots] = False
        self._lang_pos[slots] = -1

    def _next_row(self) -> Any:
        """The next row of the endless stream (pass after pass); None if a whole pass was empty."""
        while True:
            if self._stream is None:
                self._stream = iter(self._stream_factory(self._stream_pass))
                self._pass_rows = 0
                for _ in range(self._stream_pos):  # resume: skip rows already read
                    next(self._stream)
                    self._pass_rows += 1
            try:
                row = next(self._stream)
            except StopIteration:
                self._end_pass()
                continue
            self._stream_pos += 1
            self._pass_rows += 1
            return row

    def _end_pass(self) -> None:
        if self._pass_rows == 0:
            raise DataError(
                f"rank {self.rank}: stream pass {self._stream_pass} yielded no groups",
                f"stream of rank {self.rank}",
            )
        self._stream = None
        self._stream_pass += 1
        self._stream_pos = 0
        self._stats_passes += 1

    def _lang_plan(self, langs: Any, gid: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(language indices, positions in the row lists) of a row's usable languages, cached per tuple."""
        key = tuple(langs)
        plan = self._plans.get(key)
        if plan is None:
            cols, poss = [], []
            for i, lang in enumerate(key):
                j = self.lang_index.get(lang)
                if j is not None:
                    cols.append(j)
                    poss.append(i)
                elif self.cfg.languages is None and lang not in self._all_data_langs:
                    raise DataError(
                        f"language {lang!r} is not in lang_counts {sorted(self._all_data_langs)}",
                        f"stream of rank {self.rank}",
                        f"group {gid}",
                    )
            if len(self._plans) > 100_000:
                self._plans.clear()
            plan = self._plans[key] = (tuple(cols), tuple(poss))
        return plan

    def _admit(self) -> tuple[Any, tuple[tuple[int, ...], tuple[int, ...]]] | None:
        """The next (row, language plan) for the buffer: a deferred row whose group has left the buffer,
        else the next stream row. A stream row whose group is still in the buffer (the stream wrapped
        around) is deferred; with more than ``buffer_groups`` deferred rows (split smaller than the
        buffer) reading stops and None is returned."""
        deferred = self._deferred
        in_buffer = self._in_buffer
        if deferred:
            for i, row in enumerate(deferred):
                if row["group_id"] not in in_buffer:
                    del deferred[i]
                    return row, self._lang_plan(row["langs"], row["group_id"])
        while len(deferred) <= self.cfg.buffer_groups:
            row, self._pending = self._pending, None
            if row is None:
                row = self._next_row()
            if isinstance(row, PairGroup):
                row = row.to_row()
            try:
                gid = row["group_id"]
                langs = row["langs"]
                n = len(langs)
                bad = len(row["queries"]) != n or len(row["passages"]) != n
            except (KeyError, TypeError) as err:
                raise DataError(
                    f"not a pair-group row ({err!r})",
                    f"stream of rank {self.rank}",
                    f"row {self._stream_pos}",
                ) from None
            if bad:
                raise DataError(
                    "langs, queries and passages differ in length",
                    f"stream of rank {self.rank}",
                    f"group {gid}",
                )
            self._groups_read += 1
            plan = self._plans.get(tuple(langs)) or self._lang_plan(langs, gid)
            if not plan[0]:
                self._groups_skipped += 1  # no allowed language: skip the group
                continue
            if gid in in_buffer:
                deferred.append(row)
                self._stream_waits += 1
                continue
            return row, plan
        return None

    def _refill(self) -> None:
        """Fill the free slots. Hot loop (one iteration per group read): the common case (no deferred
        rows, a known language tuple, a group not in the buffer) stays inline; the rest goes through
        :meth:`_admit`."""
        free = np.flatnonzero(~self._alive[: self.cfg.buffer_groups])  # the spare slots stay free
        if len(free) == 0:
            return
        counts: list[int] = []
        cols: list[int] = []
        poss: list[int] = []
        filled: list[int] = []
        rows, ids, qs, ps, in_buffer = self._rows, self._ids, self._qs, self._ps, self._in_buffer
        plans, deferred = self._plans, self._deferred
        for slot in free.tolist():
            row = None
            stream = self._stream
            if not deferred and stream is not None:
                try:
                    row = next(stream)
                except StopIteration:
                    self._end_pass()  # _admit opens the next one
                if row is not None:
                    self._stream_pos += 1
                    self._pass_rows += 1
                    try:
                        gid = row["group_id"]
                        langs = row["langs"]
                        queries = row["queries"]
                        passages = row["passages"]
                        plan = plans.get(tuple(langs))
                        ok = (
                            plan is not None
                            and plan[0]
                            and gid not in in_buffer
                            and len(queries) == len(langs) == len(passages)
                        )
                    except (KeyError, TypeError):
                        ok = False
                    if ok:
                        self._groups_read += 1
                    else:
                        self._pending = row  # the slow path checks and reports it
                        row = None
            if row is None:
                admitted = self._admit()
                if admitted is None:
                    break
                row, (row_cols, row_poss) = admitted
                gid, queries, passages = row["group_id"], row["queries"], row["passages"]
            else:
                row_cols, row_poss = plan
            counts.append(len(row_cols))
            cols.extend(row_cols)
            poss.extend(row_poss)
            rows[slot] = row
            ids[slot] = gid
            qs[slot] = queries
            ps[slot] = passages
            in_buffer.add(gid)
            filled.append(slot)
        if filled:
            self._arrival[filled] = np.arange(self._arrivals, self._arrivals + len(filled))
            self._arrivals += len(filled)
            self._index_slots(filled, counts, cols, poss)

    def _index_slots(self, filled: list[int], counts: list[int], cols: list[int], poss: list[int]) -> None:
        """Index newly filled slots: slot ``filled[i]`` has ``counts[i]`` usable languages, whose
        (language index, position in the row lists) are the next ``counts[i]`` items of cols / poss."""
        if not filled:
            return
        filled_arr = np.array(filled, dtype=np.intp)
        counts_arr = np.array(counts, dtype=np.intp)
        rows_idx = np.repeat(filled_arr, counts_arr)
        cols_arr = np.array(cols, dtype=np.intp)
        self._lang_pos[rows_idx, cols_arr] = poss
        self._has[cols_arr, rows_idx] = True
        self._alive[filled_arr] = True
        if self._pair_w is None:
            self._cross_ok[filled_arr] = counts_arr >= 2
        else:
            hf = (self._lang_pos[filled_arr] >= 0).astype(float)
            self._cross_ok[filled_arr] = ((hf @ self._pair_w) * hf).sum(axis=1) > 0

    # ------------------------------------------------------------------ statistics
    def _reset_stats(self) -> None:
        n = len(self.langs)
        self._steps_by_kind: dict[str, int] = {"x-x-mono": 0, "x-y": 0, "x-x": 0, "hybrid-sample": 0}
        self._mono_steps = np.zeros(n, dtype=np.int64)
        self._pair_counts = np.zeros((n, n), dtype=np.int64)  # query lang × passage lang
        self._fallback_pairs = np.zeros(n, dtype=np.int64)
        self._short_steps = 0
        self._cross_fallback = 0
        self._xx_fallback = 0
        self._recycled_pairs = 0
        self._source_pairs: dict[str, int] = {}
        self._stream_waits = 0
        self._groups_read = 0
        self._groups_skipped = 0
        self._stats_passes = 0
        self._step_log: deque = deque(maxlen=self.cfg.step_log)

    def _record(self, batch: Batch, kind: str, lang: int, qlang, plang, fallback: int) -> None:
        self._steps_by_kind[kind] += 1
        if kind == "x-x-mono":
            self._mono_steps[lang] += 1
        np.add.at(self._pair_counts, (qlang, plang), 1)
        for source in batch.sources:
            self._source_pairs[source] = self._source_pairs.get(source, 0) + 1
        self._step_log.append((batch.step, kind, batch.lang, fallback))

    def stats(self) -> dict[str, Any]:
        """Counts since the start (or the resumed state): check α, p(L) and fallbacks against them."""
        steps = sum(self._steps_by_kind.values())
        pairs = int(self._pair_counts.sum())
        diag = int(np.trace(self._pair_counts))
        langs = self.langs
        per_pair = {
            f"{langs[i]}-{langs[j]}": int(self._pair_counts[i, j])
            for i, j in zip(*np.nonzero(self._pair_counts))
        }
        return {
            "rank": self.rank,
            "steps": steps,
            "steps_by_strategy": dict(self._steps_by_kind),
            "mono_step_share": self._steps_by_kind["x-x-mono"] / steps if steps else 0.0,
            "pairs": pairs,
            "mono_pair_share": diag / pairs if pairs else 0.0,
            "mono_steps_by_lang": {langs[i]: int(n) for i, n in enumerate(self._mono_steps) if n},
            "lang_p": {lang: float(p) for lang, p in zip(langs, self.p)},
            "query_pairs_by_lang": {langs[i]: int(n) for i, n in enumerate(self._pair_counts.sum(1)) if n},
            "passage_pairs_by_lang": {langs[i]: int(n) for i, n in enumerate(self._pair_counts.sum(0)) if n},
            "pairs_by_lang_pair": per_pair,
            "pairs_by_source": dict(sorted(self._source_pairs.items())),
            "fallback_pairs": self.fallback_pairs(),
            "fallback_share": self.fallback_pairs() / pairs if pairs else 0.0,
            "mono_fallback_pairs_by_lang": {
                langs[i]: int(n) for i, n in enumerate(self._fallback_pairs) if n
            },
            "cross_fallback_pairs": self._cross_fallback,
            "xx_fallback_pairs": self._xx_fallback,
            "recycled_pairs": self._recycled_pairs,
            "excluded_langs": dict(self.excluded_langs),
            "short_steps": self._short_steps,
            "groups_read": self._groups_read,
            "groups_skipped_no_language": self._groups_skipped,
            "stream_passes": self._stats_passes,
            "stream_waits": self._stream_waits,
            "buffer_groups": int(self._alive.sum()),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def fallback_pairs(self) -> int:
        """Pairs so far that are not what their step's strategy asked for (see "Shortage")."""
        return int(self._fallback_pairs.sum()) + self._cross_fallback + self._xx_fallback

    def step_log(self) -> list[tuple[int, str, str | None, int]]:
        """The most recent (step, strategy, lang, fallback pairs) records."""
        return list(self._step_log)

    def format_stats(self) -> str:
        """A printable table: per language p(L), mono steps, query/passage pairs, fallbacks."""
        st = self.stats()
        lines = [
            f"rank {self.rank}: {st['steps']} steps {st['steps_by_strategy']}, mono step share "
            f"{st['mono_step_share']:.3f} (alpha {self.cfg.alpha}), {st['pairs']} pairs, "
            f"{st['fallback_pairs']} fallback pairs in {st['short_steps']} short steps, "
            f"{st['stream_passes']} stream passes",
            f"{'lang':<8}{'p(L)':>8}{'mono%':>8}{'steps':>8}{'q pairs':>10}{'p pairs':>10}{'fallback':>10}",
        ]
        steps_mono = max(1, st["steps_by_strategy"]["x-x-mono"])
        for i, lang in enumerate(self.langs):
            lines.append(
                f"{lang:<8}{self.p[i]:>8.3f}{100 * self._mono_steps[i] / steps_mono:>8.2f}"
                f"{int(self._mono_steps[i]):>8}{int(self._pair_counts[i].sum()):>10}"
                f"{int(self._pair_counts[:, i].sum()):>10}{int(self._fallback_pairs[i]):>10}"
            )
        top = sorted(st["pairs_by_lang_pair"].items(), key=lambda kv: -kv[1])[:10]
        lines.append("top language pairs: " + ", ".join(f"{k} {v}" for k, v in top))
        return "\n".join(lines)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly at ``self.step`` (plain data, picklable)."""
        slots = np.flatnonzero(self._alive).tolist()
        unique: dict[str, int] = {}  # a group is in the reservoir of each of its languages: stored once
        reservoir_rows: list[Any] = []
        reservoirs = []
        for res in self._reservoir:
            idx = []
            for row in res:
                i = unique.get(row["group_id"])
                if i is None:
                    i = unique[row["group_id"]] = len(reservoir_rows)
                    reservoir_rows.append(_plain(dict(row)))
                idx.append(i)
            reservoirs.append(idx)
        return {
            "version": 2,
            "config": dataclasses.asdict(self.cfg),
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self.step,
            "stream_pass": self._stream_pass,
            "stream_pos": self._stream_pos,
            "arrivals": self._arrivals,
            "buffer": [(s, int(self._arrival[s]), _plain(dict(self._rows[s]))) for s in slots],
            "deferred": [_plain(dict(row)) for row in self._deferred],
            "reservoir_rows": reservoir_rows,
            "reservoirs": reservoirs,
            "stats": self._stats_state(),
        }

    def _stats_state(self) -> dict[str, Any]:
        return {
            "steps_by_kind": dict(self._steps_by_kind),
            "mono_steps": self._mono_steps.tolist(),
            "pair_counts": self._pair_counts.tolist(),
            "fallback_pairs": self._fallback_pairs.tolist(),
            "short_steps": self._short_steps,
            "cross_fallback": self._cross_fallback,
            "xx_fallback": self._xx_fallback,
            "recycled_pairs": self._recycled_pairs,
            "source_pairs": dict(self._source_pairs),
            "stream_waits": self._stream_waits,
            "groups_read": self._groups_read,
            "groups_skipped": self._groups_skipped,
            "passes": self._stats_passes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the stream is re-opened at (pass, rows read) on the next step."""
        if state.get("version") not in (1, 2):  # 1: before the reservoirs (they start empty)
            raise ValueError(f"sampler state: unknown version {state.get('version')!r}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"sampler state is for rank {state['rank']}/{state['world_size']}, "
                f"not {self.rank}/{self.world_size}"
            )
        mine = dataclasses.asdict(self.cfg)
        for key in (
            "strategy",
            "alpha",
            "batch_size",
            "lang_temperature",
            "languages",
            "lang_pairs",
            "seed",
            "buffer_groups",
            "shuffle",
            "on_short",
        ):
            if state["config"].get(key) != mine[key]:
                raise ValueError(
                    f"sampler state: sampler.{key} was {state['config'].get(key)!r}, now {mine[key]!r}"
                )
        self._release(np.arange(self._alive.shape[0]), keep=False)
        self._in_buffer.clear()
        self.step = int(state["step"])
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
        self._stream = None
        self._stream_pass = int(state["stream_pass"])
        self._stream_pos = int(state["stream_pos"])
        self._deferred = list(state["deferred"])
        self._pending = None
        saved_reads = state["stats"]["groups_read"]
        self._reset_stats()
        counts, cols, poss, filled = [], [], [], []
        for slot, arrival, row in state["buffer"]:
            row_cols, row_poss = self._lang_plan(row["langs"], row["group_id"])
            counts.append(len(row_cols))
            cols.extend(row_cols)
            poss.extend(row_poss)
            self._rows[slot] = row
            self._ids[slot] = row["group_id"]
            self._qs[slot] = row["queries"]
            self._ps[slot] = row["passages"]
            self._in_buffer.add(row["group_id"])
            self._arrival[slot] = arrival
            filled.append(slot)
        self._arrivals = int(state["arrivals"])
        self._index_slots(filled, counts, cols, poss)
        st = state["stats"]
        self._steps_by_kind = dict(st["steps_by_kind"])
        self._mono_steps = np.array(st["mono_steps"], dtype=np.int64)
        self._pair_counts = np.array(st["pair_counts"], dtype=np.int64)
        self._fallback_pairs = np.array(st["fallback_pairs"], dtype=np.int64)
        self._short_steps = st["short_steps"]
        self._cross_fallback = st["cross_fallback"]
        self._xx_fallback = st.get("xx_fallback", 0)
        self._recycled_pairs = st.get("recycled_pairs", 0)
        self._source_pairs = dict(st.get("source_pairs", {}))
        self._stream_waits = st["stream_waits"]
        self._groups_read = saved_reads
        self._groups_skipped = st["groups_skipped"]
        self._stats_passes = st["passes"]
        rows = state.get("reservoir_rows", [])
        for res, idx in zip(self._reservoir, state.get("reservoirs", [[] for _ in self.langs])):
            res.clear()
            res.extend(rows[i] for i in idx)


__all__ = [
    "Batch",
    "HybridBatchSampler",
    "SamplerConfig",
    "count_pairs",
    "lang_weights",
    "parse_lang_pair",
]
