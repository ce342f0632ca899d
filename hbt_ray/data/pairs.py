"""Generic pairs files → PairGroups: JSONL(.gz) or Parquet, one record per (group, language).

Record fields: ``group_id``, ``lang``, ``query``, ``passage``, optional ``negatives`` (list of str)
and ``source``; other fields (e.g. DDTP's ``package``) are ignored. The records of one group must be
adjacent (as in ``../shared/data/ddtp/pairs.jsonl.gz``), which lets a 120 MB file stream in constant
memory; a group that reappears later raises DataError.

    >>> from hbt_ray.data.records import data_dir
    >>> groups = list(read_pairs(data_dir() / "ddtp" / "pairs.jsonl.gz", limit=3, progress=False))
    >>> len(groups), all("en" in g.pairs and len(g.pairs) > 1 for g in groups)
    (3, True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from hbt_ray.config import bars_off
from hbt_ray.data.files import iter_jsonl, require, require_text
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


def default_source(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return name


def read_pairs(
    path: str | os.PathLike,
    langs: Sequence[str] | None = None,
    limit: int | None = None,
    source: str | None = None,
    bad: BadRecords | None = None,
    progress: bool = True,
) -> Iterator[PairGroup]:
    """Stream PairGroups from a pairs file (``.jsonl``, ``.jsonl.gz`` or ``.parquet``).

    ``langs`` keeps only those languages (groups left empty are dropped); ``limit`` stops after that
    many groups; ``source`` names the groups' source when records have none (default: file stem).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError("is a directory: a pairs source is one .jsonl, .jsonl.gz or .parquet file", path)
    bad = bad or BadRecords()
    source = source or default_source(path)
    if path.suffix == ".parquet":
        records = _iter_parquet(path, progress)
    else:
        records = iter_jsonl(path, bad=bad, progress=progress)
    keep = set(langs) if langs is not None else None
    yield from _group_adjacent(_parse_records(records, path, source, keep, bad), path, limit, bad)


def _iter_parquet(path: Path, progress: bool) -> Iterator[tuple[int, dict]]:
    # pyarrow reports a bad footer (truncated file, not Parquet) as ArrowInvalid and a bad data page
    # (corrupt compressed bytes) as OSError, the latter only when that row group is read.
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError("no such file", path) from None
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a readable Parquet file (truncated or corrupt?): {err}", path) from None
    row = 0
    batches = pf.iter_batches(batch_size=4096)
    with tqdm(
        total=pf.metadata.num_rows, unit="rows", desc=path.name, disable=bars_off(progress), leave=False
    ) as bar:
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"corrupt Parquet data: {err}", path, f"after row {row}") from None
            if batch is None:
                return
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
            bar.update(batch.num_rows)


def _parse_records(
    records: Iterable[tuple[int, dict]], path: Path, source: str, keep: set[str] | None, bad: BadRecords
) -> Iterator[tuple[str, str, str, Pair, str]]:
    """Validated ``(group_id, lang, source, pair, where)``."""
    label = "row" if path.suffix == ".parquet" else "line"
    for n, rec in records:
        where = f"{label} {n}"
        try:
            gid = require(rec, "group_id", path, where, (str, int))
            gid = str(gid)
            if not gid.strip():
                raise DataError("empty text in field 'group_id'", path, where, reason="empty_text")
            where = f"{where} group_id={gid}"
            lang = check_lang(require(rec, "lang", path, where), path, where)
            if keep is not None and lang not in keep:
                continue
            query = require_text(rec, "query", path, where)
            passage = require_text(rec, "passage", path, where)
            negatives = rec.get("negatives") or []
            if not isinstance(negatives, list) or not all(
                isinstance(x, str) and x.strip() for x in negatives
            ):
                raise DataError(
                    "field 'negatives' should be a list of non-empty strings",
                    path,
                    where,
                    reason="wrong_type",
                )
            rec_source = rec.get("source") or source
            if not isinstance(rec_source, str):
                raise DataError("field 'source' should be str", path, where, reason="wrong_type")
        except DataError as err:
            bad.handle(err)
            continue
        yield gid, lang, rec_source, Pair(query, passage, tuple(negatives)), where


def _group_adjacent(
    records: Iterable[tuple[str, str, str, Pair, str]], path: Path, limit: int | None, bad: BadRecords
) -> Iterator[PairGroup]:
    done: set[str] = set()
    current: PairGroup | None = None
    n = 0
    for gid, lang, source, pair, where in records:
        if current is not None and gid != current.group_id:
            done.add(current.group_id)
            yield current
            n += 1
            current = None
            if limit is not None and n >= limit:
                return
        if current is None:
            if gid in done:
                raise DataError(
                    f"records of group {gid!r} are not adjacent (the group appeared earlier in the file); "
                    "sort the file by group_id",
                    path,
                    where,
                    reason="not_adjacent",
                )
            current = PairGroup(gid, source, {})
        old = current.pairs.get(lang)
        if old is not None:
            if old != pair:
                bad.handle(
                    DataError(
                        f"duplicate (group_id, lang) = ({gid}, {lang}) with conflicting text",
                        path,
                        where,
                        reason="duplicate_conflict",
                    )
                )
            continue  # identical repeats add nothing
        current.pairs[lang] = pair
    if current is not None and (limit is None or n < limit):
        yield current


def read_pairs_eval(path: str | os.PathLike, langs: Sequence[str] | None = None, bad: BadRecords | None = None) -> EvalSet:
    """A pairs file as an eval set (``pairs:PATH``): in each language every pair's query retrieves its own
    passage among that language's passages; a group's pairs in other languages are its parallel copies
    (cross and multi settings, language bias). The group is the unit ``max_paragraphs`` keeps whole.

    >>> import json, tempfile
    >>> f = Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> _ = f.write_text("\\n".join(json.dumps({"group_id": g, "lang": l, "query": f"q{g}{l}", "passage": f"p{g}{l}"})
    ...                  for g in "12" for l in ("en", "de")))
    >>> s = read_pairs_eval(f)
    >>> s.counts(), s.queries["de"][0]
    ({'de': (2, 2), 'en': (2, 2)}, EvalQuery(qid='de:1', text='q1de', link='1', relevant=('de:1',), paragraph='de:1'))
    """
    queries: dict[str, list[EvalQuery]] = {}
    candidates: dict[str, list[Candidate]] = {}
    for group in read_pairs(path, langs=langs, bad=bad, progress=False):
        for lang, pair in group.pairs.items():
            key = f"{lang}:{group.group_id}"
            queries.setdefault(lang, []).append(EvalQuery(key, pair.query, group.group_id, (key,), key))
            candidates.setdefault(lang, []).append(Candidate(key, pair.passage, key))
    if not queries:
        raise DataError("no pairs" + (f" in languages {list(langs)}" if langs else ""), Path(path))
    return EvalSet(Path(path).name, queries, candidates)
