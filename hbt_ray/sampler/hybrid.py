""":class:`HybridBatchSampler`: one rank's batches, composed of its buffer (:mod:`.buffer`), its draws
(:mod:`.draw`), its counters (:mod:`.stats`) and its resumable state (:mod:`.state`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import numpy as np

from hbt_ray.config import ConfigError
from hbt_ray.data.records import DataError

from . import state as state_mod
from .buffer import GroupBuffer
from .config import (
    Batch,
    SamplerConfig,
    StreamFactory,
    lang_weights,
    parse_lang_pair,
    select_languages,
    source_mix,
)
from .draw import Drawer
from .stats import SamplerStats

#: Allocations between two young-generation collections while a sampler is open (Python's default is
#: far lower). The buffer keeps thousands of freshly read rows (dicts of lists) alive: with the default,
#: every few dozen rows read trigger a collection, and each older-generation one scans the whole buffer
#: (scripts/bench_sampler.py's stream row measures what that costs per pair). Garbage is still
#: collected, only less often; the rows hold no cycles and are freed by reference counting.
GC_YOUNG_THRESHOLD = 50_000


def raise_gc_threshold() -> tuple[int, int, int] | None:
    """Raise the collector's young-generation threshold to :data:`GC_YOUNG_THRESHOLD` (never lower it);
    → the thresholds it replaced, or None when it was that high already."""
    old = gc.get_threshold()
    if old[0] >= GC_YOUNG_THRESHOLD:
        return None
    gc.set_threshold(GC_YOUNG_THRESHOLD, *old[1:])
    return old


def restore_gc_threshold(old: tuple[int, int, int] | None) -> None:
    """Put back what :func:`raise_gc_threshold` replaced, unless someone has set another value since."""
    if old is not None and gc.get_threshold()[0] == GC_YOUNG_THRESHOLD:
        gc.set_threshold(*old)


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
        source_lang_counts: dict[str, dict[str, int]] | None = None,
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

        counts, self.excluded_langs = select_languages(cfg, lang_counts)
        self.langs: list[str] = sorted(lang for lang, n in counts.items() if n > 0)
        self.lang_index = {lang: i for i, lang in enumerate(self.langs)}
        weights = lang_weights({lang: counts[lang] for lang in self.langs}, cfg.lang_temperature)
        self.p = np.array([weights[lang] for lang in self.langs])
        self.sources: list[str] = []
        p_src: np.ndarray | None = None  # p(S | L), with source_weights
        if cfg.source_weights is not None:
            if source_lang_counts is None:
                raise ConfigError("sampler.source_weights: the data's pairs per source and language are not known "
                                  "(shards written by an older hbt_ray: write them again)")  # fmt: skip
            self.sources, self.p, p_src = source_mix(
                cfg.source_weights, source_lang_counts, self.langs, cfg.lang_temperature
            )
        pair_w: np.ndarray | None = None
        if cfg.lang_pairs:
            n_langs = len(self.langs)
            pair_w = np.zeros((n_langs, n_langs))
            for item in cfg.lang_pairs:
                src, dst, w = parse_lang_pair(item)
                if src not in self.lang_index or dst not in self.lang_index:
                    raise ConfigError(f"sampler.lang_pairs: {item!r} names a language without pairs")
                pair_w[self.lang_index[src], self.lang_index[dst]] = w
            pair_w = pair_w * self.p[:, None] * self.p[None, :]
        self._stats = SamplerStats(self.langs, cfg.step_log)
        self._buffer = GroupBuffer(
            cfg, stream_factory, rank, self.per_rank, self.langs, set(lang_counts), pair_w, self._stats, self.sources
        )
        self._drawer = Drawer(
            cfg, self._buffer, self._stats, rank, self.per_rank, self.steps_per_epoch, self.p, pair_w, p_src
        )
        self.step = 0
        self._gc_raised = False
        self._gc_old: tuple[int, int, int] | None = None

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
        """Close the open stream pass (and a prefetched one): Ray Data iterators hold resources; and put
        back the collector's thresholds (:data:`GC_YOUNG_THRESHOLD`)."""
        self._buffer.close()
        if self._gc_raised:
            restore_gc_threshold(self._gc_old)
            self._gc_raised, self._gc_old = False, None

    def batches(self, num_steps: int) -> Iterator[Batch]:
        """``num_steps`` batches from the current position, across epoch boundaries."""
        for _ in range(num_steps):
            yield self.next_batch()

    def step_decision(self, step: int) -> tuple[str, int, np.ndarray | None]:
        """The rank-independent decision of ``step``: (kind, language index or -1, mono mask or None)."""
        return self._drawer.step_decision(step)

    def next_batch(self) -> Batch:
        if not self._gc_raised:  # from the first batch until close(): once per open sampler, not per batch,
            self._gc_raised, self._gc_old = True, raise_gc_threshold()  # whose restore would collect at once
        step, epoch, k = self.step, self.epoch, self.per_rank
        buf = self._buffer
        buf.refill()
        alive = int(buf.alive.sum())
        if alive < k:
            raise DataError(
                f"rank {self.rank}: only {alive} distinct groups available for a per-rank batch of {k} "
                f"(the split is smaller than one batch); lower batch_size",
                f"stream of rank {self.rank}",
                buf.where(),
            )
        kind, lang, slots, qlang, plang, fallback = self._drawer.draw(step, epoch)
        batch = self._make_batch(step, epoch, kind, lang, slots, qlang, plang, fallback)
        lang_name = batch.lang
        self._stats.record(step, kind, lang, lang_name, qlang, plang, batch.sources, fallback)
        buf.release(slots)
        self.step += 1
        return batch

    def _make_batch(self, step, epoch, kind, lang, slots, qlang, plang, fallback) -> Batch:
        buf = self._buffer
        rows, ids, qs, ps, lang_pos, langs = buf.rows, buf.ids, buf.qs, buf.ps, buf.lang_pos, self.langs
        qpos = lang_pos[slots, qlang].tolist()
        ppos = lang_pos[slots, plang].tolist()
        slot_list = slots.tolist()
        queries = [qs[s][i] for s, i in zip(slot_list, qpos)]
        passages = [ps[s][i] for s, i in zip(slot_list, ppos)]
        lang_of = langs.__getitem__
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
            query_langs=list(map(lang_of, qlang.tolist())),
            passage_langs=list(map(lang_of, plang.tolist())),
            group_ids=list(map(ids.__getitem__, slot_list)),
            rank=self.rank,
            fallback_pairs=fallback,
            sources=list(map(buf.source_of.__getitem__, slot_list)),
        )

    # ------------------------------------------------------------------ statistics and state
    def stats(self) -> dict[str, Any]:
        """Counts since the start (or the resumed state): check α, p(L) and fallbacks against them."""
        return {
            "rank": self.rank,
            **self._stats.summary(self.p, self.excluded_langs),
            "buffer_groups": int(self._buffer.alive.sum()),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def fallback_pairs(self) -> int:
        """Pairs so far that are not what their step's strategy asked for (see "Shortage")."""
        return self._stats.fallback_pairs()

    def step_log(self) -> list[tuple[int, str, str | None, int]]:
        """The most recent (step, strategy, lang, fallback pairs) records."""
        return list(self._stats.step_log)

    def format_stats(self) -> str:
        """A printable table: per language p(L), mono steps, query/passage pairs, fallbacks."""
        return self._stats.format(self.stats(), self.rank, self.p, self.cfg.alpha)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly at ``self.step`` (plain data, picklable)."""
        return state_mod.state_dict(
            self.cfg, self.rank, self.world_size, self.step, self._buffer, self._stats
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the stream is re-opened at (pass, rows read) on the next step."""
        state_mod.check_state(state, self.cfg, self.rank, self.world_size)
        self.step = int(state["step"])
        state_mod.load_buffer(self._buffer, state)
        self._stats.load(state["stats"])
