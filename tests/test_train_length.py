"""A run's length in data terms: the driver says how many passes over the data its steps make,
``run.epochs`` sets the length in passes instead of steps, ``run.pairs`` in training pairs."""

from __future__ import annotations

import pytest

from hbt_ray.config import ConfigError, load_config
from hbt_ray.data.records import Pair, PairGroup
from hbt_ray.data.shards import write_shards
from hbt_ray.train import TrainConfig
from hbt_ray.train.driver import check_inputs
from hbt_ray.train.runfiles import run_setup


def _manifest(tmp_path, groups=40):
    data = [PairGroup(f"g{i}", "demo", {"en": Pair(f"q{i}", f"p{i}"), "de": Pair(f"f{i}", f"t{i}")})
            for i in range(groups)]  # fmt: skip
    return write_shards(data, tmp_path / "shards", rows_per_shard=10, progress=False)


def test_the_driver_says_how_many_passes_and_epochs_set_the_steps(tmp_path, capsys):
    manifest = _manifest(tmp_path)  # 40 groups, batches of 8: one pass is 5 steps
    common = ["sampler.batch_size=8", "sampler.buffer_groups=16", "sampler.min_lang_groups=1", "run.num_workers=1"]
    cfg = load_config(TrainConfig, None, [*common, "run.max_steps=12"])
    assert check_inputs(cfg, manifest, tmp_path / "shards") == pytest.approx(2.4)
    assert "12 steps of 8 pairs = 2.40 passes over 40 groups (one pass: 5 steps" in capsys.readouterr().err
    cfg = load_config(TrainConfig, None, [*common, "run.epochs=3"])
    setup_before = run_setup(cfg)
    assert check_inputs(cfg, manifest, tmp_path / "shards") == 3.0 and cfg.run.max_steps == 15
    assert "run.epochs=3" in capsys.readouterr().err
    # the setup a resume is checked against does not hold the computed steps: the same command resumes
    assert run_setup(cfg) == setup_before and "run.max_steps" not in setup_before
    with pytest.raises(ConfigError, match=r"run\.epochs: must be finite and > 0, got 0"):
        load_config(TrainConfig, None, ["run.epochs=0"])


def test_run_pairs_gives_runs_with_different_batch_sizes_the_same_pairs(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    common = ["sampler.buffer_groups=16", "sampler.min_lang_groups=1", "run.num_workers=1", "run.pairs=100"]
    steps = {}
    for batch, accum in ((4, 1), (8, 1), (4, 2)):
        cfg = load_config(TrainConfig, None, [*common, f"sampler.batch_size={batch}", f"optim.grad_accum={accum}"])
        setup_before = run_setup(cfg)
        check_inputs(cfg, manifest, tmp_path / "shards")
        steps[batch, accum] = cfg.run.max_steps
        assert run_setup(cfg) == setup_before and "run.max_steps" not in setup_before
    # an optimizer step takes batch_size x grad_accum pairs; the last step is whole (100 / 8 -> 13 steps)
    assert steps == {(4, 1): 25, (8, 1): 13, (4, 2): 13}
    with pytest.raises(ConfigError, match=r"run\.pairs: must be >= 1, got 0"):
        load_config(TrainConfig, None, ["run.pairs=0"])
    with pytest.raises(ConfigError, match=r"run\.pairs: 100 and epochs: 2 both set the run's length; set one"):
        load_config(TrainConfig, None, ["run.pairs=100", "run.epochs=2"])


def test_a_length_on_the_command_line_beats_the_configs_length(tmp_path):
    from hbt_ray.train.__main__ import length_from_the_command_line, main

    base = tmp_path / "base.yaml"
    base.write_text("run:\n  epochs: 8\n")
    overrides, notice = length_from_the_command_line(str(base), ["run.max_steps=40"])
    assert notice == "run.max_steps=40 from the command line replaces the config's run.epochs=8"
    cfg = load_config(TrainConfig, base, overrides)
    assert (cfg.run.epochs, cfg.run.max_steps) == (None, 40)
    # pairs typed over a config's epochs (which validation would otherwise refuse as two lengths)
    overrides, notice = length_from_the_command_line(str(base), ["run.pairs=640"])
    cfg = load_config(TrainConfig, base, overrides)
    assert (cfg.run.epochs, cfg.run.pairs) == (None, 640) and notice.endswith("run.epochs=8")
    # the shipped e5-small config sets pairs: epochs typed replaces them
    shipped = "hbt_ray/configs/train_e5_small.yaml"
    overrides, notice = length_from_the_command_line(shipped, ["run.epochs=4"])
    cfg = load_config(TrainConfig, shipped, overrides)
    assert (cfg.run.epochs, cfg.run.pairs) == (4, None) and "replaces the config's run.pairs=" in notice
    # nothing typed, or only a null: the file's length stands
    assert length_from_the_command_line(str(base), ["optim.lr=1e-4"]) == (["optim.lr=1e-4"], None)
    assert length_from_the_command_line(str(base), ["run.epochs=null", "run.max_steps=4"])[1]
    # a later null takes an earlier length back (a command with test-sized settings appended)
    overrides, _ = length_from_the_command_line(shipped, ["run.epochs=4", "run.epochs=null", "run.max_steps=4"])
    cfg = load_config(TrainConfig, shipped, overrides)
    assert (cfg.run.epochs, cfg.run.pairs, cfg.run.max_steps) == (None, None, 4)
    both = ["run.max_steps=40", "run.epochs=2"]
    with pytest.raises(ConfigError, match="run.max_steps and run.epochs both set the run's length"):
        length_from_the_command_line(str(base), both)
    assert main(["--config", str(base), *both]) == 2  # one error line, before Ray starts
