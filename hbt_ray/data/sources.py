"""One entry point for the other stages: eval sets and pair groups by a short *spec* string.

Eval specs: ``xquad-r``, ``mlqa-r`` (from :func:`data_dir`, else the public release), ``lareqa:PATH``,
``miracl:PATH`` or ``miracl:PATH:LANG``. Pair specs: the same plus ``ddtp`` and ``pairs:PATH``.

    >>> s = load_eval_set("xquad-r", langs=["en", "de"], max_paragraphs=5)
    >>> sorted(s.counts())
    ['de', 'en']
    >>> g = next(iter_pair_groups("ddtp", limit=1))
    >>> "en" in g.pairs
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from hbt_ray.data.records import LANG_RE, BadRecords, EvalSet, PairGroup, data_dir

LAREQA_NAMES = ("xquad-r", "mlqa-r")
EVAL_SPECS = "xquad-r, mlqa-r, lareqa:PATH, miracl:PATH[:LANG]"
PAIR_SPECS = "ddtp, xquad-r, mlqa-r, lareqa:PATH, pairs:PATH, miracl:PATH[:LANG]"


def _lareqa_path(name: str) -> Path | None:
    local = data_dir() / "lareqa" / name
    return local if local.is_dir() else None  # None → download the public files


def _split_miracl(rest: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH:LANG`` (a trailing ``:xx`` that is a language code and not part of a path)."""
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if LANG_RE.match(tail) and not Path(rest).exists():
            return Path(head), tail
    return Path(rest), None


def load_eval_set(
    spec: str,
    langs: Sequence[str] | None = None,
    max_paragraphs: int | None = None,
    seed: int | None = None,
    bad: BadRecords | None = None,
) -> EvalSet:
    """The eval set named by ``spec``, optionally restricted to ``langs`` and subset to
    ``max_paragraphs`` whole parallel paragraphs (see :meth:`EvalSet.subset`)."""
    if spec in LAREQA_NAMES:
        from hbt_ray.data.lareqa import read_lareqa_eval

        eval_set = read_lareqa_eval(_lareqa_path(spec), langs=langs, name=spec, bad=bad)
    elif spec.startswith("lareqa:"):
        from hbt_ray.data.lareqa import read_lareqa_eval

        eval_set = read_lareqa_eval(Path(spec.removeprefix("lareqa:")), langs=langs, bad=bad)
    elif spec.startswith("miracl:"):
        from hbt_ray.data.miracl import read_miracl_eval

        path, lang = _split_miracl(spec.removeprefix("miracl:"))
        if lang is not None and langs is not None and list(langs) != [lang]:
            raise ValueError(f"{spec}: names language {lang} but langs={list(langs)}")
        eval_set = read_miracl_eval(path, langs=[lang] if lang else langs, bad=bad)
    else:
        raise ValueError(f"unknown eval set spec {spec!r} (known: {EVAL_SPECS})")
    if max_paragraphs is not None:
        eval_set = eval_set.subset(max_paragraphs, seed=seed)
    return eval_set


def iter_pair_groups(
    spec: str,
    langs: Sequence[str] | None = None,
    limit: int | None = None,
    passage: str = "sentence",
    bad: BadRecords | None = None,
    progress: bool = False,
) -> Iterator[PairGroup]:
    """Training pair groups named by ``spec``; ``langs`` keeps only those languages (groups left empty
    are dropped), ``limit`` stops after that many groups. ``passage`` applies to LAReQA specs."""
    if spec == "ddtp":
        from hbt_ray.data.pairs import read_pairs

        groups = read_pairs(
            data_dir() / "ddtp" / "pairs.jsonl.gz", langs=langs, source="ddtp", bad=bad, progress=progress
        )
    elif spec.startswith("pairs:"):
        from hbt_ray.data.pairs import read_pairs

        groups = read_pairs(Path(spec.removeprefix("pairs:")), langs=langs, bad=bad, progress=progress)
    elif spec in LAREQA_NAMES or spec.startswith("lareqa:"):
        from hbt_ray.data.lareqa import read_lareqa_pairs

        if spec in LAREQA_NAMES:
            path, name = _lareqa_path(spec), spec
        else:
            path, name = Path(spec.removeprefix("lareqa:")), None
        groups = read_lareqa_pairs(path, langs=langs, passage=passage, name=name, bad=bad)  # type: ignore[arg-type]
    elif spec.startswith("miracl:"):
        from hbt_ray.data.miracl import read_miracl_pairs

        path, lang = _split_miracl(spec.removeprefix("miracl:"))
        groups = read_miracl_pairs(path, langs=[lang] if lang else langs, bad=bad)
    else:
        raise ValueError(f"unknown pair source spec {spec!r} (known: {PAIR_SPECS})")
    n = 0
    for group in groups:
        if limit is not None and n >= limit:
            return
        yield group
        n += 1
