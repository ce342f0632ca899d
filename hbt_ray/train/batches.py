"""The batches a training worker consumes: tokenized ahead of the model in a background thread
(:class:`PrefetchedBatches`) and re-dealt among the ranks by their real tokens (:func:`deal_by_tokens`),
so every collective waits as little as possible for the slowest rank."""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hbt_ray.loss import host_group
from hbt_ray.sampler import Batch, HybridBatchSampler


def batch_preparer(encoder: Any, hard_negatives: bool, pin: bool = False) -> Callable[[Batch], tuple[Any, ...]]:
    """``prepare(batch)`` → ``(q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, negatives_per_pair)``: the
    batch tokenized by the encoder (``n_ids`` None when no pair has hard negatives). ``pin`` (training on
    a GPU): the tensors in page-locked memory, made in the prefetch thread, so that the step's
    ``.to(device, non_blocking=True)`` is an asynchronous copy rather than a blocking one."""

    def tokenize(texts: list[str], kind: str) -> tuple[Any, Any]:
        tok = encoder.tokenize(texts, kind)
        if pin:
            return tok["input_ids"].pin_memory(), tok["attention_mask"].pin_memory()
        return tok["input_ids"], tok["attention_mask"]

    def prepare(batch: Batch) -> tuple[Any, ...]:
        q_ids, q_mask = tokenize(list(batch.queries), "query")
        p_ids, p_mask = tokenize(list(batch.passages), "passage")
        per_pair = [len(n) if hard_negatives else 0 for n in batch.negatives]
        n_ids = n_mask = None
        if sum(per_pair):
            n_ids, n_mask = tokenize([n for negs in batch.negatives for n in negs], "passage")
        return q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, per_pair

    return prepare


def balanced_deal(costs: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Deal the ranks' pairs back out, as many to each rank as it drew, with near-equal cost per rank.

    ``costs[r][i]`` is the cost of pair ``i`` drawn by rank ``r`` (its real tokens). Greedy: the
    costliest pair first, each to the least-loaded rank with room. Returns, per rank, the
    ``(source rank, index)`` of its pairs in source order; every rank computes the same deal.

    >>> balanced_deal([[100, 90], [10, 20]])  # loads 190 and 30 → 110 and 110
    [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    """
    room = [len(c) for c in costs]
    loads = [0] * len(costs)
    dealt: list[list[tuple[int, int]]] = [[] for _ in costs]
    pairs = sorted(((c, r, i) for r, rank_costs in enumerate(costs) for i, c in enumerate(rank_costs)),
                   key=lambda t: (-t[0], t[1], t[2]))  # fmt: skip
    for cost, src, i in pairs:
        dst = min((r for r in range(len(costs)) if room[r]), key=lambda r: (loads[r], r))
        dealt[dst].append((src, i))
        loads[dst] += cost
        room[dst] -= 1
    return [sorted(d) for d in dealt]


def _real_tokens(ids: Any, mask: Any) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def deal_by_tokens(prepared: tuple[Any, ...], tokenizer: Any) -> tuple[tuple[Any, ...], list[int]]:
    """Exchange this step's tokenized pairs among the ranks and keep this rank's :func:`balanced_deal`.

    ``prepared`` = ``(q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, negatives_per_pair)`` (CPU tensors;
    ``n_ids`` None without hard negatives); a pair moves with its hard negatives. Returns the same
    tuple for the dealt pairs (padded again by ``tokenizer``) and every rank's real tokens before and
    after the deal, ``[before_0, …, after_0, …]``.
    """
    import torch.distributed as dist

    q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, negs_per_pair = prepared
    queries, passages = _real_tokens(q_ids, q_mask), _real_tokens(p_ids, p_mask)
    flat_negs = _real_tokens(n_ids, n_mask) if n_ids is not None else []
    negatives, start = [], 0
    for n in negs_per_pair:
        negatives.append(flat_negs[start : start + n])
        start += n
    mine = [(q, p, negs) for q, p, negs in zip(queries, passages, negatives)]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=host_group())  # host data: never through the GPU
    costs = [[len(q) + len(p) + sum(map(len, negs)) for q, p, negs in pairs] for pairs in everyone]
    deal = balanced_deal(costs)
    dealt = [everyone[src][i] for src, i in deal[dist.get_rank()]]

    def pad(rows: list[list[int]]) -> tuple[Any, Any]:
        out = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    q_ids, q_mask = pad([q for q, _, _ in dealt])
    p_ids, p_mask = pad([p for _, p, _ in dealt])
    n_rows = [n for _, _, negs in dealt for n in negs]
    n_ids, n_mask = pad(n_rows) if n_rows else (None, None)
    after = [sum(costs[src][i] for src, i in d) for d in deal]
    return (q_ids, q_mask, p_ids, p_mask, n_ids, n_mask, [len(negs) for _, _, negs in dealt]), [
        *map(sum, costs),
        *after,
    ]


class PrefetchedBatches:
    """The sampler's next batches, drawn and tokenized ``depth`` steps ahead in a background thread, so
    batch preparation overlaps the model's forward and backward (tokenizers and torch kernels release
    the GIL). Checkpoint-exact: :meth:`state_dict` is the sampler's state after the batches already
    drawn plus those batches themselves, which :meth:`load_state_dict` hands out first.

        >>> from hbt_ray.data.records import Pair, PairGroup
        >>> from hbt_ray.sampler import SamplerConfig
        >>> rows = [PairGroup(f"g{i}", "demo", {"en": Pair(f"q{i}", f"p{i}")}).to_row() for i in range(8)]
        >>> cfg = SamplerConfig(strategy="x-x-mono", batch_size=2, buffer_groups=8, shuffle=False)
        >>> sampler = HybridBatchSampler(cfg, lambda n: iter(rows), 0, 1, {"en": 8}, num_groups=8)
        >>> batches = PrefetchedBatches(sampler, lambda b: len(b.queries), depth=2)
        >>> batch, prepared = batches.next()
        >>> batch.queries, prepared
        (['q0', 'q1'], 2)
        >>> state = batches.state_dict()  # what a checkpoint stores: the sampler + the batches drawn ahead
        >>> batches.close()
    """

    def __init__(self, sampler: HybridBatchSampler, prepare: Callable[[Any], Any], depth: int = 2):
        self.sampler, self.prepare, self.depth = sampler, prepare, max(1, depth)
        self._ready: deque = deque()  # (batch, prepared), in order
        self._drawn: Any = None  # drawn from the sampler, being prepared
        self._cond = threading.Condition()
        self._prepare_lock = threading.Lock()  # held while preparing; see paused()
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or len(self._ready) < self.depth)
                    if self._stop:
                        return
                    self._drawn = self.sampler.next_batch()  # under the lock: state_dict sees it
                with self._prepare_lock:
                    prepared = self.prepare(self._drawn)
                with self._cond:
                    self._ready.append((self._drawn, prepared))
                    self._drawn = None
                    self._cond.notify_all()
        except BaseException as err:  # handed to the consumer by next()
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def next(self) -> tuple[Any, Any]:
        """(batch, prepare(batch)) of the next step, in the sampler's order."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hbt-prefetch", daemon=True)
            self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._error is not None)
            if not self._ready:
                raise self._error  # type: ignore[misc]
            item = self._ready.popleft()
            self._cond.notify_all()
            return item

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No preparation runs inside this block (e.g. an evaluation that uses the same tokenizer,
        whose truncation settings are not thread-safe)."""
        with self._prepare_lock:
            yield

    def state_dict(self) -> dict[str, Any]:
        with self._cond:
            pending = [b for b, _ in self._ready] + ([self._drawn] if self._drawn is not None else [])
            return {"sampler": self.sampler.state_dict(), "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before the first :meth:`next`)."""
        if self._thread is not None:
            raise RuntimeError("load_state_dict after batches were drawn")
        self.sampler.load_state_dict(state["sampler"])
        self._ready = deque((b, self.prepare(b)) for b in state["pending"])

    def close(self) -> None:
        """Stop the thread and close the sampler's streams."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.sampler.close()


def all_reduce_mean(values: Any, host: bool = False) -> list[float]:
    """The mean of each value over the ranks (plain values on one process), read on the host. A tensor
    is reduced where it lives, on the default group (the device's values: reading them waits for the
    device); ``host=True`` takes a list of the host's own numbers through :func:`host_group`, which
    never touches the GPU."""
    import torch
    import torch.distributed as dist

    t = values.double() if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, group=host_group() if host else None)
        t /= dist.get_world_size()
    return t.tolist()


def batch_fingerprint(queries: list[str], passages: list[str]) -> str:
    h = hashlib.sha1()
    for text in (*queries, *passages):
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]
