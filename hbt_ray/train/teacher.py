"""The starting encoder, frozen, for ``loss.distill``: its embeddings of every training batch are what
the regulariser (:func:`hbt_ray.loss.distill_loss`) keeps the trained encoder's in-batch scores close to.

It is a copy taken before DeepSpeed builds its engine (ZeRO-3 partitions the module's parameters in
place), kept out of the engine (no optimizer state, no ZeRO gathers, no cast by DeepSpeed), in eval mode
(no dropout: the target does not move with the student's masks), in the training precision's dtype. A
resumed run takes it from the same starting weights: ``cfg.model`` loaded under the run's seed."""

from __future__ import annotations

import copy
from typing import Any

import torch

from hbt_ray.loss import TeacherEmbeddings

#: the dtype the frozen copy runs in, per ``deepspeed.precision`` (the student's forward dtype)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Teacher:
    """A frozen copy of ``encoder``; :meth:`embed` encodes a batch without a graph.

    >>> from hbt_ray.model import ModelConfig, load_dual_encoder
    >>> encoder = load_dual_encoder(ModelConfig(name="tiny"), train_texts=["a b c", "d e f"])
    >>> teacher = Teacher(encoder, torch.device("cpu"), "fp32", chunk_size=1)
    >>> tok = encoder.tokenize(["a b", "d e"], "query")
    >>> q, p, n = teacher.embed(tok["input_ids"], tok["attention_mask"], tok["input_ids"], tok["attention_mask"])
    >>> q.shape[0], q.requires_grad, n, torch.equal(q, p)
    (2, False, None, True)
    """

    def __init__(self, encoder: torch.nn.Module, device: Any, precision: str, chunk_size: int) -> None:
        self.encoder = copy.deepcopy(encoder).eval().requires_grad_(False).to(device=device, dtype=DTYPES[precision])
        self.chunk_size = chunk_size  # rows per forward: the memory of a chunk, as GradCache's

    @torch.no_grad()
    def embed(
        self, q_ids: Any, q_mask: Any, p_ids: Any, p_mask: Any, n_ids: Any = None, n_mask: Any = None,
        lengths: Any = None,
    ) -> TeacherEmbeddings:  # fmt: skip
        """(queries, passages, hard negatives or None); ``lengths``: the rows' real tokens counted on the
        host (:func:`hbt_ray.loss.row_lengths`), so the packed forward makes no host sync."""
        q_len, p_len, n_len = lengths or (None, None, None)
        q = self._rows(q_ids, q_mask, q_len)
        p = self._rows(p_ids, p_mask, p_len)
        n = self._rows(n_ids, n_mask, n_len) if n_ids is not None and n_ids.shape[0] else None
        return q, p, n

    def _rows(self, ids: Any, mask: Any, lens: list[int] | None) -> torch.Tensor:
        parts = []
        for a in range(0, ids.shape[0], self.chunk_size):
            b = a + self.chunk_size
            parts.append(self.encoder(ids[a:b], mask[a:b], None if lens is None else sum(lens[a:b])))
        return torch.cat(parts)
