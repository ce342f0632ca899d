"""What the sampler has done so far: steps per kind and language, pairs per language pair and source,
fallbacks, recycling and stream counters; checked against α, p(L) and ``max_fallback_share``."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import numpy as np


class SamplerStats:
    """The counters of one rank's sampler, kept by the sampler, its buffer and its draws."""

    def __init__(self, langs: list[str], step_log: int) -> None:
        self.langs = langs
        self._step_log_len = step_log
        self.reset()

    def reset(self) -> None:
        n = len(self.langs)
        self.steps_by_kind: dict[str, int] = {"x-x-mono": 0, "x-y": 0, "x-x": 0, "hybrid-sample": 0}
        self.mono_steps = np.zeros(n, dtype=np.int64)
        self.pair_counts = np.zeros((n, n), dtype=np.int64)  # query lang × passage lang
        self.fallback_by_lang = np.zeros(n, dtype=np.int64)  # mono steps' fallback pairs
        self.short_steps = 0
        self.cross_fallback = 0
        self.xx_fallback = 0
        self.recycled_pairs = 0
        self.source_shortfall = 0  # pairs whose drawn source had no group left: another source's
        self.source_pairs: Counter[str] = Counter()
        self.stream_waits = 0
        self.groups_read = 0
        self.groups_skipped = 0
        self.passes = 0
        self.step_log: deque = deque(maxlen=self._step_log_len)

    def record(
        self, step: int, kind: str, lang: int, lang_name: str | None, qlang, plang, sources, fallback: int
    ):
        self.steps_by_kind[kind] += 1
        if kind == "x-x-mono":
            self.mono_steps[lang] += 1
        n = len(self.langs)  # a bincount: numpy's add.at is slower at a batch's few dozen pairs
        self.pair_counts += np.bincount(qlang * n + plang, minlength=n * n).reshape(n, n)
        self.source_pairs.update(sources)
        self.step_log.append((step, kind, lang_name, fallback))

    def fallback_pairs(self) -> int:
        return int(self.fallback_by_lang.sum()) + self.cross_fallback + self.xx_fallback

    def summary(self, p: np.ndarray, excluded: dict[str, int]) -> dict[str, Any]:
        """The counters as plain data, with p(L) and the languages left out (the sampler adds its rank and
        buffer)."""
        steps = sum(self.steps_by_kind.values())
        counts = self.pair_counts
        pairs = int(counts.sum())
        diag = int(np.trace(counts))
        langs = self.langs
        per_pair = {f"{langs[i]}-{langs[j]}": int(counts[i, j]) for i, j in zip(*np.nonzero(counts))}
        fallback = self.fallback_pairs()
        return {
            "steps": steps,
            "steps_by_strategy": dict(self.steps_by_kind),
            "mono_step_share": self.steps_by_kind["x-x-mono"] / steps if steps else 0.0,
            "pairs": pairs,
            "mono_pair_share": diag / pairs if pairs else 0.0,
            "mono_steps_by_lang": {langs[i]: int(n) for i, n in enumerate(self.mono_steps) if n},
            "lang_p": {lang: float(x) for lang, x in zip(langs, p)},
            "query_pairs_by_lang": {langs[i]: int(n) for i, n in enumerate(counts.sum(1)) if n},
            "passage_pairs_by_lang": {langs[i]: int(n) for i, n in enumerate(counts.sum(0)) if n},
            "pairs_by_lang_pair": per_pair,
            "pairs_by_source": dict(sorted(self.source_pairs.items())),
            "fallback_pairs": fallback,
            "fallback_share": fallback / pairs if pairs else 0.0,
            "mono_fallback_pairs_by_lang": {
                langs[i]: int(n) for i, n in enumerate(self.fallback_by_lang) if n
            },
            "cross_fallback_pairs": self.cross_fallback,
            "xx_fallback_pairs": self.xx_fallback,
            "recycled_pairs": self.recycled_pairs,
            "source_shortfall_pairs": self.source_shortfall,
            "excluded_langs": dict(excluded),
            "short_steps": self.short_steps,
            "groups_read": self.groups_read,
            "groups_skipped_no_language": self.groups_skipped,
            "stream_passes": self.passes,
            "stream_waits": self.stream_waits,
        }

    def format(self, st: dict[str, Any], rank: int, p: np.ndarray, alpha: float) -> str:
        """A printable table of :meth:`HybridBatchSampler.stats` ``st``: per language p(L), mono steps,
        query/passage pairs, fallbacks."""
        lines = [
            f"rank {rank}: {st['steps']} steps {st['steps_by_strategy']}, mono step share "
            f"{st['mono_step_share']:.3f} (alpha {alpha}), {st['pairs']} pairs, "
            f"{st['fallback_pairs']} fallback pairs in {st['short_steps']} short steps, "
            f"{st['stream_passes']} stream passes",
            f"{'lang':<8}{'p(L)':>8}{'mono%':>8}{'steps':>8}{'q pairs':>10}{'p pairs':>10}{'fallback':>10}",
        ]
        steps_mono = max(1, st["steps_by_strategy"]["x-x-mono"])
        for i, lang in enumerate(self.langs):
            lines.append(
                f"{lang:<8}{p[i]:>8.3f}{100 * self.mono_steps[i] / steps_mono:>8.2f}"
                f"{int(self.mono_steps[i]):>8}{int(self.pair_counts[i].sum()):>10}"
                f"{int(self.pair_counts[:, i].sum()):>10}{int(self.fallback_by_lang[i]):>10}"
            )
        top = sorted(st["pairs_by_lang_pair"].items(), key=lambda kv: -kv[1])[:10]
        lines.append("top language pairs: " + ", ".join(f"{k} {v}" for k, v in top))
        return "\n".join(lines)

    def state(self) -> dict[str, Any]:
        return {
            "steps_by_kind": dict(self.steps_by_kind),
            "mono_steps": self.mono_steps.tolist(),
            "pair_counts": self.pair_counts.tolist(),
            "fallback_pairs": self.fallback_by_lang.tolist(),
            "short_steps": self.short_steps,
            "cross_fallback": self.cross_fallback,
            "xx_fallback": self.xx_fallback,
            "recycled_pairs": self.recycled_pairs,
            "source_shortfall": self.source_shortfall,
            "source_pairs": dict(self.source_pairs),
            "stream_waits": self.stream_waits,
            "groups_read": self.groups_read,
            "groups_skipped": self.groups_skipped,
            "passes": self.passes,
        }

    def load(self, st: dict[str, Any]) -> None:
        """Restore :meth:`state` (the step log starts empty; keys added later default to 0)."""
        self.reset()
        self.steps_by_kind = dict(st["steps_by_kind"])
        self.mono_steps = np.array(st["mono_steps"], dtype=np.int64)
        self.pair_counts = np.array(st["pair_counts"], dtype=np.int64)
        self.fallback_by_lang = np.array(st["fallback_pairs"], dtype=np.int64)
        self.short_steps = st["short_steps"]
        self.cross_fallback = st["cross_fallback"]
        self.xx_fallback = st.get("xx_fallback", 0)
        self.recycled_pairs = st.get("recycled_pairs", 0)
        self.source_shortfall = st.get("source_shortfall", 0)
        self.source_pairs = Counter(st.get("source_pairs", {}))
        self.stream_waits = st["stream_waits"]
        self.groups_read = st["groups_read"]
        self.groups_skipped = st["groups_skipped"]
        self.passes = st["passes"]
