"""Packed ("unpadded") encoder forward: the dense layers see only the real tokens of a batch.

A dynamically padded batch of texts of mixed lengths holds many pad tokens, and a transformers
encoder spends its dense layers — Q/K/V, attention output, feed-forward, layer norms: nearly all of
its FLOPs — on them too. Here the hidden states are kept as one ``[real_tokens, hidden]`` matrix;
only the attention scores are computed per sequence (scattered to ``[batch, heads, length, head_dim]``
with a key-padding mask, then gathered back). The real tokens' outputs are the padded forward's (same
modules, same weights, same dropout), so the result is the same model up to float rounding, with the
pads' share of the compute saved.

It runs the backbone's own submodules (embeddings, Linear, LayerNorm, Dropout), so DeepSpeed ZeRO-3's
per-module parameter gathering and gradient checkpointing work unchanged. Given the batch's real-token
count from the host (``tokens``: the trainer counts it on the CPU mask before the copy to the GPU),
nothing in it depends on the data's values for a shape, so the host never waits for the device. BERT, RoBERTa and XLM-R
(LaBSE, multilingual-e5, xlm-roberta-*) are supported; other architectures run padded.

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                             num_attention_heads=2, intermediate_size=32)).eval()
    >>> ids = torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]])
    >>> mask = (ids != 0).long()
    >>> hidden, seq = packed_hidden_states(bert, ids, mask, tokens=7)
    >>> hidden.shape, seq.tolist()
    (torch.Size([7, 16]), [0, 0, 0, 0, 1, 1, 1])
    >>> padded = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    >>> bool(torch.allclose(hidden, padded[mask.bool()], atol=1e-5))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: Backbone classes whose layers have the BERT layout this module drives.
PACKED_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel")


def packed_forward_supported(backbone: torch.nn.Module) -> bool:
    """True when :func:`packed_hidden_states` can run ``backbone`` (an encoder of the BERT layout)."""
    if type(backbone).__name__ not in PACKED_ARCHITECTURES:
        return False
    cfg = backbone.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(cfg, "chunk_size_feed_forward", 0):
        return False
    for layer in backbone.encoder.layer:
        attn = getattr(getattr(layer, "attention", None), "self", None)
        names = ("query", "key", "value", "dropout", "scaling", "num_attention_heads", "attention_head_size")
        if attn is None or not all(hasattr(attn, n) for n in names):
            return False
    return True


def _packed_layer(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    key_mask: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    """One BERT layer on packed ``hidden`` ``[tokens, H]``; ``index`` = the tokens' flat padded positions."""
    batch, length = shape
    attn = layer.attention.self
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size

    def per_sequence(x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(batch * length, x.shape[-1]).index_copy(0, index, x)
        return full.view(batch, length, heads, head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        per_sequence(attn.query(hidden)),
        per_sequence(attn.key(hidden)),
        per_sequence(attn.value(hidden)),
        attn_mask=key_mask,
        dropout_p=attn.dropout.p if attn.training else 0.0,
        scale=attn.scaling,
    )
    context = context.transpose(1, 2).reshape(batch * length, heads * head_dim).index_select(0, index)
    attended = layer.attention.output(context, hidden)  # dense → dropout → LayerNorm(+ residual)
    return layer.output(layer.intermediate(attended), attended)


def real_token_index(attention_mask: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
    """Flat ``[batch × length]`` positions of the real tokens, in row-major order::

        >>> real_token_index(torch.tensor([[1, 1, 0], [1, 0, 0]]), tokens=3).tolist()
        [0, 1, 3]
    """
    flat = attention_mask.reshape(-1)
    if tokens is None:  # the output's size depends on the mask's values: the host waits for the device
        return flat.nonzero().squeeze(1)
    # With the count known, a stable sort puts the real tokens first, in order, at a size fixed in
    # advance: no host sync, so the GPU keeps the launches queued ahead of it.
    return torch.argsort((flat == 0).to(torch.uint8), stable=True)[:tokens]


def packed_hidden_states(
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    checkpointing: bool = False,
    tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the real tokens, ``[tokens, H]`` in row-major order, and each token's row.

    ``input_ids``/``attention_mask`` are the usual ``[batch, length]`` padded tensors; ``checkpointing``
    recomputes each layer in the backward pass (training only); ``tokens``, the number of real tokens
    when the caller knows it on the host (see :func:`real_token_index`).
    """
    batch, length = input_ids.shape
    mask = attention_mask.bool()
    index = real_token_index(attention_mask, tokens)
    embedded = backbone.embeddings(input_ids=input_ids)  # positions as the model defines them
    hidden = embedded.reshape(batch * length, -1).index_select(0, index)
    key_mask = mask[:, None, None, :]
    recompute = checkpointing and backbone.training and torch.is_grad_enabled()
    for layer in backbone.encoder.layer:
        if recompute:
            hidden = checkpoint(
                _packed_layer, layer, hidden, index, key_mask, (batch, length), use_reentrant=False
            )
        else:
            hidden = _packed_layer(layer, hidden, index, key_mask, (batch, length))
    return hidden, torch.div(index, length, rounding_mode="floor")


def packed_pool(hidden: torch.Tensor, rows: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[batch, H]``: each row's first token (``cls``) or mean of its tokens (``mean``)."""
    batch = attention_mask.shape[0]
    counts = attention_mask.sum(1)  # each row's real tokens, on the device (bincount would sync)
    if pooling == "cls":
        starts = torch.cumsum(counts, 0) - counts
        return hidden.index_select(0, starts.clamp(max=max(hidden.shape[0] - 1, 0)))
    sums = hidden.new_zeros(batch, hidden.shape[-1]).index_add(0, rows, hidden)
    return sums / counts.clamp(min=1).unsqueeze(1).to(hidden.dtype)
