"""Reading input files with errors that name the file and the record (line, byte offset).

Every reader goes through these helpers, so truncated or invalid JSON, non-UTF-8 bytes and broken
gzip streams all fail the same way: a :class:`~hbt_ray.data.records.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hbt_ray.config import bars_off
from hbt_ray.data.records import BadRecords, DataError


def decode_utf8(raw: bytes, path: str | os.PathLike, record: object) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})",
            path,
            record,
            reason="non_utf8",
        ) from None


def read_json_file(path: str | os.PathLike) -> Any:
    """One JSON document (``.json`` or ``.json.gz``); bad bytes or syntax → DataError naming the file.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> _ = p.write_text('{"a": ')
    >>> read_json_file(p)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hbt_ray.data.records.DataError: ...x.json [line 1, column 7]: invalid or truncated JSON: Expecting value
    """
    path = Path(path)
    try:
        raw = _read_bytes(path)
    except OSError as err:
        raise _open_error(err, path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})", path, f"line {line}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"invalid or truncated JSON: {err.msg}", path, f"line {err.lineno}, column {err.colno}"
        ) from None
    except RecursionError:
        raise DataError(TOO_DEEP, path, reason="invalid_json") from None


#: json's decoder recurses once per nesting level: a hostile or broken file (``[[[[…``) exhausts
#: Python's stack long before the file's end. No record of ours nests more than a few levels.
TOO_DEEP = "JSON nested too deeply to parse (more levels than Python's recursion limit)"


def _open_error(err: OSError, path: Path) -> DataError:
    """The DataError for a file that cannot be opened: missing, a directory, unreadable."""
    if isinstance(err, FileNotFoundError):
        return DataError("no such file", path)
    if isinstance(err, IsADirectoryError):
        return DataError("is a directory; give the file itself", path)
    return DataError(f"cannot read the file: {err.strerror or err}", path)


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(f"truncated or corrupt gzip file: {err}", path) from None
    return path.read_bytes()


def iter_jsonl(
    path: str | os.PathLike,
    bad: BadRecords | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` of a JSONL(.gz) file, streaming, blank lines ignored.

    Non-UTF-8 lines, invalid JSON and non-object lines go to ``bad`` (raise by default); a truncated
    gzip stream always raises. ``progress`` shows a tqdm bar over the (compressed) bytes read.
    """
    bad = bad or BadRecords()
    for lineno, raw in iter_lines(path, progress=progress, desc=desc):
        if not raw.strip():
            continue
        record = f"line {lineno}"
        try:
            text = decode_utf8(raw, path, record)
        except DataError as err:
            bad.handle(err)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            bad.handle(
                DataError(f"invalid or truncated JSON: {err.msg}", path, record, reason="invalid_json")
            )
            continue
        except RecursionError:
            bad.handle(DataError(TOO_DEEP, path, record, reason="invalid_json"))
            continue
        if not isinstance(obj, dict):
            bad.handle(
                DataError(
                    f"expected a JSON object, got {type(obj).__name__}", path, record, reason="invalid_json"
                )
            )
            continue
        yield lineno, obj


def iter_lines(
    path: str | os.PathLike, progress: bool = False, desc: str | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` of a text file, gunzipping ``.gz``, streaming."""
    path = Path(path)
    try:
        raw_file = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as err:
        raise _open_error(err, path) from None
    total = os.fstat(raw_file.fileno()).st_size
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=desc or path.name, disable=bars_off(progress), leave=False
    )
    stream = gzip.GzipFile(fileobj=raw_file, mode="rb") if path.suffix == ".gz" else raw_file
    lineno = 0
    try:
        done = 0
        while True:
            try:
                line = stream.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                raise DataError(
                    f"truncated or corrupt gzip file: {err}", path, f"after line {lineno}"
                ) from None
            if not line:
                break
            lineno += 1
            yield lineno, line.rstrip(b"\r\n")
            if progress and lineno % 2048 == 0:
                pos = raw_file.tell()
                bar.update(pos - done)
                done = pos
        bar.update(total - done)
    finally:
        bar.close()
        stream.close()
        raw_file.close()


def require(obj: dict, key: str, path: str | os.PathLike, record: object, kind: type | tuple = str) -> Any:
    """``obj[key]``, or DataError 'missing field'/'wrong type' naming file and record."""
    if key not in obj or obj[key] is None:
        raise DataError(f"missing field {key!r}", path, record, reason="missing_field")
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(
            f"field {key!r} should be {names}, got {type(value).__name__}", path, record, reason="wrong_type"
        )
    return value


def require_text(obj: dict, key: str, path: str | os.PathLike, record: object) -> str:
    """A non-empty (after strip) string field."""
    value = require(obj, key, path, record, str)
    if not value.strip():
        raise DataError(f"empty text in field {key!r}", path, record, reason="empty_text")
    return value
