"""hbt_ray.reproduce (the report, second edition): the arms, the pairing over seeds, the verdicts, and the
grid end to end on the tiny preset (resumable, partial grids reported with their missing cells)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from hbt_ray.config import ConfigError, load_config
from hbt_ray.reproduce import (
    ReproduceConfig,
    check_records,
    compare,
    lang_groups,
    paired,
    run_key,
    run_setup,
    train_config,
    verdict_word,
    write_report,
)
from hbt_ray.reproduce.__main__ import main

REPO = Path(__file__).resolve().parents[1]

TINY_YAML = """
arms: [x-y, x-x]
seeds: 2
hybrid_arm: x-y
train_langs: [de, en, es]
evals:
  xquad: {data: xquad-r, langs: [de, en, vi], max_paragraphs: 3, show_progress: false, batch_size: 64}
  tato: {data: tatoeba, langs: [deu, hin, kzj], max_pairs: 20, show_progress: false, batch_size: 64}
train:
  model: {name: tiny}
  sampler: {batch_size: 16, buffer_groups: 64, min_lang_groups: 4}
  data: {train: [ddtp], limit_groups: 400, rows_per_shard: 500}
  optim: {lr: 1.0e-3, warmup_steps: 0, schedule: constant}
  run: {num_workers: 1, cpus_per_worker: 0.5, max_steps: 5, checkpoint_every: 0, progress: false}
"""


def _rec(arm: str, seed: int | None, value: float, group: str = "outside_xlmr") -> dict:
    return {"arm": arm, "seed": seed, "alpha": None, "train_s": 1.0, "eval_s": 1.0,
            "metrics": {f"tato/{group}/acc": value, "tato/seen/acc": value, "xquad/multi_map": value},
            "groups": {}, "provenance": {"commit": "abc"}}  # fmt: skip


def test_paired_difference_is_the_paired_t_interval_and_test():
    arm, base = {0: 0.52, 1: 0.57, 2: 0.53}, {0: 0.50, 1: 0.51, 2: 0.52}
    d = paired(arm, base)
    diffs = [0.02, 0.06, 0.01]
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / math.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.03)
    assert (d["lo"], d["hi"]) == pytest.approx((0.03 - half, 0.03 + half))
    assert d["p"] == pytest.approx(stats.ttest_rel(list(arm.values()), list(base.values())).pvalue)
    # the untuned model has no seed: its one value is every seed's baseline
    one = paired(arm, 0.5)
    assert one["mean"] == pytest.approx(0.04) and one["n"] == 3
    # only the seeds both arms have are paired
    assert paired({0: 0.5, 1: 0.6, 2: 0.7}, {1: 0.5, 2: 0.5})["n"] == 2


def test_verdict_words_follow_the_interval_and_the_metric_direction():
    better = {"n": 3, "mean": 0.02, "lo": 0.01, "hi": 0.03, "p": 0.01}
    unclear = {"n": 3, "mean": 0.02, "lo": -0.01, "hi": 0.05, "p": 0.2}
    assert verdict_word(better, "max") == "better" and verdict_word(better, "min") == "worse"
    assert verdict_word(unclear, "max") == "no detectable difference"
    assert verdict_word({"n": 1, "mean": 0.1, "lo": math.nan, "hi": math.nan, "p": math.nan}, "max").startswith("one seed")


def test_report_states_rq1_and_rq2_from_the_paired_numbers_and_marks_missing_runs(tmp_path):
    cfg = ReproduceConfig(arms=["x-y", "hybrid-0.5", "x-x"], seeds=3, train_langs=["de"])
    records = [_rec("untuned", None, 0.40)]
    for s, jitter in enumerate((0.0, 0.004, -0.004)):
        records += [_rec("hybrid-0.5", s, 0.46 + jitter), _rec("x-x", s, 0.43 + jitter)]
    records += [_rec("x-y", 0, 0.41)]  # seeds 1 and 2 of X-Y not done yet
    summary = write_report(cfg, records, tmp_path, {"command": "python -m hbt_ray.reproduce", "commit": "c",
                                                      "date": "d", "host": {}})  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    rq1 = [s for s in summary["verdicts"]["RQ1"] if "outside_xlmr" in s]
    assert len(rq1) == 1 and rq1[0].startswith("hybrid α=0.5 vs untuned on tato/outside_xlmr/acc: +0.0600")
    assert rq1[0].endswith(": better.")
    rq2 = [s for s in summary["verdicts"]["RQ2"] if s.startswith("tato/outside_xlmr/acc")]
    assert "α=0.5: +0.0300 [" in rq2[0] and "better" in rq2[0] and "α=0: -0.0200 (1 seed)" in rq2[0]
    assert summary["missing"] == ["x-y_seed1", "x-y_seed2"] and "- missing: x-y_seed1, x-y_seed2" in text
    assert "## RQ1" in text and "## RQ2" in text and "| untuned |" in text
    assert (tmp_path / "tato_outside_xlmr_acc.png").read_bytes()[:4] == b"\x89PNG"
    assert compare(records, "x-y", "untuned", "tato/seen/acc")["n"] == 1


def test_arms_are_what_they_claim_and_share_their_seed():
    cfg = load_config(ReproduceConfig, None, ["arms=[x-y,hybrid-0.25,x-x-mono,x-x]", "hybrid_arm=hybrid-0.25"])
    runs = {arm: train_config(cfg, arm, 2) for arm in cfg.arms}
    assert runs["x-x"].sampler.strategy == "x-x" and runs["x-y"].sampler.strategy == "x-y"
    assert runs["hybrid-0.25"].sampler.strategy == "hybrid" and runs["hybrid-0.25"].sampler.alpha == 0.25
    # the pairing: the same seed gives every arm the same initial state and data order
    assert {(r.run.seed, r.sampler.seed) for r in runs.values()} == {(2, 2)}
    assert all(r.data.langs == cfg.train_langs for r in runs.values())
    assert run_key("untuned", 3) == "untuned" and run_key("x-x", 1) == "x-x_seed1"
    assert lang_groups(["deu", "kzj", "hin", "en"], ["de", "en"], {"kzj": "outside_xlmr"}) == {
        "deu": "seen", "kzj": "outside_xlmr", "hin": "unseen", "en": "seen"}  # fmt: skip


def test_a_resumed_grid_refuses_records_of_another_setup(tmp_path):
    cfg = load_config(ReproduceConfig, None, [f"out={tmp_path}"])
    results = tmp_path / "results"
    results.mkdir()
    for arm, seed in (("untuned", None), ("x-y", 1)):
        record = {"arm": arm, "seed": seed, "setup": run_setup(cfg, arm, seed or 0), "metrics": {}}
        (results / f"{run_key(arm, seed or 0)}.json").write_text(json.dumps(record))
    check_records(cfg, results)  # the same config: both records are reused
    # where the runs write and how many CPUs they take do not change a number: still reused
    moved = load_config(ReproduceConfig, None, [f"out={tmp_path}", "work_dir=/elsewhere",
                                                "train.run.torch_threads=7", "evals.xquad.cache_dir=/c"])  # fmt: skip
    check_records(moved, results)
    # what a run computes does: the error names the record and the key, old and new value
    with pytest.raises(ConfigError, match=r"x-y_seed1.json: made with train.optim.lr=2e-05 \(now 0.0002\)"):
        check_records(load_config(ReproduceConfig, None, ["train.optim.lr=2e-4"]), results)
    with pytest.raises(ConfigError, match=r"untuned.json: made with evals.xquad.max_paragraphs=None \(now 10\)"):
        check_records(load_config(ReproduceConfig, None, ["evals.xquad.max_paragraphs=10"]), results)
    with pytest.raises(ConfigError, match=r"x-y_seed1.json: arm 'x-y' is not in arms"):
        check_records(load_config(ReproduceConfig, None, ["arms=[x-x]", "hybrid_arm=x-x"]), results)
    # b5232a8 reported a copy as another run, and a record without metrics failed later in a traceback
    (results / "x-y_seed1 (copy).json").write_text((results / "x-y_seed1.json").read_text())
    with pytest.raises(ConfigError, match=r"x-y_seed1.json: the same run \(x-y_seed1\) as .*copy"):
        check_records(cfg, results)
    (results / "x-y_seed1 (copy).json").unlink()
    record = json.loads((results / "x-y_seed1.json").read_text())
    del record["metrics"]
    (results / "x-y_seed1.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"x-y_seed1.json: not a run record \('metrics'\)"):
        check_records(cfg, results)
    (results / "x-y_seed1.json").write_text("{")
    with pytest.raises(ConfigError, match=r"x-y_seed1.json: not a run record"):
        check_records(cfg, results)


@pytest.mark.parametrize(
    "override, message",
    [("arms=[x-y,hybrid-1.5]", "arms: 'hybrid-1.5': α must be in [0, 1]"),
     ("arms=[x-y,sideways]", "arms: 'sideways' is not one of"),
     ("hybrid_arm=hybrid-0.3", "hybrid_arm: 'hybrid-0.3' is not one of the arms"),
     ("evals.x.data=ddtp", None),
     # keys the grid sets for every run: b5232a8 accepted and dropped them
     ("train.data.langs=[en]", "train.data.langs: every run of the grid gets it from train_langs"),
     ("train.run.seed=7", "train.run.seed: every run of the grid gets it from seeds"),
     ("train.sampler.seed=7", "train.sampler.seed: every run of the grid gets it from seeds")],
)  # fmt: skip
def test_bad_configs_are_one_line_errors_before_anything_runs(tmp_path, capsys, override, message):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"out: {tmp_path / 'out'}\n")
    if message is None:  # an eval set the training data also holds is not zero-shot
        cfg.write_text(f"out: {tmp_path / 'out'}\ntrain: {{data: {{train: [mlqa-r]}}}}\n")
        override, message = "evals.x.data=mlqa-r", "evals.x.data: mlqa-r is in train.data.train: not zero-shot"
    assert main(["--config", str(cfg), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["reproduce_cpu", "reproduce_gpu"])
def test_the_shipped_grids_load(name):
    cfg = load_config(ReproduceConfig, REPO / "hbt_ray" / "configs" / f"{name}.yaml")
    assert {"x-y", "x-x-mono", "x-x", "hybrid-0.5"} <= set(cfg.arms) and cfg.seeds >= 3
    assert cfg.evals["xquad"].max_paragraphs is None  # full pools
    assert name == "reproduce_cpu" or cfg.train.sampler.batch_size == 100
    # this box's grid: the recipe at the length round 3 chose, and the per-pair mix beside the hybrids
    assert name == "reproduce_gpu" or (cfg.train.run.max_steps * cfg.train.sampler.batch_size == 2048 and "hybrid-sample" in cfg.arms)


@pytest.mark.slow
def test_grid_end_to_end_tiny_resumes_and_reports(ray_local, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML + f"out: {tmp_path / 'out'}\nwork_dir: {tmp_path / 'work'}\n")
    assert main(["--config", str(path)]) == 0
    out = tmp_path / "out"
    names = sorted(p.stem for p in (out / "results").glob("*.json"))
    assert names == ["untuned", "x-x_seed0", "x-x_seed1", "x-y_seed0", "x-y_seed1"]
    records = {n: json.loads((out / "results" / f"{n}.json").read_text()) for n in names}
    for n, r in records.items():
        groups = r["groups"]["tato"]
        assert groups == {"deu": "seen", "hin": "unseen", "kzj": "outside_xlmr"}, groups
        assert r["groups"]["xquad"] == {"de": "seen", "en": "seen", "vi": "unseen"}
        for key in ("tato/outside_xlmr/acc", "tato/seen/acc", "xquad/unseen/mono_map", "xquad/multi_map"):
            assert 0.0 <= r["metrics"][key] <= 1.0, (n, key)
        if n != "untuned":  # what the arm trained on: its strategy, the training languages only
            assert r["steps"] == 5 and r["mix"]["strategy"] == n.split("_")[0] and r["mix"]["fallback_share"] == 0
            assert set(r["mix"]["pairs_by_lang"]) <= {"de", "en", "es"} and r["provenance"]["commit"]
    assert records["x-y_seed0"]["metrics"] != records["x-y_seed1"]["metrics"]  # seeds differ
    report = (out / "report.md").read_text()
    assert "x-y vs untuned on tato/outside_xlmr/acc" not in report  # labels, not keys
    assert "X-Y (α=0) vs untuned on tato/outside_xlmr/acc:" in report and "- missing: none" in report
    assert "- command: `python -m hbt_ray.reproduce --config" in report
    # resumable: nothing left to run; the report is rebuilt from the records
    capsys.readouterr()
    assert main(["--config", str(path)]) == 0
    assert "0 runs to do, 5 done" in capsys.readouterr().out
    assert main(["--config", str(path), "--report-only"]) == 0
    # a changed recipe is not resumed into the same report: exit 2, one line, every record kept
    capsys.readouterr()
    for extra in ([], ["--report-only"]):
        assert main(["--config", str(path), "train.optim.lr=0.002", *extra]) == 2
        err = capsys.readouterr().err
        assert "_seed0.json: made with train.optim.lr=0.001 (now 0.002)" in err and err.count("\n") == 1, err
    assert sorted(p.stem for p in (out / "results").glob("*.json")) == names
