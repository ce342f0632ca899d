"""Tatoeba (Artetxe & Schwenk 2019) in LASER's raw layout: ``v1/tatoeba.<lang>-eng.<lang>`` and
``v1/tatoeba.<lang>-eng.eng``, UTF-8, one sentence per line, line i of one file translating line i of
the other; ``langs.tsv`` next to ``v1/`` (``lang``, ``in_xlmr`` yes/no, ``pairs``) gives the groups.

Bad input is one :class:`~hbt_ray.data.records.DataError` naming the file and the line: files of
unequal length (the first line without a partner), an empty line (it would pair a sentence with
nothing), bytes that are not UTF-8.

    >>> b = read_tatoeba(langs=["deu", "ang"], max_pairs=3)
    >>> b.counts(), b.groups
    ({'ang': 3, 'deu': 3}, {'ang': 'outside_xlmr', 'deu': 'inside_xlmr'})
    >>> b.english["ang"][0]
    'The first month of the year is January.'
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from hbt_ray.data.files import _open_error, decode_utf8
from hbt_ray.data.records import BitextSet, DataError, check_lang, data_dir

#: ``tatoeba.<lang>-eng.<side>``: the two files of one language.
FILE_RE = re.compile(r"^tatoeba\.([a-z]{2,3}(?:-[a-z0-9]{2,8})?)-eng\.([a-z]{2,3}(?:-[a-z0-9]{2,8})?)$")
PIVOT = "eng"


def tatoeba_root(path: str | os.PathLike | None = None) -> Path:
    """The folder a ``tatoeba[:PATH]`` spec names: PATH, else the data folder's ``tatoeba/``."""
    return Path(path) if path is not None else data_dir() / "tatoeba"


def tatoeba_files(
    path: str | os.PathLike | None = None, langs: Sequence[str] | None = None
) -> dict[str, tuple[Path, Path]]:
    """``{lang: (lang file, English file)}`` under ``path`` (or ``path/v1``), restricted to ``langs``.

    >>> files = tatoeba_files(langs=["deu"])
    >>> [p.name for p in files["deu"]]
    ['tatoeba.deu-eng.deu', 'tatoeba.deu-eng.eng']
    """
    root = tatoeba_root(path)
    if not root.is_dir():
        hint = " (set HBT_DATA_DIR to a folder with tatoeba/, or give tatoeba:PATH)" if path is None else ""
        raise DataError(f"no such directory{hint}", root)
    folder = root / "v1" if (root / "v1").is_dir() else root
    sides: dict[str, dict[str, Path]] = {}
    for f in sorted(folder.iterdir()):
        match = FILE_RE.match(f.name)
        if match and f.is_file():
            lang, side = match.groups()
            if side not in (lang, PIVOT):
                raise DataError(f"side {side!r} is neither {lang!r} nor {PIVOT!r}", f)
            sides.setdefault(lang, {})[side] = f
    if not sides:
        raise DataError("no tatoeba.<lang>-eng.<lang> / .eng files in this directory", folder)
    files = {}
    for lang, pair in sides.items():
        for need in (lang, PIVOT):
            if need not in pair:
                other = next(iter(pair.values()))
                raise DataError(
                    f"no tatoeba.{lang}-eng.{need} next to it: one side of the pairs is missing", other
                )
        files[lang] = (pair[lang], pair[PIVOT])
    if langs is not None:
        if PIVOT in langs:
            raise ValueError(
                f"langs: {PIVOT!r} is the pivot every language is paired with, not a language to evaluate"
            )
        missing = [lang for lang in langs if lang not in files]
        if missing:
            raise DataError(f"no files for language(s) {missing} (has {sorted(files)})", folder)
        files = {lang: files[lang] for lang in langs}
    return files


def read_sentences(path: str | os.PathLike) -> list[str]:
    """The lines of one side, each a non-empty UTF-8 sentence; a trailing newline ends the last line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _open_error(err, path) from None
    lines = raw.split(b"\n")  # bytes: U+2028 and friends inside a sentence do not split it, as in LASER
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise DataError("empty file: no sentences", path, reason="empty_text")
    out = []
    for i, line in enumerate(lines, 1):
        text = decode_utf8(line.removesuffix(b"\r"), path, f"line {i}")
        if not text.strip():
            raise DataError(
                "empty line: every line must hold one sentence", path, f"line {i}", reason="empty_text"
            )
        out.append(text)
    return out


def read_langs_tsv(path: str | os.PathLike) -> dict[str, tuple[str, int | None]]:
    """``{lang: (group, pairs)}`` from ``langs.tsv``: columns ``lang``, ``in_xlmr`` (yes / no), optional
    ``pairs``; group ``inside_xlmr`` / ``outside_xlmr``."""
    path = Path(path)
    rows = read_sentences(path)
    header = rows[0].split("\t")
    if "lang" not in header or "in_xlmr" not in header:
        raise DataError(f"header {header} lacks the columns 'lang' and 'in_xlmr'", path, "line 1")
    out: dict[str, tuple[str, int | None]] = {}
    for i, row in enumerate(rows[1:], 2):
        cells = row.split("\t")
        if len(cells) != len(header):
            raise DataError(f"{len(cells)} columns, the header has {len(header)}", path, f"line {i}")
        rec = dict(zip(header, cells))
        lang = check_lang(rec["lang"], path, f"line {i}")
        if rec["in_xlmr"] not in ("yes", "no"):
            raise DataError(f"in_xlmr must be yes or no, got {rec['in_xlmr']!r}", path, f"line {i}")
        pairs = rec.get("pairs")
        if pairs is not None and not pairs.isdigit():
            raise DataError(f"pairs must be a count, got {pairs!r}", path, f"line {i}")
        if lang in out:
            raise DataError(f"language {lang!r} listed twice", path, f"line {i}")
        out[lang] = (
            "inside_xlmr" if rec["in_xlmr"] == "yes" else "outside_xlmr",
            int(pairs) if pairs else None,
        )
    return out


def read_tatoeba(
    path: str | os.PathLike | None = None,
    langs: Sequence[str] | None = None,
    max_pairs: int | None = None,
    name: str = "tatoeba",
    skip_pairs: int = 0,
) -> BitextSet:
    """Tatoeba files → :class:`BitextSet` (every language, or ``langs``; the first ``max_pairs`` pairs of
    each after its first ``skip_pairs``). Groups from ``langs.tsv`` when the folder has one; its ``pairs`` must match the files."""
    files = tatoeba_files(path, langs)
    root = tatoeba_root(path)
    tsv = root / "langs.tsv"
    listed = read_langs_tsv(tsv) if tsv.is_file() else {}
    sentences, english, groups = {}, {}, {}
    for lang, (side, eng) in sorted(files.items()):
        xs, es = read_sentences(side), read_sentences(eng)
        if len(xs) != len(es):
            (long, n_long), (short, n_short) = sorted([(side, len(xs)), (eng, len(es))], key=lambda t: -t[1])
            raise DataError(
                f"{n_long} lines but {short.name} has {n_short}: line {n_short + 1} has no translation",
                long, f"line {n_short + 1}", reason="unaligned",
            )  # fmt: skip
        if lang in listed:
            group, pairs = listed[lang]
            if pairs is not None and pairs != len(xs):
                line = list(listed).index(lang) + 2
                raise DataError(
                    f"{lang}: pairs {pairs}, but its files have {len(xs)} lines", tsv, f"line {line}"
                )
            groups[lang] = group
        sentences[lang], english[lang] = xs, es
    meta = {"source": str(root), "langs_tsv": str(tsv) if listed else None}
    bitext = BitextSet(name, sentences, english, groups, meta)
    return bitext.head(max_pairs, skip_pairs) if max_pairs is not None or skip_pairs else bitext
