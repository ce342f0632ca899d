"""The records every stage consumes: pair groups (training) and eval sets (evaluation).

A **pair group** is one item in several languages: per language a (query, passage) pair, optional
hard negatives. Parallel copies of one item must never meet in one batch (they would be false
negatives), so a group is the unit the sampler draws::

    >>> g = PairGroup("g1", "demo", {"en": Pair("cat", "A cat is an animal."),
    ...                              "de": Pair("Katze", "Eine Katze ist ein Tier.")})
    >>> g.langs
    ['de', 'en']

An **eval set** holds, per language, the queries and candidates; each query names its relevant
candidates (in its own language) and a ``link`` id shared by the parallel queries of other languages.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

#: Language codes: ISO 639-1/-3 lower case, optional region/script subtag (``pt-br``, ``zh-tw``).
LANG_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$")


class DataError(ValueError):
    """Bad input data. The message names the file and the record."""

    def __init__(
        self,
        message: str,
        path: str | os.PathLike | None = None,
        record: object = None,
        reason: str = "bad_record",
    ):
        where = str(path) if path is not None else "<data>"
        if record is not None:
            where += f" [{record}]"
        super().__init__(f"{where}: {message}")
        self.message = message
        self.path = str(path) if path is not None else None
        self.record = record
        self.reason = reason  # short tag counted by BadRecords (e.g. "missing_field", "empty_text")

    def __reduce__(self) -> tuple:
        # Raised in a Ray worker, it is pickled to the driver: rebuilt from its parts, not from the joined
        # message (which would read "<data>: <path>: ...").
        return (type(self), (self.message, self.path, self.record, self.reason))


def check_lang(lang: object, path: str | os.PathLike | None = None, record: object = None) -> str:
    if not isinstance(lang, str) or not LANG_RE.match(lang):
        raise DataError(f"invalid language code {lang!r}", path, record, reason="invalid_lang")
    return lang


class BadRecords:
    """What a reader does with a bad record: raise its DataError (default) or skip it and count it.

    Readers call ``bad.handle(err)`` for every record-level problem; with ``skip=False`` that raises
    ``err``, with ``skip=True`` it counts ``err.reason`` (kept in the shard manifest) and the reader
    drops the record::

        >>> bad = BadRecords(skip=True)
        >>> bad.handle(DataError("empty text", "f.jsonl", "line 3", reason="empty_text"))
        >>> dict(bad.counts), bad.examples
        ({'empty_text': 1}, ['f.jsonl [line 3]: empty text'])
    """

    def __init__(self, skip: bool = False, max_examples: int = 20):
        self.skip = skip
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []
        self.max_examples = max_examples

    def handle(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.counts[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Pair:
    query: str
    passage: str
    negatives: tuple[str, ...] = ()


@dataclass
class PairGroup:
    group_id: str
    source: str
    pairs: dict[str, Pair]

    @property
    def langs(self) -> list[str]:
        return sorted(self.pairs)

    def to_row(self) -> dict:
        langs = self.langs
        return {
            "group_id": self.group_id,
            "source": self.source,
            "langs": langs,
            "queries": [self.pairs[lang].query for lang in langs],
            "passages": [self.pairs[lang].passage for lang in langs],
            "negatives": [list(self.pairs[lang].negatives) for lang in langs],
        }

    @classmethod
    def from_row(cls, row: dict) -> PairGroup:
        negatives = row.get("negatives")
        if negatives is None:
            negatives = [[] for _ in row["langs"]]
        pairs = {
            lang: Pair(q, p, tuple(n or ()))
            for lang, q, p, n in zip(row["langs"], row["queries"], row["passages"], negatives)
        }
        return cls(str(row["group_id"]), str(row["source"]), pairs)


#: One row per pair group. Lists are aligned: ``langs[i]`` ↔ ``queries[i]`` ↔ ``passages[i]``.
PAIR_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("langs", pa.list_(pa.string()), nullable=False),
        pa.field("queries", pa.list_(pa.string()), nullable=False),
        pa.field("passages", pa.list_(pa.string()), nullable=False),
        pa.field("negatives", pa.list_(pa.list_(pa.string())), nullable=False),
    ]
)


@dataclass(frozen=True)
class EvalQuery:
    qid: str  # unique within its language
    text: str
    link: str  # shared by the parallel queries of all languages
    relevant: tuple[str, ...]  # candidate ids (same language) that answer it
    paragraph: str = ""  # the unit subsets keep whole (LAReQA paragraph, MIRACL topic)


@dataclass(frozen=True)
class Candidate:
    cid: str  # unique within its language
    text: str
    paragraph: str = ""


@dataclass
class EvalSet:
    """Queries and candidates per language.

    ``link`` ties parallel queries; in the *multi* setting a query's relevant candidates are the
    relevant candidates of every query that shares its link, in every language.
    """

    name: str
    queries: dict[str, list[EvalQuery]]
    candidates: dict[str, list[Candidate]]
    meta: dict = field(default_factory=dict)

    @property
    def langs(self) -> list[str]:
        return sorted(self.queries)

    def counts(self) -> dict[str, tuple[int, int]]:
        return {lang: (len(self.queries[lang]), len(self.candidates.get(lang, []))) for lang in self.langs}

    def select_langs(self, langs: Iterable[str]) -> EvalSet:
        langs = list(langs)
        missing = [lang for lang in langs if lang not in self.queries]
        if missing:
            raise KeyError(f"{self.name}: no language {missing} (has {self.langs})")
        return EvalSet(
            self.name,
            {lang: self.queries[lang] for lang in langs},
            {lang: self.candidates[lang] for lang in langs},
            dict(self.meta),
        )

    def subset(self, max_paragraphs: int, seed: int | None = None, skip: int = 0) -> EvalSet:
        """Keep ``max_paragraphs`` whole *parallel paragraphs*, with all their queries and candidates.

        A parallel paragraph is a connected unit: the paragraphs (per language) whose queries share a
        ``link``, plus the paragraphs of their relevant candidates. Every kept query therefore keeps
        its relevant candidates and its parallel queries (with theirs) in every language. Candidates
        that belong to no query's unit (e.g. unjudged corpus documents) are dropped. ``seed=None``
        keeps the first units in file order; a seed draws a random (reproducible) sample. ``skip`` first
        drops that many units in file order: ``subset(30, skip=30)`` is a split disjoint from ``subset(30)``
        (a dev pool to choose a recipe on, the first one to report it on).

            >>> s = EvalSet("t", {"en": [EvalQuery("en:1", "q", "1", ("en:a",), "en:p1"),
            ...                          EvalQuery("en:2", "q", "2", ("en:b",), "en:p2")]},
            ...             {"en": [Candidate("en:a", "a", "en:p1"), Candidate("en:b", "b", "en:p2")]})
            >>> s.subset(1).counts(), [q.qid for q in s.subset(1, skip=1).queries["en"]]
            ({'en': (1, 1)}, ['en:2'])
        """
        if max_paragraphs < 1:
            raise ValueError(f"{self.name}: max_paragraphs must be >= 1, got {max_paragraphs}")
        parent: dict[tuple[str, str], tuple[str, str]] = {}

        def find(node: tuple[str, str]) -> tuple[str, str]:
            parent.setdefault(node, node)
            root = node
            while parent[root] != root:
                root = parent[root]
            while parent[node] != root:  # path compression
                parent[node], node = root, parent[node]
            return root

        def union(a: tuple[str, str], b: tuple[str, str]) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra

        # A unit node is (lang, paragraph); a paragraph-less record is its own unit.
        def query_node(lang: str, q: EvalQuery) -> tuple[str, str]:
            return (lang, q.paragraph or f"query:{q.qid}")

        def cand_node(lang: str, c: Candidate) -> tuple[str, str]:
            return (lang, c.paragraph or f"cand:{c.cid}")

        cand_nodes = {
            lang: {c.cid: cand_node(lang, c) for c in self.candidates.get(lang, [])} for lang in self.langs
        }
        first_by_link: dict[str, tuple[str, str]] = {}
        order: list[tuple[str, str]] = []  # query units in file order (languages sorted)
        for lang in self.langs:
            for q in self.queries[lang]:
                node = query_node(lang, q)
                if node not in parent:
                    order.append(node)
                find(node)
                if q.link in first_by_link:
                    union(first_by_link[q.link], node)
                else:
                    first_by_link[q.link] = node
                for cid in q.relevant:
                    if cid in cand_nodes[lang]:
                        union(node, cand_nodes[lang][cid])
        roots: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for node in order:
            root = find(node)
            if root not in seen:
                seen.add(root)
                roots.append(root)
        if skip < 0:
            raise ValueError(f"{self.name}: skip must be >= 0, got {skip}")
        roots = roots[skip:]
        if seed is not None and len(roots) > max_paragraphs:
            keep = set(random.Random(seed).sample(roots, max_paragraphs))
        else:
            keep = set(roots[:max_paragraphs])
        queries = {
            lang: [q for q in self.queries[lang] if find(query_node(lang, q)) in keep] for lang in self.langs
        }
        candidates = {
            lang: [
                c
                for c in self.candidates.get(lang, [])
                if cand_nodes[lang][c.cid] in parent and find(cand_nodes[lang][c.cid]) in keep
            ]
            for lang in self.langs
        }
        meta = dict(self.meta)
        meta["subset"] = {"max_paragraphs": max_paragraphs, "seed": seed, "skip": skip, "units": len(keep)}
        return EvalSet(self.name, queries, candidates, meta)


#: The groups of a bitext set's languages (Tatoeba's ``langs.tsv``: ``in_xlmr`` yes / no).
BITEXT_GROUPS = ("inside_xlmr", "outside_xlmr")


@dataclass
class BitextSet:
    """Sentences aligned with English, per language: ``sentences[lang][i]`` translates ``english[lang][i]``
    (the English side differs from language to language). ``groups`` maps a language to one of
    :data:`BITEXT_GROUPS`; a language no list places is in no group (only in the overall average).

        >>> b = BitextSet("demo", {"deu": ["Hallo.", "Danke."]}, {"deu": ["Hello.", "Thanks."]},
        ...               {"deu": "inside_xlmr"})
        >>> b.counts(), b.head(1).english
        ({'deu': 2}, {'deu': ['Hello.']})
    """

    name: str
    sentences: dict[str, list[str]]
    english: dict[str, list[str]]
    groups: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def langs(self) -> list[str]:
        return sorted(self.sentences)

    def counts(self) -> dict[str, int]:
        return {lang: len(self.sentences[lang]) for lang in self.langs}

    def group_langs(self, group: str) -> list[str]:
        return [lang for lang in self.langs if self.groups.get(lang) == group]

    def select_langs(self, langs: Iterable[str]) -> BitextSet:
        langs = list(langs)
        missing = [lang for lang in langs if lang not in self.sentences]
        if missing:
            raise KeyError(f"{self.name}: no language {missing} (has {self.langs})")
        return BitextSet(
            self.name,
            {lang: self.sentences[lang] for lang in langs},
            {lang: self.english[lang] for lang in langs},
            {lang: g for lang, g in self.groups.items() if lang in langs},
            dict(self.meta),
        )

    def head(self, max_pairs: int | None, skip: int = 0) -> BitextSet:
        """The first ``max_pairs`` pairs of every language after its first ``skip`` (file order, as LASER
        and MTEB read them); ``max_pairs`` None: all after ``skip``. A language left with none is an error.

        >>> s = BitextSet("t", {"deu": ["a", "b", "c"]}, {"deu": ["A", "B", "C"]}, {}, {})
        >>> s.head(1, skip=1).sentences, s.head(None, skip=2).english
        ({'deu': ['b']}, {'deu': ['C']})
        """
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"{self.name}: max_pairs must be >= 1, got {max_pairs}")
        end = None if max_pairs is None else skip + max_pairs
        empty = [lang for lang, s in self.sentences.items() if len(s) <= skip]
        if empty:
            raise ValueError(f"{self.name}: skip_pairs {skip} leaves no pairs in {empty}")
        meta = dict(self.meta)
        meta["max_pairs"], meta["skip_pairs"] = max_pairs, skip
        return BitextSet(
            self.name,
            {lang: s[skip:end] for lang, s in self.sentences.items()},
            {lang: e[skip:end] for lang, e in self.english.items()},
            dict(self.groups),
            meta,
        )


def data_dir() -> Path:
    """Where the shared real data lives: ``$HBT_DATA_DIR``, else ``../shared/data`` next to the repo."""
    env = os.environ.get("HBT_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in [Path.cwd(), *here.parents]:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"
