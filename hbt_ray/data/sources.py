"""One entry point for the other stages: eval sets and pair groups by a short *spec* string.

Eval specs: ``xquad-r``, ``mlqa-r`` (from :func:`data_dir`, else the public release), ``lareqa:PATH``,
``miracl:PATH`` or ``miracl:PATH:LANG``, and the bitext set ``tatoeba`` / ``tatoeba:PATH`` (a
:class:`~hbt_ray.data.records.BitextSet`, not an EvalSet: see :func:`is_bitext_spec`). Pair specs: the same plus ``ddtp`` and ``pairs:PATH``.

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

from hbt_ray.data.records import LANG_RE, BadRecords, BitextSet, EvalSet, PairGroup, data_dir

LAREQA_NAMES = ("xquad-r", "mlqa-r")
EVAL_SPECS = "xquad-r, mlqa-r, lareqa:PATH, pairs:PATH, miracl:PATH[:LANG], tatoeba[:PATH]"
PAIR_SPECS = "ddtp, xquad-r, mlqa-r, lareqa:PATH, pairs:PATH, miracl:PATH[:LANG]"


def check_spec(spec: object, kind: str = "pair") -> str:
    """``spec`` if it is a well-formed ``kind`` (``"pair"`` or ``"eval"``) spec, else ValueError saying
    which specs exist. Only the syntax: no file is read, so a config can be checked before anything runs.

    >>> check_spec("pairs:data/p.jsonl"), check_spec("xquad-r", "eval")
    ('pairs:data/p.jsonl', 'xquad-r')
    >>> check_spec("ddtp", "eval")
    Traceback (most recent call last):
    ...
    ValueError: unknown eval set spec 'ddtp' (known: xquad-r, mlqa-r, lareqa:PATH, pairs:PATH, miracl:PATH[:LANG], tatoeba[:PATH])
    >>> check_spec("pairs:")
    Traceback (most recent call last):
    ...
    ValueError: pair source spec 'pairs:' names no path (pairs:PATH)
    """
    names = ("ddtp", *LAREQA_NAMES) if kind == "pair" else (*LAREQA_NAMES, "tatoeba")
    prefixes = ("lareqa", "miracl", "pairs") if kind == "pair" else ("lareqa", "miracl", "pairs", "tatoeba")
    what, known = ("pair source spec", PAIR_SPECS) if kind == "pair" else ("eval set spec", EVAL_SPECS)
    if isinstance(spec, str):
        if spec in names:
            return spec
        prefix, colon, rest = spec.partition(":")
        if colon and prefix in prefixes:
            if not rest.strip():
                raise ValueError(f"{what} {spec!r} names no path ({prefix}:PATH)")
            return spec
    raise ValueError(f"unknown {what} {spec!r} (known: {known})")


def absolute_spec(spec: str) -> str:
    """``spec`` with a relative PATH made absolute against this process's working directory, since Ray
    tasks and Tune trials run in other directories; named sets, URIs and absolute paths unchanged::

        >>> absolute_spec("xquad-r"), absolute_spec("tatoeba:/data/tatoeba"), absolute_spec("miracl:/m:sw")
        ('xquad-r', 'tatoeba:/data/tatoeba', 'miracl:/m:sw')
        >>> absolute_spec("pairs:p.jsonl") == f"pairs:{Path.cwd() / 'p.jsonl'}"
        True
    """
    prefix, colon, rest = spec.partition(":")
    if not colon or prefix not in ("lareqa", "miracl", "pairs", "tatoeba") or "://" in rest:
        return spec
    path, lang = _split_miracl(rest) if prefix == "miracl" else (Path(rest), None)
    path = path.expanduser()
    if path.is_absolute() and not rest.startswith("~"):
        return spec
    return f"{prefix}:{path.resolve()}{f':{lang}' if lang else ''}"


def is_bitext_spec(spec: str) -> bool:
    """True for the eval specs that name a bitext set (``tatoeba``, ``tatoeba:PATH``): subset by
    ``max_pairs``, evaluated by bitext retrieval (:mod:`hbt_ray.evaluate.bitext`).

    >>> is_bitext_spec("tatoeba"), is_bitext_spec("tatoeba:/data/tatoeba"), is_bitext_spec("xquad-r")
    (True, True, False)
    """
    return spec == "tatoeba" or spec.startswith("tatoeba:")


def spec_files(spec: str) -> list[Path]:
    """The local files a pair spec reads (for a fingerprint of what built a set of shards); a named
    set missing from the data folder has none (it would be downloaded).

    >>> [p.name for p in spec_files("ddtp")]
    ['pairs.jsonl.gz']
    """
    check_spec(spec, "pair")
    if spec == "ddtp":
        return [data_dir() / "ddtp" / "pairs.jsonl.gz"]
    if spec in LAREQA_NAMES:
        root = _lareqa_path(spec)
    else:
        prefix, _, rest = spec.partition(":")
        root = Path(_split_miracl(rest)[0] if prefix == "miracl" else rest)
    if root is None or not root.exists():
        return []
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def known_langs(spec: str) -> tuple[str, ...] | None:
    """The languages a named data set has (``xquad-r``, ``mlqa-r``: the public release), or None when
    only its files can tell (``ddtp``, a path). A language outside them can be refused before any read.

    >>> known_langs("mlqa-r"), known_langs("pairs:p.jsonl")
    (('ar', 'de', 'en', 'es', 'hi', 'vi', 'zh'), None)
    """
    from hbt_ray.data.lareqa import LAREQA_LANGS

    return LAREQA_LANGS.get(spec)


def _lareqa_path(name: str) -> Path | None:
    local = data_dir() / "lareqa" / name
    return local if local.is_dir() else None  # None → the public files, if the caller allows a download


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
    download: bool = False,
    max_pairs: int | None = None,
    miracl_pool: str = "corpus",
    skip_paragraphs: int = 0,
    skip_pairs: int = 0,
) -> EvalSet | BitextSet:
    """The eval set named by ``spec``, optionally restricted to ``langs`` and subset to
    ``max_paragraphs`` whole parallel paragraphs after the first ``skip_paragraphs`` (see
    :meth:`EvalSet.subset`). ``xquad-r`` / ``mlqa-r``
    missing from the data folder are fetched only with ``download``. A bitext spec gives a
    :class:`BitextSet` of the first ``max_pairs`` pairs per language after its first ``skip_pairs`` (it
    has no paragraphs)."""
    check_spec(spec, "eval")
    if is_bitext_spec(spec):
        from hbt_ray.data.tatoeba import read_tatoeba

        if max_paragraphs is not None:
            raise ValueError(f"{spec}: a bitext set has no paragraphs: subset it with max_pairs")
        path = spec.removeprefix("tatoeba:") if spec != "tatoeba" else None
        return read_tatoeba(path, langs=langs, max_pairs=max_pairs, skip_pairs=skip_pairs)
    if max_pairs is not None or skip_pairs:
        raise ValueError(f"{spec}: max_pairs subsets a bitext set (tatoeba); use max_paragraphs")
    if spec in LAREQA_NAMES:
        from hbt_ray.data.lareqa import read_lareqa_eval

        eval_set = read_lareqa_eval(_lareqa_path(spec), langs=langs, name=spec, bad=bad, download=download)
    elif spec.startswith("lareqa:"):
        from hbt_ray.data.lareqa import read_lareqa_eval

        eval_set = read_lareqa_eval(Path(spec.removeprefix("lareqa:")), langs=langs, bad=bad)
    elif spec.startswith("pairs:"):
        from hbt_ray.data.pairs import read_pairs_eval

        eval_set = read_pairs_eval(Path(spec.removeprefix("pairs:")), langs=langs, bad=bad)
    elif spec.startswith("miracl:"):
        from hbt_ray.data.miracl import read_miracl_eval

        path, lang = _split_miracl(spec.removeprefix("miracl:"))
        if lang is not None and langs is not None and list(langs) != [lang]:
            raise ValueError(f"{spec}: names language {lang} but langs={list(langs)}")
        eval_set = read_miracl_eval(path, langs=[lang] if lang else langs, bad=bad, pool=miracl_pool)
    else:
        raise ValueError(f"unknown eval set spec {spec!r} (known: {EVAL_SPECS})")
    if max_paragraphs is not None:
        eval_set = eval_set.subset(max_paragraphs, seed=seed, skip=skip_paragraphs)
    elif skip_paragraphs:
        raise ValueError(f"{spec}: skip_paragraphs needs max_paragraphs")
    return eval_set


def iter_pair_groups(
    spec: str,
    langs: Sequence[str] | None = None,
    limit: int | None = None,
    passage: str = "sentence",
    bad: BadRecords | None = None,
    progress: bool = False,
    download: bool = False,
    lareqa_negatives: int = 0,
) -> Iterator[PairGroup]:
    """Training pair groups named by ``spec``; ``langs`` keeps only those languages (groups left empty
    are dropped), ``limit`` stops after that many groups. ``passage`` and ``lareqa_negatives`` (hard
    negatives from the answer's paragraph) apply to LAReQA specs."""
    check_spec(spec, "pair")
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
        groups = read_lareqa_pairs(path, langs=langs, passage=passage, name=name, bad=bad, download=download,  # type: ignore[arg-type]
                                   negatives=lareqa_negatives)  # fmt: skip
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
