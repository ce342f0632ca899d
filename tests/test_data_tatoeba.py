"""The Tatoeba reader on the real LASER files, and every bad input it refuses (one DataError naming the
file and the line), on copies in ``tmp_path``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hbt_ray.config import ConfigError
from hbt_ray.data.records import DataError, data_dir
from hbt_ray.data.sources import check_spec, load_eval_set
from hbt_ray.data.tatoeba import read_langs_tsv, read_tatoeba, tatoeba_files
from hbt_ray.evaluate.config import EvalConfig


@pytest.fixture(scope="module")
def tatoeba_dir() -> Path:
    root = data_dir() / "tatoeba"
    if not (root / "v1").is_dir():
        pytest.fail(f"real Tatoeba data not found at {root}")
    return root


def copy_langs(src: Path, dst: Path, langs: list[str], tsv: bool = True) -> Path:
    """A Tatoeba folder with ``langs`` only (v1/ + langs.tsv restricted to them)."""
    (dst / "v1").mkdir(parents=True)
    for lang in langs:
        for side in (lang, "eng"):
            shutil.copy(src / "v1" / f"tatoeba.{lang}-eng.{side}", dst / "v1")
    if tsv:
        rows = (src / "langs.tsv").read_text(encoding="utf-8").splitlines()
        keep = [rows[0]] + [r for r in rows[1:] if r.split("\t")[0] in langs]
        (dst / "langs.tsv").write_text("\n".join(keep) + "\n", encoding="utf-8")
    return dst


def test_reads_every_real_language_aligned(tatoeba_dir):
    tsv = read_langs_tsv(tatoeba_dir / "langs.tsv")
    b = read_tatoeba(tatoeba_dir)
    assert b.langs == sorted(tsv) and len(b.langs) == 57
    for lang in b.langs:
        assert len(b.sentences[lang]) == len(b.english[lang]) == tsv[lang][1]
        assert all(s.strip() for s in b.sentences[lang] + b.english[lang])
    assert len(b.group_langs("outside_xlmr")) == 19
    assert len(b.group_langs("inside_xlmr")) == 38


def test_line_alignment_and_groups(tatoeba_dir):
    b = read_tatoeba(tatoeba_dir, langs=["deu", "kzj"], max_pairs=5)
    eng = (tatoeba_dir / "v1" / "tatoeba.deu-eng.eng").read_text(encoding="utf-8").splitlines()
    deu = (tatoeba_dir / "v1" / "tatoeba.deu-eng.deu").read_text(encoding="utf-8").splitlines()
    assert b.english["deu"] == eng[:5] and b.sentences["deu"] == deu[:5]
    # kzj (Coastal Kadazan) is not among XLM-R's 100 languages: grouped as such.
    assert b.groups == {"deu": "inside_xlmr", "kzj": "outside_xlmr"}
    assert b.counts() == {"deu": 5, "kzj": 5}
    assert b.meta["max_pairs"] == 5


def test_eval_spec_and_config(tatoeba_dir):
    assert check_spec("tatoeba", "eval") == "tatoeba"
    assert check_spec(f"tatoeba:{tatoeba_dir}", "eval")
    with pytest.raises(ValueError, match="unknown pair source spec 'tatoeba'"):
        check_spec("tatoeba", "pair")
    b = load_eval_set(f"tatoeba:{tatoeba_dir}", langs=["ang"], max_pairs=3)
    assert b.counts() == {"ang": 3}
    EvalConfig(data="tatoeba", max_pairs=10).validate()
    with pytest.raises(ConfigError, match="max_paragraphs: tatoeba has no paragraphs"):
        EvalConfig(data="tatoeba", max_paragraphs=5).validate()
    with pytest.raises(ConfigError, match=r"max_pairs: only for tatoeba\[:PATH\]; xquad-r"):
        EvalConfig(data="xquad-r", max_pairs=5).validate()
    with pytest.raises(ConfigError, match="max_pairs: must be >= 1, got 0"):
        EvalConfig(data="tatoeba", max_pairs=0).validate()


def test_skip_pairs_gives_a_dev_split_disjoint_from_the_first_pairs(tatoeba_dir):
    from hbt_ray.evaluate.run import load_eval_data, subset_eval_set

    full = read_tatoeba(tatoeba_dir, langs=["arz", "kzj"])
    cfg = EvalConfig(data=f"tatoeba:{tatoeba_dir}", langs=["arz", "kzj"], max_pairs=100, skip_pairs=200)
    dev = load_eval_data(cfg)
    for lang in ("arz", "kzj"):
        assert dev.sentences[lang] == full.sentences[lang][200:300]
        assert dev.english[lang] == full.english[lang][200:300]
    # applying the config again to the set it loaded changes nothing (it does not skip twice)
    assert subset_eval_set(dev, cfg).sentences == dev.sentences
    assert subset_eval_set(full, cfg).sentences == dev.sentences
    # without max_pairs: everything after the skip
    assert load_eval_data(EvalConfig(data=f"tatoeba:{tatoeba_dir}", langs=["arz"], skip_pairs=400)).counts() == {
        "arz": len(full.sentences["arz"]) - 400}
    with pytest.raises(ValueError, match=r"skip_pairs 200 leaves no pairs in \['ang'\]"):
        load_eval_data(EvalConfig(data=f"tatoeba:{tatoeba_dir}", langs=["ang", "arz"], skip_pairs=200))
    with pytest.raises(ConfigError, match=r"skip_pairs: only for tatoeba\[:PATH\]; xquad-r has skip_paragraphs"):
        EvalConfig(data="xquad-r", skip_pairs=5).validate()
    with pytest.raises(ConfigError, match="skip_pairs: must be >= 0, got -1"):
        EvalConfig(data="tatoeba", skip_pairs=-1).validate()


def test_unknown_language_and_pivot(tatoeba_dir):
    with pytest.raises(DataError, match=r"v1: no files for language\(s\) \['xx'\] \(has \['afr'"):
        tatoeba_files(tatoeba_dir, ["xx"])
    with pytest.raises(ValueError, match="'eng' is the pivot"):
        read_tatoeba(tatoeba_dir, langs=["eng"])


def test_unequal_line_counts(tatoeba_dir, tmp_path):
    root = copy_langs(tatoeba_dir, tmp_path / "t", ["ang"], tsv=False)
    eng = root / "v1" / "tatoeba.ang-eng.eng"
    eng.write_text(eng.read_text(encoding="utf-8") + "One sentence too many.\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_tatoeba(root)
    assert (
        str(err.value)
        == f"{eng} [line 135]: 135 lines but tatoeba.ang-eng.ang has 134: line 135 has no translation"
    )


def test_empty_line(tatoeba_dir, tmp_path):
    root = copy_langs(tatoeba_dir, tmp_path / "t", ["ang"])
    side = root / "v1" / "tatoeba.ang-eng.ang"
    lines = side.read_text(encoding="utf-8").splitlines()
    lines[6] = "   "
    side.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_tatoeba(root)
    assert str(err.value) == f"{side} [line 7]: empty line: every line must hold one sentence"


def test_not_utf8(tatoeba_dir, tmp_path):
    root = copy_langs(tatoeba_dir, tmp_path / "t", ["ang"])
    eng = root / "v1" / "tatoeba.ang-eng.eng"
    raw = eng.read_bytes().split(b"\n")
    raw[2] = b"caf\xe9 au lait"  # Latin-1, not UTF-8
    eng.write_bytes(b"\n".join(raw))
    with pytest.raises(DataError) as err:
        read_tatoeba(root)
    assert str(err.value) == f"{eng} [line 3]: not valid UTF-8 (byte 0xe9 at offset 3)"


def test_missing_english_side_and_langs_tsv_mismatch(tatoeba_dir, tmp_path):
    root = copy_langs(tatoeba_dir, tmp_path / "t", ["ang", "cha"])
    (root / "v1" / "tatoeba.cha-eng.eng").unlink()
    with pytest.raises(DataError, match=r"tatoeba.cha-eng.cha: no tatoeba.cha-eng.eng next to it"):
        read_tatoeba(root)
    root = copy_langs(tatoeba_dir, tmp_path / "u", ["ang"])
    tsv = root / "langs.tsv"
    tsv.write_text(tsv.read_text(encoding="utf-8").replace("ang\tno\t134", "ang\tno\t999"), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_tatoeba(root)
    assert str(err.value) == f"{tsv} [line 2]: ang: pairs 999, but its files have 134 lines"
    tsv.write_text("lang\tin_xlmr\tpairs\nang\tmaybe\t134\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"langs.tsv \[line 2\]: in_xlmr must be yes or no, got 'maybe'"):
        read_tatoeba(root)


def test_folder_without_langs_tsv_has_no_groups(tatoeba_dir, tmp_path):
    root = copy_langs(tatoeba_dir, tmp_path / "t", ["ang"], tsv=False)
    b = read_tatoeba(root / "v1")  # the v1 folder itself works too
    assert b.groups == {} and b.counts() == {"ang": 134}
    with pytest.raises(DataError, match="no such directory"):
        read_tatoeba(tmp_path / "nope")
