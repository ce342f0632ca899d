"""Pair shards: PairGroups as Parquet files with :data:`PAIR_SCHEMA` (one row per group) + ``manifest.json``.

    >>> import tempfile
    >>> from hbt_ray.data.records import Pair, PairGroup
    >>> out = tempfile.mkdtemp()
    >>> groups = [PairGroup(f"g{i}", "demo", {"en": Pair("q", "p"), "de": Pair("f", "t")}) for i in range(5)]
    >>> m = write_shards(groups, out, rows_per_shard=2, progress=False)
    >>> m.groups, len(m.shards), m.pairs_per_lang, m.langs_per_group
    (5, 3, {'de': 5, 'en': 5}, {'2': 5})
    >>> [g.group_id for g in iter_shard_groups(out)]
    ['g0', 'g1', 'g2', 'g3', 'g4']

``read_shards(out)`` gives the same rows as a ``ray.data.Dataset``; ``rows_to_groups`` turns rows or
batches of it back into PairGroups.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from hbt_ray import storage
from hbt_ray.config import bars_off
from hbt_ray.data.records import PAIR_SCHEMA, DataError, PairGroup, check_lang

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.parquet"


@dataclass
class Manifest:
    """What a shard directory holds. ``langs_per_group`` maps "number of languages" → groups."""

    groups: int = 0
    pairs: int = 0
    pairs_per_lang: dict[str, int] = field(default_factory=dict)
    langs_per_group: dict[str, int] = field(default_factory=dict)
    groups_per_source: dict[str, int] = field(default_factory=dict)
    pairs_per_source_lang: dict[str, dict[str, int]] = field(default_factory=dict)  # source → lang → pairs
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"file": name, "rows": n}
    skipped: dict[str, int] = field(default_factory=dict)  # reason → records skipped (--skip-bad)
    skipped_examples: list[str] = field(default_factory=list)
    rows_per_shard: int = 0
    source: str = ""
    #: what built the shards (sources, their files' sizes and times, languages, limits, reader options):
    #: shards are reused only for the same fingerprint
    fingerprint: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=False)

    def summary_table(self) -> str:
        """A plain-text table: pairs per language, then the languages-per-group histogram."""
        lines = [f"{self.groups} groups, {self.pairs} pairs, {len(self.shards)} shards ({self.source})"]
        lines.append(f"{'lang':<8}{'pairs':>10}")
        for lang, n in sorted(self.pairs_per_lang.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"{lang:<8}{n:>10}")
        lines.append(f"{'langs/group':<12}{'groups':>10}")
        for k, n in sorted(self.langs_per_group.items(), key=lambda kv: int(kv[0])):
            lines.append(f"{k:<12}{n:>10}")
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items())))
        return "\n".join(lines)


def groups_to_table(groups: list[PairGroup]) -> pa.Table:
    return pa.Table.from_pylist([g.to_row() for g in groups], schema=PAIR_SCHEMA)


#: Groups :func:`interleave` holds to shuffle: data up to this size is shuffled as a whole.
SHUFFLE_BUFFER = 1_000_000


def interleave(groups: Iterable[PairGroup], seed: int = 0, buffer_size: int = SHUFFLE_BUFFER) -> Iterator[PairGroup]:
    """``groups`` in a seeded random order, so that shards written from several sources (read one after
    the other) each hold all of them, and every rank's part of the shards holds each source and language
    in its share. A full shuffle up to ``buffer_size`` groups, a buffered one beyond::

        >>> [g.group_id for g in interleave([PairGroup(str(i), "s", {}) for i in range(6)], seed=1)]
        ['4', '0', '2', '1', '5', '3']
    """
    rng = np.random.default_rng(seed)
    buffer: list[PairGroup] = []
    for group in groups:
        if len(buffer) < buffer_size:
            buffer.append(group)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = group
    for i in rng.permutation(len(buffer)).tolist():
        yield buffer[i]


def write_shards(
    groups: Iterable[PairGroup],
    out_dir: str | os.PathLike,
    rows_per_shard: int = 10_000,
    skipped: Mapping[str, int] | None = None,
    skipped_examples: list[str] | None = None,
    source: str = "",
    overwrite: bool = False,
    progress: bool = True,
    max_bad_fraction: float | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write groups to ``out_dir/shard-NNNNN.parquet`` (``rows_per_shard`` groups each) + ``manifest.json``.

    All or nothing: the shards are written into a hidden sibling folder and moved into place only when
    complete, so a bad input (or a crash) leaves ``out_dir`` as it was — with ``overwrite``, the old
    shards too. An existing shard directory is refused unless ``overwrite``.

    ``skipped`` may be a live counter (``BadRecords.counts``): it is read after the last group, so
    records a lazy reader skips while being consumed are counted; with ``max_bad_fraction`` more than
    that share of skipped records (skipped / (skipped + groups)) fails. Duplicate group ids, groups
    without pairs, invalid language codes and an input with no group at all raise DataError.
    ``fingerprint`` (what built the shards) is kept in the manifest.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError("exists and is not a directory; give a new or shard directory", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _writing(out):
        return _write_shards(groups, out, rows_per_shard, skipped, skipped_examples, source, overwrite, progress,
                             max_bad_fraction, fingerprint)  # fmt: skip


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Held while shards are written into ``out``: a second writer (two ``prepare`` runs with one
    ``--out``) is refused instead of replacing the first's shards when both finish. An OS lock, so a
    crashed writer leaves none behind."""
    import fcntl

    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError("another process is writing shards into it (two prepare runs with one --out?): "
                            "wait for it, or choose another directory", out) from None  # fmt: skip
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a lock file the last holder removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _write_shards(
    groups: Iterable[PairGroup], out: Path, rows_per_shard: int, skipped: Mapping[str, int] | None,
    skipped_examples: list[str] | None, source: str, overwrite: bool, progress: bool,
    max_bad_fraction: float | None, fingerprint: Mapping[str, Any] | None,
) -> Manifest:  # fmt: skip
    old = sorted(out.glob("shard-*.parquet")) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
    if old and not overwrite:
        raise DataError(
            f"already holds shards ({len(old)} files): delete it or choose another directory "
            "(python -m hbt_ray.data prepare: --overwrite)",
            out,
        )
    others = sorted(p.name for p in out.iterdir() if p not in old) if out.is_dir() else []
    if others:  # the folder is replaced as a whole when the new shards are complete
        raise DataError(f"holds other files than shards ({', '.join(others[:3])}); give a new or shard directory", out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _write_into(staging, out, groups, rows_per_shard, source, progress)
        manifest.skipped = dict(sorted((skipped or {}).items()))
        manifest.skipped_examples = list(skipped_examples or [])
        manifest.fingerprint = dict(fingerprint or {})
        _check_result(manifest, out, max_bad_fraction)
        (staging / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_into(
    staging: Path, out: Path, groups: Iterable[PairGroup], rows_per_shard: int, source: str, progress: bool
) -> Manifest:
    manifest = Manifest(rows_per_shard=rows_per_shard, source=source)
    pairs_per_lang: Counter[str] = Counter()
    langs_per_group: Counter[int] = Counter()
    per_source: Counter[str] = Counter()
    per_source_lang: dict[str, Counter[str]] = {}
    seen: set[str] = set()
    buffer: list[PairGroup] = []

    def flush() -> None:
        name = SHARD_PATTERN.format(len(manifest.shards))
        pq.write_table(groups_to_table(buffer), staging / name, compression="zstd")
        footer = footer_digest(pq.read_metadata(staging / name))
        manifest.shards.append({"file": name, "rows": len(buffer), "footer": footer})
        buffer.clear()

    bar = tqdm(desc=f"write {out.name}", unit="groups", disable=bars_off(progress), leave=False)
    try:  # closed on error too: a bar left open shares its line with the error message
        for group in groups:
            if group.group_id in seen:
                raise DataError("duplicate group id in the input stream", out, f"group {group.group_id}")
            if not group.pairs:
                raise DataError("group has no pairs", out, f"group {group.group_id}")
            seen.add(group.group_id)
            for lang in group.pairs:
                check_lang(lang, out, f"group {group.group_id}")
                pairs_per_lang[lang] += 1
            langs_per_group[len(group.pairs)] += 1
            per_source[group.source] += 1
            per_source_lang.setdefault(group.source, Counter()).update(group.pairs.keys())
            buffer.append(group)
            bar.update(1)
            if len(buffer) >= rows_per_shard:
                flush()
        if buffer:
            flush()
    finally:
        bar.close()
    manifest.groups = len(seen)
    manifest.pairs = sum(pairs_per_lang.values())
    manifest.pairs_per_lang = dict(sorted(pairs_per_lang.items()))
    manifest.langs_per_group = {str(k): v for k, v in sorted(langs_per_group.items())}
    manifest.groups_per_source = dict(sorted(per_source.items()))
    manifest.pairs_per_source_lang = {src: dict(sorted(c.items())) for src, c in sorted(per_source_lang.items())}
    return manifest


def _check_result(manifest: Manifest, out: Path, max_bad_fraction: float | None) -> None:
    skipped = sum(manifest.skipped.values())
    if manifest.groups == 0:
        why = f"all {skipped} records were skipped as bad" if skipped else "empty input, or no record in --langs"
        raise DataError(f"no pair group to write ({why})", out)
    share = skipped / (skipped + manifest.groups)
    if max_bad_fraction is not None and share > max_bad_fraction:
        first = manifest.skipped_examples[0] if manifest.skipped_examples else ""
        raise DataError(
            f"{skipped} bad records skipped, {share:.1%} of the input, more than --max-bad-fraction "
            f"{max_bad_fraction:g} (first: {first})",
            out,
        )


def _publish(staging: Path, out: Path) -> None:
    """Move the complete ``staging`` folder to ``out``; an old ``out`` is moved aside first and deleted
    only once the new one is in place."""
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        out.rename(aside)
    try:
        staging.rename(out)
    except BaseException:
        if aside is not None:
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def read_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """The manifest of a shard directory: a local path or a storage URI (:mod:`hbt_ray.storage`)."""
    path = storage.join(shard_dir, MANIFEST) if storage.is_uri(shard_dir) else Path(shard_dir) / MANIFEST
    try:
        data = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise DataError(
            "no manifest.json: not a shard directory (write it with write_shards)", path
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"invalid manifest: {err}", path) from None
    known = set(Manifest.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataError(f"unknown manifest key {unknown[0]!r}", path)
    return Manifest(**data)


def shard_paths(shard_dir: str | os.PathLike, validate: bool = True) -> list[Any]:
    """The shard files the manifest lists, each checked against PAIR_SCHEMA (footer only, cheap): Paths
    of a local directory, URIs (str) of a directory in remote storage."""
    manifest = read_manifest(shard_dir)
    if storage.is_uri(shard_dir):
        paths: list[Any] = [storage.join(shard_dir, s["file"]) for s in manifest.shards]
    else:
        paths = [Path(shard_dir) / s["file"] for s in manifest.shards]
    for path, info in zip(paths, manifest.shards):
        if not storage.exists(path):
            raise DataError("shard listed in manifest.json is missing", path)
        if validate:
            check_shard_schema(path, expected_rows=info.get("rows"), expected_footer=info.get("footer"))
    return paths


def footer_digest(meta: Any) -> str:
    """A hash of a Parquet file's footer: its rows and each column chunk's byte sizes and statistics.
    Another file (a shard replaced by hand) gives another one; computing it reads the footer only."""
    parts: list[Any] = [meta.num_rows, meta.num_row_groups]
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            col = group.column(c)
            stats = col.statistics
            parts.append([col.path_in_schema, col.total_compressed_size, col.total_uncompressed_size,
                          str(stats.min) if stats is not None and stats.has_min_max else None,
                          str(stats.max) if stats is not None and stats.has_min_max else None])  # fmt: skip
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _file_and_fs(path: str | os.PathLike) -> tuple[Any, Any]:
    """``(path on its filesystem, pyarrow filesystem or None)`` for pyarrow's Parquet readers."""
    if storage.is_uri(path):
        fs, fs_path = storage.filesystem(path)
        return fs_path, fs
    return path, None


def check_shard_schema(
    path: str | os.PathLike, expected_rows: int | None = None, expected_footer: str | None = None
) -> None:
    try:
        file, fs = _file_and_fs(path)
        meta = pq.read_metadata(file, filesystem=fs)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file: {err}", path) from None
    got = [(f.name, f.type) for f in schema]
    want = [(f.name, f.type) for f in PAIR_SCHEMA]
    if got != want:
        diff = [f"{n}: {t}" for n, t in got if (n, t) not in want] or [
            "columns " + ", ".join(n for n, _ in got)
        ]
        raise DataError(
            f"shard schema does not match PAIR_SCHEMA (unexpected {'; '.join(diff)}; expected "
            f"{', '.join(f'{n}: {t}' for n, t in want)})",
            path,
            reason="wrong_schema",
        )
    if expected_rows is not None and meta.num_rows != expected_rows:
        raise DataError(f"shard has {meta.num_rows} rows, manifest says {expected_rows}", path)
    if expected_footer is not None and footer_digest(meta) != expected_footer:
        raise DataError("shard is not the file its manifest.json was written with (replaced or changed "
                        "since): write the shards again", path, reason="changed")  # fmt: skip


def read_shards(shard_dir: str | os.PathLike, validate: bool = True, **read_parquet_kwargs: Any):
    """The shards as a ``ray.data.Dataset`` (rows = PAIR_SCHEMA dicts), schema-checked first.

    Needs a running Ray (``hbt_ray.cluster.init_ray``) or starts a local one, as ``ray.data`` does.
    """
    paths = shard_paths(shard_dir, validate=validate)
    if not paths:
        raise DataError("manifest lists no shards (empty input?)", Path(shard_dir) / MANIFEST)
    return read_pair_parquet(paths, **read_parquet_kwargs)


def read_pair_parquet(paths: Sequence[str | os.PathLike], datasource_v2: bool = False, **read_parquet_kwargs: Any):
    """``ray.data.read_parquet`` of pair shard files (PAIR_SCHEMA), through Ray Data's V1 Parquet path.

    Ray Data's default path (DataSourceV2) lists the files on a pool of FooterReader actors started
    anew for every read, which costs seconds of CPU per read on a small node and delays the first row
    on a fresh cluster. The sampler reads its shards again every pass, so that cost recurs;
    ``scripts/bench_data.py`` measures both paths side by side.
    The choice is made on this process's current ``DataContext``, so later reads here use it too.
    """
    import ray.data

    ray.data.DataContext.get_current().use_datasource_v2 = datasource_v2
    return ray.data.read_parquet([str(p) for p in paths], schema=PAIR_SCHEMA, **read_parquet_kwargs)


def iter_shard_groups(shard_dir: str | os.PathLike, validate: bool = True) -> Iterator[PairGroup]:
    """The shards as PairGroups, in order, without Ray (pyarrow only)."""
    for path in shard_paths(shard_dir, validate=validate):
        try:
            file, fs = _file_and_fs(path)
            table = pq.read_table(file, schema=PAIR_SCHEMA, filesystem=fs)
        except (pa.ArrowException, OSError) as err:  # a good footer over corrupt data pages
            raise DataError(f"corrupt Parquet data: {err}", path) from None
        yield from rows_to_groups(table)


def rows_to_groups(rows: Any) -> list[PairGroup]:
    """PAIR_SCHEMA rows → PairGroups.

    Accepts what Ray Data hands out: a list of row dicts (``take``, ``iter_rows``), a column batch
    (dict of lists / numpy arrays from ``iter_batches``), a ``pyarrow.Table`` or a pandas DataFrame.
    """
    if isinstance(rows, pa.Table):
        return [PairGroup.from_row(r) for r in rows.to_pylist()]
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas
        rows = rows.to_dict(orient="list")
    if isinstance(rows, Mapping):
        columns = {k: list(v) for k, v in rows.items()}
        n = len(columns["group_id"])
        rows = [{k: columns[k][i] for k in columns} for i in range(n)]
    return [PairGroup.from_row(_plain_row(r)) for r in rows]


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """numpy arrays (Ray's numpy batches) → lists of str."""
    out = {"group_id": str(row["group_id"]), "source": str(row["source"])}
    for key in ("langs", "queries", "passages"):
        out[key] = [str(x) for x in row[key]]
    negatives = row.get("negatives")
    out["negatives"] = (
        None if negatives is None else [[str(x) for x in (n if n is not None else [])] for n in negatives]
    )
    return out
