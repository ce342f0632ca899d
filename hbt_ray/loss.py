"""InfoNCE with in-batch negatives, optional hard negatives, cross-worker gathering, τ fixed or learnable.

Row ``i`` of ``q`` is the query whose positive is row ``i`` of ``p``; every other passage in the
(global) batch and every extra hard negative is a negative::

    >>> import torch
    >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> p = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> loss = info_nce_loss(q, p, temperature=0.05)
    >>> loss.shape
    torch.Size([])

Under ``torch.distributed`` (``gather=True``), the candidates of all workers are gathered with
:func:`all_gather_with_grad`, so each worker scores its local queries against the global batch and
the gradient of its own slice flows back. Worker ``r``'s labels are offset by ``r × local batch``.
With the loss averaged over local queries and DDP/DeepSpeed averaging gradients over workers, the
gradients equal those of the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the incoming gradients over workers, keeps the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        sizes_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(sizes_local) for _ in range(world)]
        dist.all_gather(sizes, sizes_local)
        sizes_list = [int(s.item()) for s in sizes]
        max_rows = max(sizes_list)
        padded = x.new_zeros((max_rows, *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous())
        ctx.sizes = sizes_list
        ctx.rank = dist.get_rank()
        return torch.cat([g[:n] for g, n in zip(gathered, sizes_list)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every worker's loss depends on every slice: sum the gradients of all workers' losses, then
        # keep this worker's slice. (DDP later averages parameter grads by world size, matching the
        # mean over the global batch.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all workers along dim 0 (rank order), differentiable w.r.t. the local slice.

    Workers may hold different numbers of rows. Without an initialised process group (or world
    size 1) this returns ``x`` unchanged.
    """
    if not _distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def _local_offset(n_local: int) -> int:
    """Row index of this worker's first row in the gathered batch (handles uneven batches)."""
    if not _distributed():
        return 0
    world = dist.get_world_size()
    mine = torch.tensor([n_local], dtype=torch.long)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    return int(sum(int(s.item()) for s in sizes[: dist.get_rank()]))


def info_nce_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    temperature: float | torch.Tensor,
    negatives: torch.Tensor | None = None,
    symmetric: bool = False,
    gather: bool = True,
) -> torch.Tensor:
    """InfoNCE (softmax cross-entropy over similarities / τ) with in-batch negatives.

    Args:
        q: ``[B, d]`` query embeddings (usually L2-normalised: dot product = cosine).
        p: ``[B, d]`` passage embeddings; ``p[i]`` is the positive of ``q[i]``.
        temperature: τ, a float or a scalar tensor (e.g. ``Temperature()()``, learnable).
        negatives: optional ``[M, d]`` extra candidates (hard negatives) scored by every query.
        symmetric: also add the passage→query term (each passage against all queries); the result is
            the mean of both directions.
        gather: under torch.distributed, score against the candidates of all workers.

    Returns the mean loss over this worker's queries.
    """
    if q.ndim != 2 or p.ndim != 2 or q.shape != p.shape:
        raise ValueError(
            f"info_nce_loss: q and p must both be [B, d], got {tuple(q.shape)} and {tuple(p.shape)}"
        )
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != q.shape[1]):
        raise ValueError(f"info_nce_loss: negatives must be [M, {q.shape[1]}], got {tuple(negatives.shape)}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"info_nce_loss: temperature must be > 0, got {temperature}")
    n_local = q.shape[0]
    use_gather = gather and _distributed()
    all_p = all_gather_with_grad(p) if use_gather else p
    offset = _local_offset(n_local) if use_gather else 0
    candidates = all_p
    if negatives is not None:
        all_neg = all_gather_with_grad(negatives) if use_gather else negatives
        candidates = torch.cat([all_p, all_neg], dim=0)
    labels = torch.arange(offset, offset + n_local, device=q.device)
    logits = q @ candidates.T / temperature
    loss = F.cross_entropy(logits.float(), labels)
    if symmetric:
        all_q = all_gather_with_grad(q) if use_gather else q
        logits_pq = p @ all_q.T / temperature
        loss = (loss + F.cross_entropy(logits_pq.float(), labels)) / 2
    return loss


class Temperature(torch.nn.Module):
    """τ for InfoNCE: fixed, or learnable as ``exp(log_tau)`` clamped to ``[min_value, max_value]``.

    >>> tau = Temperature(0.05, learnable=True, min_value=0.01, max_value=1.0)
    >>> round(float(tau()), 4)
    0.05
    """

    def __init__(
        self, initial: float = 0.05, learnable: bool = False, min_value: float = 0.01, max_value: float = 1.0
    ) -> None:
        super().__init__()
        if not 0 < min_value <= initial <= max_value:
            raise ValueError(
                f"Temperature: need 0 < min_value <= initial <= max_value, got {min_value}, {initial}, {max_value}"
            )
        self.learnable = learnable
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        log_tau = torch.tensor(math.log(initial), dtype=torch.float32)
        if learnable:
            self.log_tau = torch.nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(self.min_value, self.max_value)

    def extra_repr(self) -> str:
        return f"learnable={self.learnable}, min={self.min_value}, max={self.max_value}"
