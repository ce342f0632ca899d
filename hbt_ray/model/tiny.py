"""The ``"tiny"`` preset: a random-init 2-layer BERT and a WordPiece tokenizer, for fast tests.

Every Ray worker builds its own copy, so both must be pure functions of their inputs: the weights of
``ModelConfig.seed``, the vocabulary of the training texts (or of a sample of real DDTP text in
:func:`~hbt_ray.data.records.data_dir` when none are given)::

    >>> texts = ["the cat sat", "die Katze sitzt", "the dog sat"]
    >>> vocab = build_tiny_tokenizer(texts, vocab_size=100).get_vocab()
    >>> vocab == build_tiny_tokenizer(list(reversed(texts)), vocab_size=100).get_vocab()
    True
    >>> [vocab[t] for t in TINY_SPECIALS]
    [0, 1, 2, 3, 4]
    >>> "sat" in vocab
    True
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hbt_ray.model.config import ModelConfig, cache_root

if TYPE_CHECKING:
    from tokenizers import Tokenizer, normalizers
    from transformers import BertModel, PreTrainedTokenizerFast

TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Part of the tokenizer cache key: bump it when build_tiny_tokenizer's output changes.
_TINY_TOKENIZER_VERSION = 1


def ddtp_sample_texts(max_records: int) -> list[str]:
    """Queries and passages of the first ``max_records`` DDTP records (groups with most languages first)."""
    from hbt_ray.data.files import iter_jsonl, require_text
    from hbt_ray.data.records import DataError, data_dir

    path = data_dir() / "ddtp" / "pairs.jsonl.gz"
    if not path.is_file():
        raise DataError(
            "DDTP pairs not found (the tiny preset trains its tokenizer on them when no train_texts are "
            "given); set HBT_DATA_DIR or pass train_texts",
            path,
        )
    texts: list[str] = []
    for lineno, rec in itertools.islice(iter_jsonl(path), max_records):
        texts.append(require_text(rec, "query", path, f"line {lineno}"))
        texts.append(require_text(rec, "passage", path, f"line {lineno}"))
    return texts


def _tiny_normalizer() -> normalizers.BertNormalizer:
    from tokenizers import normalizers

    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True
    )


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A WordPiece ``tokenizers.Tokenizer`` whose vocabulary is a pure function of ``texts``.

    (The ``tokenizers`` trainers break ties in hash-map order, so two workers would get different
    vocabularies.) Vocabulary: specials, every character (word-initial and ``##`` form, most frequent
    first), then the pieces that save the most characters: frequent whole words, word prefixes and
    ``##`` suffixes of 2-8 characters; ties broken by the piece itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    normalizer = _tiny_normalizer()
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars: Counter[str] = Counter()
    pieces: Counter[str] = Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
        if len(word) > 1:
            pieces[word] += n * (len(word) - 1)
        for k in range(2, min(len(word) - 1, 8) + 1):
            pieces[word[:k]] += n * (k - 1)
            pieces["##" + word[-k:]] += n * (k - 1)
    vocab: dict[str, int] = {}
    for tok in TINY_SPECIALS:
        vocab[tok] = len(vocab)
    char_budget = max(0, (vocab_size - len(vocab)) // 2)
    for ch, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[: char_budget // 2]:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault("##" + ch, len(vocab))
    for piece, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename: workers sharing a cache dir never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def tiny_tokenizer(cfg: ModelConfig, train_texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """The tiny preset's tokenizer (a ``PreTrainedTokenizerFast``), cached by a hash of its inputs."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    texts = list(train_texts) if train_texts is not None else ddtp_sample_texts(cfg.tiny_sample_records)
    if not texts:
        raise ValueError("tiny tokenizer: train_texts is empty")
    digest = hashlib.sha256(f"v{_TINY_TOKENIZER_VERSION}|{cfg.tiny_vocab_size}|{len(texts)}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    path = cache_root(cfg) / "tiny_tokenizer" / f"{digest.hexdigest()[:24]}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = build_tiny_tokenizer(texts, cfg.tiny_vocab_size)
        _atomic_write_text(path, tok.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max(cfg.query_max_len, cfg.passage_max_len),
    )


def tiny_backbone(cfg: ModelConfig, vocab_size: int) -> BertModel:
    """Random-init BertModel; the same ``cfg.seed`` gives the same weights in every process."""
    from transformers import BertConfig, BertModel

    bert_cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny_hidden_size,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        intermediate_size=cfg.tiny_intermediate_size,
        max_position_embeddings=max(512, cfg.query_max_len, cfg.passage_max_len),
        pad_token_id=0,
    )
    # fork_rng: building the model must not move the caller's torch RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return BertModel(bert_cfg, add_pooling_layer=False)
