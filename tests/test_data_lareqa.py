"""LAReQA reader, EvalSet.subset and sources.load_eval_set on the real XQuAD-R / MLQA-R files."""

from __future__ import annotations

import pytest

from hbt_ray.data.lareqa import read_lareqa_eval, read_lareqa_pairs
from hbt_ray.data.sources import iter_pair_groups, load_eval_set

XQUAD_CANDIDATES = {"ar": 1222, "de": 1276, "en": 1180, "es": 1215, "hi": 1244, "vi": 1209, "zh": 1196}
MLQA_QUESTIONS = {"ar": 517, "de": 512, "en": 1148, "es": 500, "hi": 507, "vi": 511, "zh": 504}
MLQA_CANDIDATES = {"ar": 2545, "de": 2362, "en": 6264, "es": 1787, "hi": 2426, "vi": 2828, "zh": 2322}


@pytest.fixture(scope="module")
def xquad(shared_data):
    return read_lareqa_eval(shared_data / "lareqa" / "xquad-r", name="xquad-r")


def test_xquad_r_counts(xquad):
    assert xquad.counts() == {lang: (1190, n) for lang, n in XQUAD_CANDIDATES.items()}


def test_mlqa_r_counts(shared_data):
    s = load_eval_set("mlqa-r")
    assert s.counts() == {lang: (MLQA_QUESTIONS[lang], MLQA_CANDIDATES[lang]) for lang in MLQA_QUESTIONS}


def test_ids_unique_relevant_is_answer_sentence(xquad, shared_data):
    for lang in xquad.langs:
        cids = [c.cid for c in xquad.candidates[lang]]
        qids = [q.qid for q in xquad.queries[lang]]
        assert len(set(cids)) == len(cids) and len(set(qids)) == len(qids)
        by_id = {c.cid: c for c in xquad.candidates[lang]}
        for q in xquad.queries[lang]:
            assert q.qid == f"{lang}:{q.link}"
            assert len(q.relevant) == 1
            assert by_id[q.relevant[0]].paragraph == q.paragraph
    # The first English question of the file: its answer "308" is in sentence 0 of paragraph 0.
    q0 = xquad.queries["en"][0]
    cand = {c.cid: c.text for c in xquad.candidates["en"]}[q0.relevant[0]]
    assert q0.link == "56beb4343aeaaa14008c925b" and "308 points" in cand
    # XQuAD-R is fully parallel: the same links in every language.
    links = {lang: {q.link for q in xquad.queries[lang]} for lang in xquad.langs}
    assert all(v == links["en"] for v in links.values())


def test_subset_keeps_parallel_paragraphs_whole(xquad):
    sub = xquad.subset(7, seed=3)
    assert sub.subset(7, seed=3).counts() == sub.counts()  # deterministic
    assert xquad.subset(7, seed=3).counts() == sub.counts()
    other = xquad.subset(7, seed=4)
    assert {q.link for q in other.queries["en"]} != {q.link for q in sub.queries["en"]}
    for lang in sub.langs:
        kept_paragraphs = {q.paragraph for q in sub.queries[lang]}
        assert len(kept_paragraphs) == 7
        # whole paragraphs: every sentence and every question of a kept paragraph is kept
        assert [c for c in xquad.candidates[lang] if c.paragraph in kept_paragraphs] == sub.candidates[lang]
        assert [q for q in xquad.queries[lang] if q.paragraph in kept_paragraphs] == sub.queries[lang]
        cids = {c.cid for c in sub.candidates[lang]}
        assert all(set(q.relevant) <= cids for q in sub.queries[lang])
    # parallel: the same question links in every language
    links = [{q.link for q in sub.queries[lang]} for lang in sub.langs]
    assert all(x == links[0] for x in links) and len(links[0]) > 7
    # no seed → the first paragraphs of the file; a seed draws others
    first = xquad.subset(2)
    assert [q.qid for q in first.queries["en"]] == [
        q.qid for q in xquad.queries["en"] if q.paragraph in {"en:p0.0", "en:p0.1"}
    ]


def test_subset_mlqa_keeps_every_linked_query(shared_data):
    full = load_eval_set("mlqa-r")
    sub = load_eval_set("mlqa-r", max_paragraphs=12, seed=0)
    links = {q.link for lang in sub.langs for q in sub.queries[lang]}
    for lang in full.langs:  # every query sharing a kept link is kept, in every language
        want = [q.qid for q in full.queries[lang] if q.link in links]
        assert [q.qid for q in sub.queries[lang]] == want
        cids = {c.cid for c in sub.candidates[lang]}
        assert all(set(q.relevant) <= cids for q in sub.queries[lang])
    assert sub.meta["subset"]["units"] == 12


def test_load_eval_set_langs_and_specs(shared_data):
    s = load_eval_set("xquad-r", langs=["de", "zh"])
    assert s.counts() == {"de": (1190, 1276), "zh": (1190, 1196)}
    s2 = load_eval_set(f"lareqa:{shared_data / 'lareqa' / 'xquad-r' / 'hi.json'}")
    assert s2.counts() == {"hi": (1190, 1244)}
    with pytest.raises(ValueError, match="unknown eval set spec 'squad'"):
        load_eval_set("squad")


def test_lareqa_pairs(shared_data):
    groups = list(read_lareqa_pairs(shared_data / "lareqa" / "xquad-r", langs=["en", "de"]))
    assert len(groups) == 1190 and all(g.langs == ["de", "en"] for g in groups)
    g = groups[0]
    assert g.group_id == "56beb4343aeaaa14008c925b" and "308" in g.pairs["en"].passage
    para = next(iter_pair_groups("xquad-r", langs=["en"], passage="paragraph", limit=1))
    assert para.pairs["en"].passage.startswith("The Panthers defense gave up just 308 points")
    assert len(para.pairs["en"].passage) > len(g.pairs["en"].passage)
    mlqa = list(iter_pair_groups("mlqa-r"))
    assert len(mlqa) == 1148 and all("en" in g.pairs and len(g.pairs) >= 2 for g in mlqa)
