"""GradCache (Gao et al. 2021) under DeepSpeed ZeRO: the exact gradient of InfoNCE over the whole batch —
in-batch negatives, hard negatives, negatives gathered across workers, learnable τ — at the activation
memory of ``loss.chunk_size`` pairs.

One optimizer step, per worker (:func:`cached_step`):

1. **Embed** every chunk without a graph, remembering the RNG state before each chunk (dropout).
2. **Loss**: InfoNCE on the cached embeddings (the collectives of the plain loss: candidates gathered
   from every worker); ``torch.autograd.grad`` gives d loss / d embedding for this worker's rows and
   d loss / d τ — into plain tensors, so no parameter's gradient hook fires outside the engine.
3. **Replay** each chunk with its RNG state restored (the same dropout masks), through the DeepSpeed
   engine, as the surrogate ``Σ embedding · cached gradient + τ · (d loss / d τ) / chunks``: its gradient
   w.r.t. the parameters is exactly the chunk's share of the full batch's, and the chunks' shares sum
   to it (τ's share is split evenly over the chunks: every micro-step touches every parameter).

Why this is correct under ZeRO 1/2/3: every replayed chunk is one ordinary engine micro-step —
``engine(...)``, ``engine.backward(...)``, ``engine.step()`` — with the engine built for
``gradient_accumulation_steps = optim.grad_accum × chunks``. That is DeepSpeed's own gradient
accumulation path: stage 1/2 reduce each micro-step's gradients into the partitions and accumulate,
stage 3 gathers each layer's parameters in its forward / backward hooks (they fire for the replayed
chunk as for any forward), and the optimizer, gradient clipping and the lr scheduler act once, at the
accumulation boundary (the last chunk). No ``no_sync()`` (which asserts under ZeRO 2/3), no second
backward through one partition. The engine divides each micro-step's loss by its accumulation steps;
the surrogate is multiplied by ``chunks`` so that the sum is the mean loss's gradient divided by
``optim.grad_accum``, as in the plain step. ``tests/test_gradcache.py`` compares gradients (stage 0)
and parameters after a step (stages 2 and 3) with the plain full batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def chunk_bounds(n_pairs: int, chunk_size: int, neg_counts: list[int]) -> list[tuple[int, int, int, int]]:
    """``(first pair, end pair, first negative, end negative)`` of each chunk; the hard negatives of a
    pair are consecutive rows (``neg_counts[i]`` of them for pair i)::

        >>> chunk_bounds(5, 2, [1, 0, 2, 0, 1])
        [(0, 2, 0, 1), (2, 4, 1, 3), (4, 5, 3, 4)]
    """
    starts = [0]
    for c in neg_counts:
        starts.append(starts[-1] + c)
    if len(neg_counts) not in (0, n_pairs):
        raise ValueError(f"{len(neg_counts)} negative counts for {n_pairs} pairs")
    out = []
    for a in range(0, n_pairs, chunk_size):
        b = min(a + chunk_size, n_pairs)
        out.append((a, b, starts[a] if neg_counts else 0, starts[b] if neg_counts else 0))
    return out


def num_chunks(pairs_per_worker: int, chunk_size: int) -> int:
    return max(1, math.ceil(pairs_per_worker / chunk_size))


class RngState:
    """The CPU (and CUDA) RNG state, to replay a chunk's forward with the same dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _rows(t: Any, a: int, b: int) -> Any:
    return None if t is None else t[a:b]


def _chunk_lengths(lengths: Any, a: int, b: int, na: int, nb: int) -> Any:
    if lengths is None:
        return None
    q_len, p_len, n_len = lengths
    return q_len[a:b], p_len[a:b], _rows(n_len, na, nb)


def cached_step(
    engine: Any, module: Any, batch: tuple[Any, ...], chunk_size: int, lengths: Any = None, teacher: Any = None
) -> tuple[torch.Tensor, Any]:
    """Phases 1 and 2 (see the module doc) of one micro-batch ``batch`` = (q_ids, q_mask, p_ids, p_mask,
    n_ids, n_mask, negatives per pair) of this worker, ``lengths`` its rows' real tokens counted on the
    host (``hbt_ray.loss.row_lengths``), ``teacher`` the starting encoder's embeddings of it when
    ``loss.distill`` (a function of the embeddings too: cached with InfoNCE); → (the full batch's loss, a ``replay()`` callable that runs
    phase 3 through ``engine``, one micro-step per chunk). The caller checks the loss (every worker the
    same decision) before it replays; a skipped step runs no micro-step at all."""
    q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, neg_counts = batch
    bounds = chunk_bounds(q_ids.shape[0], chunk_size, list(neg_counts or []))
    states, qs, ps, ns = [], [], [], []
    with torch.no_grad():
        for a, b, na, nb in bounds:
            states.append(RngState())
            q, p, n = module.embed(q_ids[a:b], q_mask[a:b], p_ids[a:b], p_mask[a:b], _rows(n_ids, na, nb),
                                   _rows(n_mask, na, nb), _chunk_lengths(lengths, a, b, na, nb))  # fmt: skip
            qs.append(q)
            ps.append(p)
            if n is not None:
                ns.append(n)
    after = RngState()  # where the plain step's RNG would be: the replay must not move it
    q_all = torch.cat(qs).float().requires_grad_()
    p_all = torch.cat(ps).float().requires_grad_()
    n_all = torch.cat(ns).float().requires_grad_() if ns else None
    tau = module.temperature()
    learnable = tau.requires_grad
    tau_leaf = tau.detach().requires_grad_(learnable)
    loss = module.loss(q_all, p_all, n_all, tau_leaf, teacher)
    wrt = [q_all, p_all, *([n_all] if n_all is not None else []), *([tau_leaf] if learnable else [])]
    grads = torch.autograd.grad(loss, wrt)
    g_q, g_p = grads[0], grads[1]
    g_n = grads[2] if n_all is not None else None
    g_tau = grads[-1] if learnable else None

    def replay(final_step: bool = True) -> None:
        """``final_step=False``: the last chunk's ``engine.step()`` is left to the caller (who takes the
        accumulation boundary's step only once the step's losses are known finite)."""
        chunks = len(bounds)
        for i, (a, b, na, nb) in enumerate(bounds):
            states[i].restore()
            # τ's share in every chunk: a parameter that gets gradients in some micro-steps only loses
            # them under ZeRO-3 with offload (seen in tests/test_gradcache.py)
            g_tau_i = None if g_tau is None else g_tau / chunks
            cached = (g_q[a:b], g_p[a:b], None if g_n is None else g_n[na:nb], g_tau_i)
            surrogate, _ = engine(q_ids[a:b], q_mask[a:b], p_ids[a:b], p_mask[a:b],
                                  _rows(n_ids, na, nb), _rows(n_mask, na, nb), cached=cached,
                                  lengths=_chunk_lengths(lengths, a, b, na, nb))  # fmt: skip
            engine.backward(surrogate * chunks)
            if final_step or i < chunks - 1:
                engine.step()
        after.restore()

    return loss.detach(), replay
