"""Data that used to give wrong results without a word: shards half-written or lost, sentence breaks that
make every sentence relevant, two files for one language, a mostly-skipped input, an empty result, a
silent download."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

import hbt_ray.data.lareqa as lareqa
from hbt_ray.data.__main__ import main as data_main
from hbt_ray.data.lareqa import download_lareqa, read_lareqa_eval
from hbt_ray.data.records import DataError
from hbt_ray.data.shards import read_manifest
from hbt_ray.evaluate.__main__ import main as evaluate_main
from tests.test_data_bad_input import lareqa_doc, rec, write_jsonl

GOOD = [rec(f"g{i}", query=f"query {i}", passage=f"passage {i}") for i in range(50)]


def _prepare(src: Path, out: Path, *extra: str) -> int:
    return data_main(["prepare", "--source", "pairs", "--in", str(src), "--out", str(out), *extra])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_overwrite_with_bad_input_keeps_the_old_shards(tmp_path, capsys):
    out = tmp_path / "shards"
    assert _prepare(write_jsonl(tmp_path / "good.jsonl", GOOD), out) == 0
    before = read_manifest(out)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD[0]) + "\n{not json\n")
    assert _prepare(broken, out, "--overwrite") == 2
    assert "broken.jsonl [line 2]" in capsys.readouterr().err
    assert read_manifest(out) == before  # the old shards and manifest, untouched
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.parquet"]
    assert _leftovers(tmp_path) == []
    # a complete new result replaces the old one
    assert _prepare(write_jsonl(tmp_path / "fewer.jsonl", GOOD[:7]), out, "--overwrite") == 0
    assert read_manifest(out).groups == 7 and _leftovers(tmp_path) == []


def test_a_failed_first_run_leaves_no_partial_shards(tmp_path, capsys):
    out = tmp_path / "new" / "shards"
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in GOOD) + "{not json\n")
    assert _prepare(broken, out, "--rows-per-shard", "10") == 2  # 5 shards were written before the bad line
    capsys.readouterr()
    assert not out.exists() and _leftovers(out.parent) == []


def test_a_folder_with_other_files_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert _prepare(write_jsonl(tmp_path / "good.jsonl", GOOD), out, "--overwrite") == 2
    assert "holds other files than shards (notes.md)" in capsys.readouterr().err
    assert (out / "notes.md").read_text() == "mine"


def test_skip_bad_has_a_ceiling(tmp_path, capsys):
    latin1 = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in GOOD[:40]]
    latin1.write_bytes(b"".join((line.replace("query", "quéry").encode("latin-1") if i < 29 else line.encode())
                                + b"\n" for i, line in enumerate(lines)))  # fmt: skip
    out = tmp_path / "shards"
    assert _prepare(latin1, out, "--skip-bad") == 2
    err = capsys.readouterr().err
    assert "29 bad records skipped, 72.5% of the input, more than --max-bad-fraction 0.01" in err, err
    assert not out.exists()
    assert _prepare(latin1, out, "--skip-bad", "--max-bad-fraction", "0.8") == 0
    assert read_manifest(out).groups == 11


@pytest.mark.parametrize("case", ["empty-file", "no-record-in-langs", "json-array-skipped"])
def test_a_result_without_groups_is_an_error(tmp_path, capsys, case):
    src = tmp_path / "in.jsonl"
    args: list[str] = []
    if case == "empty-file":
        src.write_text("")
    elif case == "no-record-in-langs":
        write_jsonl(src, GOOD)
        args = ["--langs", "qq"]
    else:
        src.write_text(json.dumps(GOOD) + "\n")  # a JSON array, not JSON lines
        args = ["--skip-bad", "--max-bad-fraction", "1"]
    out = tmp_path / "shards"
    assert _prepare(src, out, *args) == 2
    assert "no pair group to write" in capsys.readouterr().err
    assert not out.exists()


def test_sentence_breaks_must_be_sorted_disjoint_spans_of_the_context(tmp_path):
    d = tmp_path / "lareqa"
    d.mkdir()
    for breaks, why in (([[0, 10**9], [0, 10**9]], "is not a span of the 15-character context"),
                        ([[5, 15], [0, 4]], "after the previous break"),
                        ([[0, 6], [5, 15]], "after the previous break (ending at 6)")):  # fmt: skip
        (d / "en.json").write_text(json.dumps(lareqa_doc(breaks=breaks)))
        with pytest.raises(DataError, match=r"en\.json \[data\[0\]\.paragraphs\[0\]\]: sentence_breaks\[\d\]"):
            read_lareqa_eval(d)
        with pytest.raises(DataError, match=why.replace("(", r"\(").replace(")", r"\)")):
            read_lareqa_eval(d)


def test_two_files_for_one_language_is_an_error(tmp_path):
    d = tmp_path / "lareqa"
    d.mkdir()
    (d / "en.json").write_text(json.dumps(lareqa_doc()))
    with gzip.open(d / "en.json.gz", "wt") as fh:
        fh.write(json.dumps(lareqa_doc(question="Other?")))
    with pytest.raises(DataError, match=r"both en\.json and en\.json\.gz hold language 'en'"):
        read_lareqa_eval(d)


def test_no_silent_download_and_checksums_are_verified(tmp_path, monkeypatch, capsys, shared_data):
    monkeypatch.setenv("HBT_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model", "tiny", "--data", "xquad-r", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "xquad-r is not in the data folder" in err and "--download" in err and err.count("\n") == 1
    # --download fetches the public file and checks its pinned sha256 (served here from a local copy)
    mirror = tmp_path / "mirror" / "xquad-r"
    mirror.mkdir(parents=True)
    shutil.copy(shared_data / "lareqa" / "xquad-r" / "de.json", mirror / "de.json")
    monkeypatch.setattr(lareqa, "LAREQA_URL", (tmp_path / "mirror").as_uri() + "/{name}/{lang}.json")
    files = download_lareqa("xquad-r", ["de"], cache_dir=tmp_path / "cache")
    assert files["de"].read_bytes() == (mirror / "de.json").read_bytes()
    assert "downloading file://" in capsys.readouterr().err
    (mirror / "en.json").write_bytes((mirror / "de.json").read_bytes())  # the wrong content for en
    with pytest.raises(DataError, match=r"en\.json: sha256 [0-9a-f]{64} is not the pinned 7b0954f3"):
        download_lareqa("xquad-r", ["en"], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "lareqa" / "xquad-r" / "en.json").exists()
    with pytest.raises(DataError, match=r"no pinned checksum for xquad-r \['el'\]"):
        download_lareqa("xquad-r", ["el"], cache_dir=tmp_path / "cache")


def test_shards_are_reused_only_for_the_data_they_were_built_from(tmp_path, shared_data):
    """The stale-shards case: a shard folder used to be reused whatever data.train / data.langs /
    data.limit_groups said (mlqa-r en+de limit 7 trained on old 200-group DDTP shards)."""
    import os
    from dataclasses import replace

    from hbt_ray.train.config import DataConfig
    from hbt_ray.train.driver import prepare_shards

    root = tmp_path / "shards"
    ddtp = DataConfig(train=["ddtp"], limit_groups=200, shard_dir=str(root))
    first = prepare_shards(ddtp, tmp_path)
    assert read_manifest(first).groups == 200
    assert prepare_shards(ddtp, tmp_path) == first  # the same data: reused
    mlqa = prepare_shards(DataConfig(train=["mlqa-r"], langs=["en", "de"], limit_groups=7, shard_dir=str(root)),
                          tmp_path)  # fmt: skip
    manifest = read_manifest(mlqa)
    assert mlqa != first and manifest.groups == 7 and set(manifest.pairs_per_lang) == {"de", "en"}
    assert read_manifest(prepare_shards(replace(ddtp, limit_groups=50), tmp_path)).groups == 50
    # the same keys over a changed input file: rebuilt too
    src = write_jsonl(tmp_path / "pairs.jsonl", GOOD[:5])
    pairs = DataConfig(train=[f"pairs:{src}"], shard_dir=str(root))
    before = prepare_shards(pairs, tmp_path)
    write_jsonl(src, GOOD[:6])
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    after = prepare_shards(pairs, tmp_path)
    assert after != before and read_manifest(after).groups == 6 and read_manifest(before).groups == 5


def test_a_language_one_source_lacks_comes_from_the_others(tmp_path, shared_data):
    """data.train=[mlqa-r, ddtp] with data.langs=[en, da]: MLQA-R has no Danish; it gives its English,
    DDTP both (this used to fail in the MLQA-R reader: no file for language 'da')."""
    from hbt_ray.train.config import DataConfig
    from hbt_ray.train.driver import prepare_shards

    data = DataConfig(train=["mlqa-r", "ddtp"], langs=["en", "da"], limit_groups=30, shard_dir=str(tmp_path))
    manifest = read_manifest(prepare_shards(data, tmp_path))
    assert set(manifest.pairs_per_lang) == {"da", "en"}
    assert set(manifest.groups_per_source) == {"mlqa-r", "ddtp"} and manifest.groups == 60
