"""LAReQA retrieval sets (XQuAD-R, MLQA-R): SQuAD-style JSON with ``sentences`` + ``sentence_breaks``.

One file per language (``<lang>.json``). The candidates are the sentences of every paragraph; a
question's relevant candidate is the sentence whose break ``[start, end)`` contains its
``answer_start``; questions with the same ``qas.id`` are parallel across languages.

Ids (all prefixed with the language, so they are unique even in a pool of all languages):
query ``"en:56beb4343aeaaa14008c925b"`` (link = the bare ``qas.id``), paragraph ``"en:p0.3"``
(article 0, paragraph 3 of the file), candidate ``"en:p0.3.s2"`` (its sentence 2).

    >>> from hbt_ray.data.records import data_dir
    >>> s = read_lareqa_eval(data_dir() / "lareqa" / "xquad-r", langs=["en", "de"])
    >>> s.counts()
    {'de': (1190, 1276), 'en': (1190, 1180)}
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from hbt_ray.config import bars_off
from hbt_ray.data.files import read_json_file, require, require_text
from hbt_ray.data.records import (
    BadRecords,
    Candidate,
    DataError,
    EvalQuery,
    EvalSet,
    Pair,
    PairGroup,
    check_lang,
    data_dir,
)

#: Languages of the public LAReQA release.
LAREQA_LANGS = {
    "xquad-r": ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"),
    "mlqa-r": ("ar", "de", "en", "es", "hi", "vi", "zh"),
}
#: Public files (google-research-datasets/lareqa on GitHub).
#: sha256 of the public files (the copies in shared/data/lareqa, unchanged from the release)
LAREQA_SHA256 = {
    ("mlqa-r", "ar"): "2132fbc03208535c0fe01f2e2c5121d06f9c2aa799af93b0a719dbc105bdf137",
    ("mlqa-r", "de"): "ce9454dc5aa6f2d85c23cd6e49cb367fbb7c4c6e62d7f71e355c6b5dae4d0886",
    ("mlqa-r", "en"): "fedd9a5cc0848dda80caf84aa36f482adaae230526a3f6e9e86926a93ef3b1e4",
    ("mlqa-r", "es"): "70ecba276b8c96a692b120693a595d076ce94ad21d4b28311538a9fcbfe0f9d7",
    ("mlqa-r", "hi"): "4dd0fb3c06f737a5481d705bc1dcac7876712a5815c9265908fbb3a0696cb654",
    ("mlqa-r", "vi"): "9d3baff6ba03e6793b25594217265ea59a136b9733833dca8a9582a84a78ff85",
    ("mlqa-r", "zh"): "57f01d2fff50cf3392805635b01445339f225ad5bf28ba8443b12f8dbd1e69dc",
    ("xquad-r", "ar"): "c52922d3b8ac1ae03ed5ac38647ad59870dca3dda2beefe18ecdc30729acb69d",
    ("xquad-r", "de"): "16fb0f4bf4916154b585a20c24c66074591c9718a1affe764ff4697572328949",
    ("xquad-r", "en"): "7b0954f39297c27a31fef610f0883337dd2907fa8699151dc922afdd0fa12ffe",
    ("xquad-r", "es"): "f8e836b2d91009c4363e04315f7ede363eedbbb49c67dda60de6c4aa782f58de",
    ("xquad-r", "hi"): "ea45ba8ae4513d1533b222bebdc02a90bc319c055d3aeea68584a053d2e92872",
    ("xquad-r", "vi"): "e35926bf5cc6fc6ecbdfca49467aabeb454f08d152d7818143a906bd31dde995",
    ("xquad-r", "zh"): "80c2cde7b9c2fb134c303cbb52f2ba396ead9eb0014aec43993543d2ba9e93ed",
}
LAREQA_URL = "https://raw.githubusercontent.com/google-research-datasets/lareqa/master/{name}/{lang}.json"


@dataclass
class LareqaQuestion:
    qid: str
    link: str
    text: str
    sentences: tuple[int, ...]  # indices of the answer sentence(s) in its paragraph; [0] is the pair passage


@dataclass
class LareqaParagraph:
    pid: str
    context: str
    sentences: list[str]
    questions: list[LareqaQuestion]


def parse_lareqa_file(
    path: str | os.PathLike, lang: str | None = None, bad: BadRecords | None = None
) -> list[LareqaParagraph]:
    """Parse one ``<lang>.json`` file; bad records raise DataError (or are skipped into ``bad``)."""
    path = Path(path)
    bad = bad or BadRecords()
    lang = check_lang(lang if lang is not None else path.name.split(".")[0], path, "file name")
    doc = read_json_file(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError("not a SQuAD-style file: no top-level 'data' list", path, reason="missing_field")
    paragraphs: list[LareqaParagraph] = []
    seen_questions: dict[str, tuple[str, str]] = {}  # qas.id -> (question text, where)
    for a, article in enumerate(doc["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            bad.handle(DataError("missing field 'paragraphs'", path, f"data[{a}]", reason="missing_field"))
            continue
        for p, para in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            try:
                paragraphs.append(
                    _parse_paragraph(para, lang, f"{lang}:p{a}.{p}", path, where, bad, seen_questions)
                )
            except DataError as err:
                bad.handle(err)
    return paragraphs


def _parse_paragraph(
    para: object,
    lang: str,
    pid: str,
    path: Path,
    where: str,
    bad: BadRecords,
    seen_questions: dict[str, tuple[str, str]],
) -> LareqaParagraph:
    if not isinstance(para, dict):
        raise DataError("paragraph is not an object", path, where, reason="wrong_type")
    context = require(para, "context", path, where, str)
    sentences = require(para, "sentences", path, where, list)
    breaks = require(para, "sentence_breaks", path, where, list)
    qas = require(para, "qas", path, where, list)
    if len(sentences) != len(breaks):
        raise DataError(
            f"{len(sentences)} sentences but {len(breaks)} sentence_breaks", path, where, reason="bad_breaks"
        )
    end = 0
    for i, (sentence, brk) in enumerate(zip(sentences, breaks)):
        if not isinstance(sentence, str) or not sentence.strip():
            raise DataError(f"empty text in sentences[{i}]", path, where, reason="empty_text")
        if not (isinstance(brk, list) and len(brk) == 2 and all(isinstance(x, int) for x in brk)):
            raise DataError(
                f"sentence_breaks[{i}] is not [start, end]: {brk!r}", path, where, reason="bad_breaks"
            )
        # Breaks decide which sentence answers a question: overlapping or out-of-context ones would
        # make one answer relevant in several sentences (every sentence, for [0, 1e9] everywhere).
        if not end <= brk[0] < brk[1] <= len(context):
            raise DataError(
                f"sentence_breaks[{i}] {brk} is not a span of the {len(context)}-character context after "
                f"the previous break (ending at {end}): breaks must be sorted, non-overlapping, inside",
                path, where, reason="bad_breaks",
            )  # fmt: skip
        end = brk[1]
    questions = []
    for k, qa in enumerate(qas):
        qwhere = f"{where}.qas[{k}]"
        try:
            if not isinstance(qa, dict):
                raise DataError("question is not an object", path, qwhere, reason="wrong_type")
            link = str(require(qa, "id", path, qwhere, (str, int)))
            qwhere = f"{qwhere} id={link}"
            text = require_text(qa, "question", path, qwhere)
            answers = require(qa, "answers", path, qwhere, list)
            if not answers:
                raise DataError("no answers", path, qwhere, reason="missing_field")
            starts = [
                require(ans, "answer_start", path, qwhere, int) for ans in answers if isinstance(ans, dict)
            ]
            if len(starts) != len(answers):
                raise DataError("an answer is not an object", path, qwhere, reason="wrong_type")
            hits = sorted({i for s in starts for i, (b, e) in enumerate(breaks) if b <= s < e})
            if not hits:
                raise DataError(
                    f"answer_start {starts} is outside every sentence break",
                    path,
                    qwhere,
                    reason="answer_outside",
                )
            if link in seen_questions:
                prev_text, prev_where = seen_questions[link]
                if prev_text != text:
                    raise DataError(
                        f"duplicate question id {link!r} with conflicting text (first at {prev_where}: "
                        f"{prev_text!r}, here: {text!r})",
                        path,
                        qwhere,
                        reason="duplicate_conflict",
                    )
                continue  # an identical repeat adds nothing
            seen_questions[link] = (text, qwhere)
        except DataError as err:
            bad.handle(err)
            continue
        # Answers in two sentences (never in XQuAD-R / MLQA-R): both relevant, the first is the pair passage.
        questions.append(LareqaQuestion(f"{lang}:{link}", link, text, tuple(hits)))
    return LareqaParagraph(pid, context, list(sentences), questions)


def lareqa_files(
    path: str | os.PathLike | None,
    langs: Sequence[str] | None = None,
    name: str | None = None,
    download: bool = False,
) -> dict[str, Path]:
    """``{lang: file}`` for a directory of ``<lang>.json``, a single file, or (path None) the public
    release — fetched only with ``download`` (checksum-verified), never behind the user's back."""
    if path is None:
        if name not in LAREQA_LANGS:
            raise ValueError(f"give a path, or name one of {sorted(LAREQA_LANGS)} to download (got {name!r})")
        if not download:
            raise DataError(
                f"{name} is not in the data folder (set HBT_DATA_DIR to a folder with lareqa/{name}/), or "
                "pass --download (eval.download=true / data.download=true) to fetch the public files",
                data_dir() / "lareqa" / name,
            )
        return download_lareqa(name, langs)
    path = Path(path)
    if path.is_file():
        files = {path.name.split(".")[0]: path}
    elif path.is_dir():
        files = {}
        for f in sorted(path.iterdir()):
            if not f.name.endswith((".json", ".json.gz")):
                continue
            lang = f.name.split(".")[0]
            if lang in files:  # en.json and en.json.gz: which one is meant is not ours to guess
                raise DataError(f"both {files[lang].name} and {f.name} hold language {lang!r}: keep one", path)
            files[lang] = f
        if not files:
            raise DataError("no <lang>.json files in this directory", path)
    else:
        raise DataError("no such file or directory", path)
    if langs is not None:
        missing = [lang for lang in langs if lang not in files]
        if missing:
            raise DataError(f"no file for language(s) {missing} (has {sorted(files)})", path)
        files = {lang: files[lang] for lang in langs}
    return files


def download_lareqa(
    name: str, langs: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Fetch the public ``<name>/<lang>.json`` files once into ``cache_dir`` (default ~/.cache/hbt_ray)."""
    cache = (
        Path(cache_dir or os.environ.get("HBT_CACHE_DIR", Path.home() / ".cache" / "hbt_ray"))
        / "lareqa"
        / name
    )
    todo = list(langs or LAREQA_LANGS[name])
    unknown = [lang for lang in todo if (name, lang) not in LAREQA_SHA256]
    if unknown:
        raise DataError(f"no pinned checksum for {name} {unknown}: fetch them yourself and pass a path",
                        LAREQA_URL.format(name=name, lang=unknown[0]))  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for lang in todo:
        target = cache / f"{lang}.json"
        if not target.exists():
            url = LAREQA_URL.format(name=name, lang=lang)
            print(f"[hbt_ray.data] downloading {url} → {target}", file=sys.stderr, flush=True)
            tmp = target.with_suffix(".part")
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    body = resp.read()
            except OSError as err:
                raise DataError(f"download failed: {err}", url) from None
            digest = hashlib.sha256(body).hexdigest()
            if digest != LAREQA_SHA256[(name, lang)]:
                raise DataError(f"sha256 {digest} is not the pinned {LAREQA_SHA256[(name, lang)]}", url)
            tmp.write_bytes(body)
            tmp.rename(target)
        files[lang] = target
    return files


def read_lareqa_eval(
    path: str | os.PathLike | None,
    langs: Sequence[str] | None = None,
    name: str | None = None,
    bad: BadRecords | None = None,
    download: bool = False,
) -> EvalSet:
    """LAReQA files → EvalSet (every sentence a candidate, relevant = the answer sentence)."""
    files = lareqa_files(path, langs, name, download=download)
    name = name or (Path(path).name if path is not None else "lareqa")
    queries: dict[str, list[EvalQuery]] = {}
    candidates: dict[str, list[Candidate]] = {}
    paragraphs_per_lang = {}
    for lang, file in tqdm(files.items(), desc=f"read {name}", unit="lang", leave=False, disable=bars_off()):
        paragraphs = parse_lareqa_file(file, lang, bad)
        if not paragraphs:  # else a traceback later: "nothing to encode"
            raise DataError("holds no paragraph", file, reason="empty")
        paragraphs_per_lang[lang] = len(paragraphs)
        queries[lang], candidates[lang] = [], []
        for para in paragraphs:
            cids = [f"{para.pid}.s{i}" for i in range(len(para.sentences))]
            candidates[lang].extend(Candidate(cid, text, para.pid) for cid, text in zip(cids, para.sentences))
            for q in para.questions:
                relevant = tuple(cids[i] for i in q.sentences)
                queries[lang].append(EvalQuery(q.qid, q.text, q.link, relevant, para.pid))
    meta = {
        "source": str(path) if path is not None else f"download:{name}",
        "paragraphs": paragraphs_per_lang,
    }
    return EvalSet(name, queries, candidates, meta)


def _paragraph_negatives(para: LareqaParagraph, q: LareqaQuestion, n: int) -> tuple[str, ...]:
    """The ``n`` sentences of ``para`` nearest to ``q``'s answer that answer none of its questions (ties:
    the earlier).

    >>> q2, q3 = LareqaQuestion("a", "a", "?", (2,)), LareqaQuestion("b", "b", "?", (3,))
    >>> p = LareqaParagraph("p", "", ["s0", "s1", "s2", "s3", "s4"], [q2, q3])
    >>> _paragraph_negatives(p, q2, 3)
    ('s1', 's0', 's4')
    """
    if n == 0:
        return ()
    answer, answers = q.sentences[0], {i for other in para.questions for i in other.sentences}
    others = sorted((i for i in range(len(para.sentences)) if i not in answers), key=lambda i: (abs(i - answer), i))
    return tuple(para.sentences[i] for i in others[:n])


def read_lareqa_pairs(
    path: str | os.PathLike | None,
    langs: Sequence[str] | None = None,
    passage: Literal["sentence", "paragraph"] = "sentence",
    name: str | None = None,
    bad: BadRecords | None = None,
    download: bool = False,
    negatives: int = 0,
) -> Iterator[PairGroup]:
    """LAReQA files → one PairGroup per ``qas.id`` (query = question, passage = answer sentence or paragraph).

    Groups come in order of first appearance (languages sorted); a question present in one language
    only gives a one-language group. ``negatives`` (sentence passages only): up to that many other
    sentences of the answer's paragraph as the pair's hard negatives, nearest to the answer first — the
    candidates LAReQA's own pools make hardest (same topic, same wording). Sentences that answer any
    question of the paragraph are left out: another question of it may be in the same batch, and its
    answer would then be a negative of its own query.
    """
    if passage not in ("sentence", "paragraph"):
        raise ValueError(f"passage must be 'sentence' or 'paragraph', got {passage!r}")
    if negatives < 0 or (negatives and passage != "sentence"):
        raise ValueError(f"negatives: {negatives} needs passage 'sentence' and must be >= 0")
    files = lareqa_files(path, langs, name, download=download)
    source = name or (Path(path).name if path is not None else "lareqa")
    groups: dict[str, dict[str, Pair]] = {}
    for lang, file in sorted(files.items()):
        for para in parse_lareqa_file(file, lang, bad):
            for q in para.questions:
                text = para.sentences[q.sentences[0]] if passage == "sentence" else para.context
                groups.setdefault(q.link, {})[lang] = Pair(q.text, text, _paragraph_negatives(para, q, negatives))
    for link, pairs in groups.items():
        yield PairGroup(link, source, pairs)
