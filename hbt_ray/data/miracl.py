"""MIRACL layout → monolingual eval sets and training pairs (qrels negatives as hard negatives).

The release layout, under one root (``miracl/miracl`` + ``miracl/miracl-corpus`` on the HF hub)::

    ROOT/miracl-v1.0-<lang>/topics/topics.miracl-v1.0-<lang>-<split>.tsv   qid<TAB>query
    ROOT/miracl-v1.0-<lang>/qrels/qrels.miracl-v1.0-<lang>-<split>.tsv     qid Q0 docid rel
    ROOT/miracl-corpus-v1.0-<lang>/docs-*.jsonl(.gz)                        {"docid", "title", "text"}

Ids are prefixed with the language: query ``"sw:3"``, candidate ``"sw:1#0"``; a query's paragraph
(the unit :meth:`EvalSet.subset` keeps whole) is its qid, and a judged document belongs to the
paragraph of the first topic that judged it.

    >>> from pathlib import Path
    >>> s = read_miracl_eval(Path(__file__).parents[2] / "tests" / "fixtures" / "miracl", langs=["sw"])
    >>> s.counts()
    {'sw': (3, 10)}
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hbt_ray.data.files import decode_utf8, iter_jsonl, iter_lines, require, require_text
from hbt_ray.data.records import (
    BadRecords,
    Candidate,
    DataError,
    EvalQuery,
    EvalSet,
    Pair,
    PairGroup,
    check_lang,
)


@dataclass
class MiraclLang:
    """One language of one split, as read: topics, qrels (in file order) and the corpus."""

    lang: str
    topics: dict[str, str] = field(default_factory=dict)  # qid -> query
    qrels: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # qid -> [(docid, rel)]
    corpus: dict[str, str] = field(default_factory=dict)  # docid -> "title text"
    files: dict[str, str] = field(default_factory=dict)


def miracl_langs(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DataError("no such directory (MIRACL root with miracl-v1.0-<lang>/ folders)", root)
    langs = sorted(p.name.removeprefix("miracl-v1.0-") for p in root.glob("miracl-v1.0-*") if p.is_dir())
    if not langs:
        raise DataError("no miracl-v1.0-<lang>/ folders here", root)
    return [check_lang(lang, root, "folder name") for lang in langs]


def read_miracl_lang(
    root: str | os.PathLike, lang: str, split: str, bad: BadRecords | None = None
) -> MiraclLang:
    """Read topics, qrels and corpus of ``lang``/``split``; qrels naming an unknown topic or a docid
    absent from the corpus raise DataError (or are skipped into ``bad``)."""
    root = Path(root)
    bad = bad or BadRecords()
    check_lang(lang, root, "lang")
    out = MiraclLang(lang)
    base = root / f"miracl-v1.0-{lang}"
    topics_file = base / "topics" / f"topics.miracl-v1.0-{lang}-{split}.tsv"
    qrels_file = base / "qrels" / f"qrels.miracl-v1.0-{lang}-{split}.tsv"
    corpus_dir = root / f"miracl-corpus-v1.0-{lang}"
    corpus_files = sorted(p for p in corpus_dir.glob("*.jsonl*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not corpus_files:
        raise DataError("no corpus shards (*.jsonl / *.jsonl.gz)", corpus_dir)
    out.files = {"topics": str(topics_file), "qrels": str(qrels_file), "corpus": str(corpus_dir)}

    for cfile in corpus_files:
        for lineno, rec in iter_jsonl(cfile, bad=bad, desc=f"miracl {lang} corpus"):
            where = f"line {lineno}"
            try:
                docid = str(require(rec, "docid", cfile, where, (str, int)))
                where = f"line {lineno} docid={docid}"
                title = require(rec, "title", cfile, where, str)
                text = require_text(rec, "text", cfile, where)
                full = f"{title.strip()} {text.strip()}".strip()
                if docid in out.corpus:
                    if out.corpus[docid] != full:
                        raise DataError(
                            f"duplicate docid {docid!r} with conflicting text",
                            cfile,
                            where,
                            reason="duplicate_conflict",
                        )
                    continue
            except DataError as err:
                bad.handle(err)
                continue
            out.corpus[docid] = full

    for lineno, raw in iter_lines(topics_file):
        where = f"line {lineno}"
        try:
            line = decode_utf8(raw, topics_file, where)
            if not line.strip():
                continue
            if "\t" not in line:
                raise DataError("expected qid<TAB>query", topics_file, where, reason="missing_field")
            qid, query = line.split("\t", 1)
            qid = qid.strip()
            where = f"line {lineno} qid={qid}"
            if not qid or not query.strip():
                raise DataError("empty qid or query", topics_file, where, reason="empty_text")
            if qid in out.topics and out.topics[qid] != query:
                raise DataError(
                    f"duplicate qid {qid!r} with conflicting text",
                    topics_file,
                    where,
                    reason="duplicate_conflict",
                )
        except DataError as err:
            bad.handle(err)
            continue
        out.topics[qid] = query

    for lineno, raw in iter_lines(qrels_file):
        where = f"line {lineno}"
        try:
            line = decode_utf8(raw, qrels_file, where)
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 4:
                raise DataError(
                    f"expected 4 fields 'qid Q0 docid rel', got {len(parts)}",
                    qrels_file,
                    where,
                    reason="missing_field",
                )
            qid, _, docid, rel_text = parts
            where = f"line {lineno} qid={qid} docid={docid}"
            try:
                rel = int(rel_text)
            except ValueError:
                raise DataError(
                    f"relevance {rel_text!r} is not an int", qrels_file, where, reason="wrong_type"
                ) from None
            if qid not in out.topics:
                raise DataError(
                    "qrels names a qid absent from the topics", qrels_file, where, reason="qid_absent"
                )
            if docid not in out.corpus:
                raise DataError(
                    "qrels names a docid absent from the corpus", qrels_file, where, reason="docid_absent"
                )
            judged = out.qrels.setdefault(qid, [])
            old = [r for d, r in judged if d == docid]
            if old and old[0] != rel:
                raise DataError(
                    f"duplicate judgement with conflicting relevance ({old[0]} vs {rel})",
                    qrels_file,
                    where,
                    reason="duplicate_conflict",
                )
            if old:
                continue
        except DataError as err:
            bad.handle(err)
            continue
        judged.append((docid, rel))
    return out


def _load(
    path: str | os.PathLike | None, langs: Sequence[str] | None, split: str, bad: BadRecords | None
) -> list[MiraclLang]:
    if path is None:
        if not langs:
            raise ValueError("MIRACL from the HF hub needs langs=[...]")
        return [load_miracl_hf(lang, split) for lang in langs]
    available = miracl_langs(path)
    if langs is None:  # every language that has this split
        root = Path(path)
        chosen = [
            lang
            for lang in available
            if (root / f"miracl-v1.0-{lang}" / "topics" / f"topics.miracl-v1.0-{lang}-{split}.tsv").exists()
        ]
        if not chosen:
            raise DataError(
                f"no language has a {split!r} split (topics.miracl-v1.0-<lang>-{split}.tsv)", path
            )
    else:
        chosen = list(langs)
    missing = [lang for lang in chosen if lang not in available]
    if missing:
        raise DataError(f"no MIRACL language(s) {missing} (has {available})", path)
    return [read_miracl_lang(path, lang, split, bad) for lang in chosen]


#: MIRACL languages with little pretraining and training data (Swahili, Yoruba, Telugu, Bengali): the
#: evaluation averages them apart (``mono_low_resource_*``).
LOW_RESOURCE = ("bn", "sw", "te", "yo")


def read_miracl_eval(
    path: str | os.PathLike | None,
    langs: Sequence[str] | None = None,
    split: str = "dev",
    bad: BadRecords | None = None,
    pool: str = "corpus",
) -> EvalSet:
    """Monolingual eval set per language: queries = topics with >= 1 relevant document, candidates =
    the whole corpus (``pool="judged"``: only the passages judged for some topic of the split).
    ``meta["low_resource"]`` lists :data:`LOW_RESOURCE`. ``path=None`` reads the HF hub (network)::

        >>> root = Path(__file__).parents[2] / "tests" / "fixtures" / "miracl"
        >>> read_miracl_eval(root, langs=["sw"], pool="judged").counts()
        {'sw': (3, 9)}
    """
    if pool not in ("corpus", "judged"):
        raise ValueError(f"pool: {pool!r} is not 'corpus' or 'judged'")
    queries: dict[str, list[EvalQuery]] = {}
    candidates: dict[str, list[Candidate]] = {}
    no_relevant = {}
    for m in _load(path, langs, split, bad):
        lang = m.lang
        first_judge: dict[str, str] = {}
        queries[lang] = []
        for qid, query in m.topics.items():
            judged = m.qrels.get(qid, [])
            for docid, _ in judged:
                first_judge.setdefault(docid, qid)
            relevant = tuple(f"{lang}:{d}" for d, rel in judged if rel > 0)
            if relevant:
                queries[lang].append(
                    EvalQuery(f"{lang}:{qid}", query, f"{lang}:{qid}", relevant, f"{lang}:{qid}")
                )
        no_relevant[lang] = len(m.topics) - len(queries[lang])
        candidates[lang] = [
            Candidate(f"{lang}:{d}", text, f"{lang}:{first_judge[d]}" if d in first_judge else "")
            for d, text in m.corpus.items()
            if pool == "corpus" or d in first_judge
        ]
    meta = {"source": str(path) if path is not None else "hf:miracl/miracl", "split": split, "pool": pool,
            "low_resource": list(LOW_RESOURCE)}  # fmt: skip
    meta["topics_without_relevant"] = no_relevant
    return EvalSet(f"miracl-{split}", queries, candidates, meta)


def read_miracl_pairs(
    path: str | os.PathLike | None,
    langs: Sequence[str] | None = None,
    split: str = "train",
    bad: BadRecords | None = None,
) -> Iterator[PairGroup]:
    """One-language PairGroup per topic with a relevant document: passage = its first relevant
    document (qrels order), negatives = its judged non-relevant documents (rel = 0)."""
    for m in _load(path, langs, split, bad):
        for qid, query in m.topics.items():
            judged = m.qrels.get(qid, [])
            positives = [d for d, rel in judged if rel > 0]
            if not positives:
                continue
            negatives = tuple(m.corpus[d] for d, rel in judged if rel <= 0)
            pair = Pair(query, m.corpus[positives[0]], negatives)
            yield PairGroup(f"miracl-{m.lang}:{qid}", "miracl", {m.lang: pair})


def load_miracl_hf(lang: str, split: str) -> MiraclLang:  # pragma: no cover - needs the network
    """MIRACL from the HF hub (``miracl/miracl``): topics and qrels from its judged passages; the
    candidate pool is the union of judged passages (the full corpus is ``miracl/miracl-corpus``,
    tens of millions of passages for some languages: download it in the layout above instead)."""
    import datasets

    ds = datasets.load_dataset("miracl/miracl", lang, split=split, trust_remote_code=True)
    out = MiraclLang(lang, files={"hf": f"miracl/miracl:{lang}:{split}"})
    for rec in ds:
        qid = str(rec["query_id"])
        out.topics[qid] = rec["query"]
        judged = out.qrels.setdefault(qid, [])
        for rel, key in ((1, "positive_passages"), (0, "negative_passages")):
            for p in rec[key]:
                out.corpus.setdefault(p["docid"], f"{p['title'].strip()} {p['text'].strip()}".strip())
                judged.append((p["docid"], rel))
    return out
