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
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

#: Language codes: ISO 639-1/-3 lower case, optional region/script subtag (``pt-br``, ``zh-tw``).
LANG_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$")


class DataError(ValueError):
    """Bad input data. The message names the file and the record."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, record: object = None):
        where = str(path) if path is not None else "<data>"
        if record is not None:
            where += f" [{record}]"
        super().__init__(f"{where}: {message}")
        self.path = str(path) if path is not None else None
        self.record = record


def check_lang(lang: object, path: str | os.PathLike | None = None, record: object = None) -> str:
    if not isinstance(lang, str) or not LANG_RE.match(lang):
        raise DataError(f"invalid language code {lang!r}", path, record)
    return lang


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
