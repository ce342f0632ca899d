"""The per-step draw: the rank-independent decision of a step (kind, language, mono positions) and how
a rank fills its slice from its buffer: x-x-mono, x-y and x-x parts, recycling, and the fallback fill of
a shortage. Languages are drawn first, ∝ p(L) over the data, and groups holding them second."""

from __future__ import annotations

import numpy as np

from hbt_ray.data.records import DataError

from .buffer import GroupBuffer
from .config import SamplerConfig
from .stats import SamplerStats

Part = tuple[np.ndarray, np.ndarray, np.ndarray]  # (slots, query languages, passage languages)

_WORD = 2**32


def seeded_rng(*words: int) -> np.random.Generator:
    """``np.random.default_rng(list(words))``, the same generator built faster: a list of ints each below
    2**32 seeds its SeedSequence with exactly those uint32 words, and handing it the array skips the
    per-int conversion (two generators per step are a visible share of a step). Other ints take the
    list path.

    >>> seeded_rng(3, 0, 5).random() == np.random.default_rng([3, 0, 5]).random()
    True
    >>> seeded_rng(3, 2**40, 5).random() == np.random.default_rng([3, 2**40, 5]).random()
    True
    """
    if all(0 <= w < _WORD for w in words):
        seq = np.random.SeedSequence(np.array(words, dtype=np.uint32))
        return np.random.Generator(np.random.PCG64(seq))
    return np.random.default_rng(list(words))


class Drawer:
    """Draws one rank's slice of each step from its :class:`GroupBuffer`."""

    def __init__(
        self,
        cfg: SamplerConfig,
        buffer: GroupBuffer,
        stats: SamplerStats,
        rank: int,
        per_rank: int,
        steps_per_epoch: int,
        p: np.ndarray,
        pair_w: np.ndarray | None,
        p_src: np.ndarray | None = None,
    ) -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.stats = stats
        self.rank = rank
        self.per_rank = per_rank
        self.steps_per_epoch = steps_per_epoch
        self.n_langs = len(p)
        self.p = p
        self._p_cum = np.cumsum(p)
        self._p_order = np.argsort(-p, kind="stable")  # next-lang fallback order
        self._pair_w = pair_w
        self._src_cum = None if p_src is None else np.cumsum(p_src, axis=1)  # per language: p(S | L)

    def step_decision(self, step: int) -> tuple[str, int, np.ndarray | None]:
        """The rank-independent decision of ``step``: (kind, language index or -1, mono mask or None)."""
        cfg = self.cfg
        epoch = step // self.steps_per_epoch
        rng = seeded_rng(cfg.seed, epoch, step)
        strategy = cfg.strategy
        if strategy == "hybrid":
            strategy = "x-x-mono" if rng.random() < cfg.alpha else "x-y"
        if strategy == "x-x-mono":
            cum = self._p_cum
            lang = int(cum.searchsorted(rng.random() * cum[-1], side="right"))
            return "x-x-mono", min(lang, self.n_langs - 1), None
        if strategy == "x-y":
            return "x-y", -1, None
        if strategy == "x-x":
            return "x-x", -1, None
        mono_mask = rng.random(cfg.batch_size) < cfg.alpha
        return "hybrid-sample", -1, mono_mask[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def draw(self, step: int, epoch: int) -> tuple[str, int, np.ndarray, np.ndarray, np.ndarray, int]:
        """This rank's slice of ``step``: (kind, language or -1, slots, query langs, passage langs, fallback
        pairs); the slots stay taken until the sampler releases them."""
        k = self.per_rank
        kind, lang, mono_mask = self.step_decision(step)
        rng = seeded_rng(self.cfg.seed, epoch, step, 1 + self.rank)
        taken = np.zeros(self.buffer.alive.shape[0], dtype=bool)
        parts: list[Part] = []
        fallback = 0
        if kind == "x-x-mono":
            slots = self._pick_lang(rng, lang, k, taken)
            parts.append((slots, np.full(len(slots), lang), np.full(len(slots), lang)))
            missing = k - len(slots)
            if missing:
                fallback += missing
                self.stats.fallback_by_lang[lang] += missing
                self.stats.short_steps += 1
                parts += self._fill_short(rng, step, lang, missing, taken)
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
        return kind, lang, slots, qlang, plang, fallback

    def _pick(self, rng: np.random.Generator, eligible: np.ndarray, k: int, taken: np.ndarray) -> np.ndarray:
        """Up to k slots among ``eligible & ~taken`` (random, or oldest when not shuffling); marks them."""
        candidates = (eligible & ~taken).nonzero()[0]  # (1-D: nonzero is flatnonzero without its wrappers)
        if len(candidates) > k:
            if self.cfg.shuffle:
                candidates = rng.choice(candidates, k, replace=False)
            else:
                order = np.argpartition(self.buffer.arrival[candidates], k - 1)[:k]
                candidates = candidates[order]
        if not self.cfg.shuffle:
            candidates = candidates[np.argsort(self.buffer.arrival[candidates], kind="stable")]
        taken[candidates] = True
        return candidates

    def _draw_lang(self, rng: np.random.Generator, slots: np.ndarray) -> np.ndarray:
        """Per slot a language ∝ p among the group's languages."""
        return self._langs_of(slots, rng.random(len(slots)))

    def _langs_of(self, slots: np.ndarray, u: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """Per slot the language ∝ p among the group's languages (minus ``exclude``) that the uniform
        ``u`` picks: the arithmetic of a draw whose random numbers were taken already, so the draws of
        several languages are computed at once."""
        weights = (self.buffer.lang_pos[slots] >= 0) * self.p[None, :]
        if exclude is not None:
            weights[np.arange(len(slots)), exclude] = 0.0
        cum = np.cumsum(weights, axis=1)
        u = u * cum[:, -1]
        return np.minimum((cum <= u[:, None]).sum(axis=1), self.n_langs - 1)

    def _draw_from_p(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n language indices drawn ∝ p(L) over the data (not over what the buffer holds)."""
        u = rng.random(n) * self._p_cum[-1]
        return np.minimum(self._p_cum.searchsorted(u, side="right"), self.n_langs - 1)

    def _pick_lang(
        self, rng: np.random.Generator, lang: int, n: int, taken: np.ndarray, other: int | None = None
    ) -> np.ndarray:
        """Up to n slots holding ``lang`` (and, with ``other`` ≥ 0, that language too; with -1 any
        second language): fresh groups from the buffer first, then recycled ones (:meth:`_recycle`)."""
        eligible = self.buffer.has[lang]
        if other is not None:
            eligible = eligible & (self.buffer.cross_ok if other < 0 else self.buffer.has[other])
        if self._src_cum is None:
            slots = self._pick(rng, eligible, n, taken)
        else:
            slots = self._pick_by_source(rng, lang, eligible, n, taken, other)
        if len(slots) < n:
            slots = np.concatenate([slots, self.buffer.recycle(rng, lang, n - len(slots), taken, other)])
        return slots

    def _pick_by_source(
        self, rng: np.random.Generator, lang: int, eligible: np.ndarray, n: int, taken: np.ndarray, other: int | None
    ) -> np.ndarray:
        """Up to n eligible slots, each pair's source drawn ∝ p(S | L) (``sampler.source_weights``): fresh
        groups of that source first, then its recycled ones (a small source weighted up is used more
        often than the stream brings it); a source with neither leaves its pairs to the language's other
        sources (counted as ``source_shortfall``): the language's share comes before the source's."""
        cum = self._src_cum[lang]
        drawn = np.minimum(cum.searchsorted(rng.random(n) * cum[-1], side="right"), len(cum) - 1)
        picked = []
        for src, need in self._needs(drawn, len(cum)):
            got = self._pick(rng, eligible & self.buffer.from_source[src], need, taken)
            if len(got) < need:
                got = np.concatenate([got, self.buffer.recycle(rng, lang, need - len(got), taken, other, src)])
            picked.append(got)
        slots = np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)
        if len(slots) < n:
            self.stats.source_shortfall += n - len(slots)
            slots = np.concatenate([slots, self._pick(rng, eligible, n - len(slots), taken)])
        return slots

    def _needs(self, drawn: np.ndarray, n: int) -> list[tuple[int, int]]:
        """(value, how often drawn) of the values in ``drawn`` (all < n), ascending."""
        counts = np.bincount(drawn, minlength=n)
        values = counts.nonzero()[0]
        return list(zip(values.tolist(), counts[values].tolist()))

    def _xx_part(self, rng: np.random.Generator, k: int, taken: np.ndarray) -> tuple[list, int]:
        """k (L, L) pairs, L drawn per pair ∝ p(L); (parts, pairs that had to be filled otherwise)."""
        parts, short = [], 0
        picked, langs = [], []
        for lang, need in self._needs(self._draw_from_p(rng, k), self.n_langs):
            slots = self._pick_lang(rng, lang, need, taken)
            picked.append(slots)
            langs.append(lang)
            short += need - len(slots)
        if picked:
            slots = np.concatenate(picked)
            lang_of = np.repeat(langs, [len(x) for x in picked])
            parts.append((slots, lang_of, lang_of))
        if short:  # a language with fewer groups than asked of it: (L', L') pairs of whatever is there
            self.stats.short_steps += 1
            self.stats.xx_fallback += short
            parts.append(self._any_xx(rng, short, taken))
        return parts, short

    def _cross_part(self, rng: np.random.Generator, k: int, taken: np.ndarray) -> tuple[list, int]:
        """k (X, Y) pairs, X ≠ Y: X drawn per pair ∝ p(L), Y among the group's other languages ∝ p (with
        ``lang_pairs``: (X, Y) drawn ∝ their weight); (parts, pairs filled with x-x pairs for want)."""
        parts, short = [], 0
        picked, qs, ps, us = [], [], [], []
        n_langs = self.n_langs
        if self._pair_w is None:
            for lang, need in self._needs(self._draw_from_p(rng, k), n_langs):
                slots = self._pick_lang(rng, lang, need, taken, other=-1)
                if len(slots):  # Y's random numbers now, in the order of the draws; Y itself below
                    picked.append(slots)
                    qs.append(lang)
                    us.append(rng.random(len(slots)))
                short += need - len(slots)
        else:
            flat_w = self._pair_w.reshape(-1)
            cum = np.cumsum(flat_w)
            drawn = np.minimum(cum.searchsorted(rng.random(k) * cum[-1], side="right"), len(flat_w) - 1)
            for pair, need in self._needs(drawn, len(flat_w)):
                q, p = divmod(pair, n_langs)
                slots = self._pick_lang(rng, q, need, taken, other=p)
                picked.append(slots)
                qs.append(q)
                ps.append(p)
                short += need - len(slots)
        if picked:
            slots = np.concatenate(picked)
            sizes = [len(x) for x in picked]
            qlang = np.repeat(qs, sizes)
            plang = np.repeat(ps, sizes) if ps else self._langs_of(slots, np.concatenate(us), exclude=qlang)
            parts.append((slots, qlang, plang))
        if short:
            self.stats.short_steps += 1
            self.stats.cross_fallback += short
            parts.append(self._any_xx(rng, short, taken))
        return parts, short

    def _any_xx(self, rng: np.random.Generator, n: int, taken: np.ndarray) -> tuple[np.ndarray, ...]:
        """n (L', L') pairs of whatever the buffer holds, L' per group among its languages: the fill of
        every shortage."""
        slots = self._pick(rng, self.buffer.alive, n, taken)
        langs = self._draw_lang(rng, slots)
        return slots, langs, langs

    def _fill_short(
        self, rng: np.random.Generator, step: int, lang: int, missing: int, taken: np.ndarray
    ) -> list:
        policy = self.cfg.on_short
        if policy == "error":
            raise DataError(
                f"rank {self.rank}: buffer has too few groups in {self.buffer.langs[lang]!r} for step {step} "
                f"({missing} of {self.per_rank} missing); raise buffer_groups or set on_short",
                f"stream of rank {self.rank}",
                self.buffer.where(),
            )
        if policy == "x-x":
            return [self._any_xx(rng, missing, taken)]
        parts = []
        for other in self._p_order:
            if other == lang or missing == 0:
                continue
            slots = self._pick(rng, self.buffer.has[other], missing, taken)
            if len(slots):
                parts.append((slots, np.full(len(slots), other), np.full(len(slots), other)))
                missing -= len(slots)
        return parts
