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

Sources. With ``source_weights`` (``{"mlqa-r": 0.8, "ddtp": 0.2}``, every source of the data named,
normalised) source S gets the share w_S of the pairs, whatever its size: ``source_lang_counts`` (the
data's pairs per source and language) gives p(L | S) ∝ n_SL^(1/T) within each source, languages are
drawn ∝ p(L) = Σ_S w_S p(L | S), and each pair's group ∝ p(S | L) among the language's groups of source
S. A source with no group of L left in the buffer gives its pairs to L's other sources
(``source_shortfall_pairs``); recycled groups come from the language's reservoir, whatever their source.
Without it, a source is drawn as often as its pairs weigh in p(L) (and the batch stream is the one it
always was).

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

from hbt_ray.data.records import Pair, PairGroup  # noqa: F401 (the doctest above)

from .config import Batch, SamplerConfig, count_pairs, lang_weights, parse_lang_pair
from .hybrid import HybridBatchSampler

__all__ = [
    "Batch",
    "HybridBatchSampler",
    "SamplerConfig",
    "count_pairs",
    "lang_weights",
    "parse_lang_pair",
]
