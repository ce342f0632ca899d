"""LAReQA reader, EvalSet.subset and sources.load_eval_set on the real XQuAD-R / MLQA-R files."""

from __future__ import annotations

import pytest

from hbt_ray.data.lareqa import parse_lareqa_file, read_lareqa_eval, read_lareqa_pairs
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


def test_hard_negatives_from_the_answers_paragraph_reach_the_sampler(shared_data, tmp_path):
    """data.lareqa_negatives: the paragraph's other sentences, nearest the answer first, stored in the
    shards and drawn by sampler.max_negatives; never the answer, never another language's text."""
    from hbt_ray.config import ConfigError
    from hbt_ray.data.shards import iter_shard_groups
    from hbt_ray.sampler import HybridBatchSampler, SamplerConfig
    from hbt_ray.train.config import DataConfig
    from hbt_ray.train.driver import prepare_shards

    root = shared_data / "lareqa" / "mlqa-r"
    plain = {g.group_id: g for g in read_lareqa_pairs(root, langs=["en", "de"])}
    for g in read_lareqa_pairs(root, langs=["en", "de"], negatives=2):
        for lang, pair in g.pairs.items():
            assert (pair.query, pair.passage) == (plain[g.group_id].pairs[lang].query, plain[g.group_id].pairs[lang].passage)
            assert len(pair.negatives) <= 2 and pair.passage not in pair.negatives
    en = next(p for p in parse_lareqa_file(root / "en.json") if len(p.sentences) >= 4 and len(p.questions) == 1)
    q = en.questions[0]
    group = next(g for g in read_lareqa_pairs(root, langs=["en"], negatives=3) if g.group_id == q.link)
    near = sorted((i for i in range(len(en.sentences)) if i not in q.sentences), key=lambda i: (abs(i - q.sentences[0]), i))
    assert group.pairs["en"].negatives == tuple(en.sentences[i] for i in near[:3])
    # no negative answers another question of its paragraph (it may share the batch: a false negative)
    answers = {(p.pid, p.sentences[i]) for p in parse_lareqa_file(root / "en.json") for x in p.questions for i in x.sentences}
    paragraph_of = {x.link: p.pid for p in parse_lareqa_file(root / "en.json") for x in p.questions}
    shared = 0
    for g in read_lareqa_pairs(root, langs=["en"], negatives=5):
        negs = g.pairs["en"].negatives
        assert not any((paragraph_of[g.group_id], s) in answers for s in negs), g.group_id
        shared += len(negs)
    assert shared > 1000

    data = DataConfig(train=["mlqa-r"], langs=["en", "de"], lareqa_negatives=2, rows_per_shard=500)
    data.validate()
    shard_dir = prepare_shards(data, tmp_path)
    rows = [{"group_id": g.group_id, "source": g.source, "langs": g.langs,
             "queries": [g.pairs[x].query for x in g.langs], "passages": [g.pairs[x].passage for x in g.langs],
             "negatives": [list(g.pairs[x].negatives) for x in g.langs]} for g in iter_shard_groups(shard_dir)]  # fmt: skip
    assert sum(bool(n) for r in rows for n in r["negatives"]) > 0.9 * sum(len(r["langs"]) for r in rows)
    counts: dict[str, int] = {}
    for r in rows:
        for lang in r["langs"]:
            counts[lang] = counts.get(lang, 0) + 1
    sampler = HybridBatchSampler(SamplerConfig(strategy="x-y", batch_size=8, buffer_groups=64, max_negatives=2),
                                 lambda _pass: iter(rows), 0, 1, counts, num_groups=len(rows))  # fmt: skip
    batch = sampler.next_batch()
    by_id = {r["group_id"]: r for r in rows}
    for gid, plang, passage, negs in zip(batch.group_ids, batch.passage_langs, batch.passages, batch.negatives):
        row = by_id[gid]
        assert negs == row["negatives"][row["langs"].index(plang)][:2] and negs and passage not in negs
    with pytest.raises(ConfigError, match=r"lareqa_negatives: 2, but no source of data.train \['ddtp'\]"):
        DataConfig(train=["ddtp"], lareqa_negatives=2).validate()
