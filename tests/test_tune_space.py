from pathlib import Path

import pytest

from hbt_ray.tune.space import SpaceError, load_space, parse_space, resolve_space_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["ratio_temperature", "paper_grid", "quick", "recipe_round3"])
def test_shipped_spaces_load(name):
    space = load_space(ROOT / "tune_spaces" / f"{name}.yaml")
    assert "sampler.alpha" in space.params
    domains = space.param_space()
    assert set(domains) == set(space.params)


def test_paper_grid_has_both_baselines():
    space = load_space(ROOT / "tune_spaces" / "paper_grid.yaml")
    alphas = space.params["sampler.alpha"].values
    assert alphas[0] == 0.0 and alphas[-1] == 1.0 and len(alphas) == 11
    assert space.fixed["loss.temperature"] == 0.05


def test_ratio_temperature_is_optuna_loguniform():
    space = load_space(ROOT / "tune_spaces" / "ratio_temperature.yaml")
    assert space.search == "optuna"
    tau = space.params["loss.temperature"]
    assert (tau.type, tau.low, tau.high) == ("loguniform", 0.01, 0.2)


@pytest.mark.parametrize(
    "text, match",
    [
        ("search: bayes\nparams: {a: {type: grid, values: [1]}}", r"search: 'bayes' is not one of"),
        ("params: {sampler.alpha: {type: uniform, low: 1, high: 0}}\nsearch: random", r"params.sampler.alpha: low"),
        ("search: random\nparams: {loss.temperature: {type: loguniform, low: 0, high: 1}}", r"loguniform needs low > 0"),
        ("search: grid\nparams: {a: {type: uniform, low: 0, high: 1}}", r"params.a.type: search: grid"),
        ("search: random\nparams: {a: {type: uniform, low: 0, hi: 1}}", r"params.a.hi: unknown field"),
        ("search: grid\nnum_sample: 3\nparams: {a: {type: grid, values: [1]}}", r"num_sample: unknown key"),
        ("search: grid\nparams: {a: {type: grid, values: []}}", r"params.a.values: expected a non-empty list"),
        ("search: [grid", r"invalid YAML"),
    ],
)
def test_bad_space_files_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=match) as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_missing_file():
    with pytest.raises(SpaceError, match="no such search-space file"):
        load_space("/nonexistent/space.yaml")


def test_parse_space_docstring_example():
    space = parse_space({"search": "grid", "params": {"x": {"type": "grid", "values": [0, 1]}}})
    assert space.num_samples == 1 and space.scheduler == "none"


def test_a_space_is_found_by_path_or_by_name():
    by_name = resolve_space_path("paper_grid").resolve()
    assert by_name == ROOT / "tune_spaces" / "paper_grid.yaml"  # the package's link to the top-level folder
    assert resolve_space_path("tune_spaces/paper_grid.yaml").resolve() == by_name
    assert resolve_space_path("nonexistent") == Path("nonexistent")


@pytest.mark.slow
def test_an_installed_package_finds_its_spaces_and_configs_from_any_directory(tmp_path):
    """pip install . (not editable) into a fresh folder; from outside the repo the shipped spaces and
    configs are found by name in the installed package, and the drivers start."""
    import subprocess
    import sys

    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)  # fmt: skip
    code = (
        "import hbt_ray, pathlib\n"
        "from hbt_ray.tune.space import load_space, resolve_space_path\n"
        "from hbt_ray.config import load_config\n"
        "from hbt_ray.train import TrainConfig\n"
        f"assert pathlib.Path(hbt_ray.__file__).is_relative_to(pathlib.Path(r'{target}'))\n"
        "path = resolve_space_path('quick')\n"
        "print(path, load_space(path).swept_keys)\n"
        "print(load_config(TrainConfig, 'hbt_ray/configs/train_tiny.yaml').model.name)\n"
    )  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.splitlines()
    assert first.startswith(str(target / "hbt_ray" / "tune_spaces" / "quick.yaml")) and "sampler.alpha" in first
    assert second == "tiny"
    for driver in ("hbt_ray.tune", "hbt_ray.train", "hbt_ray.evaluate"):
        proc = subprocess.run([sys.executable, "-m", driver, "--help"], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0 and "usage:" in proc.stdout, (driver, proc.stderr[-2000:])


def test_round_three_sweep_checks_and_sets_both_source_weights():
    """The round-3 config passes the driver's checks, and a trial's searched MLQA-R weight merges with the
    space's fixed DDTP weight into one sampler.source_weights (not one replacing the other)."""
    from hbt_ray.config import load_config
    from hbt_ray.tune.checks import check_sweep, trial_train_config
    from hbt_ray.tune.config import TuneConfig

    cfg = load_config(TuneConfig, ROOT / "hbt_ray" / "configs" / "tune_recipe_round3.yaml", [])
    space, base = check_sweep(cfg)
    assert cfg.objectives == ["mean_map", "tatoeba/tatoeba_outside_xlmr_acc"]
    assert cfg.extra_evals["tatoeba"].skip_pairs == 200 and cfg.train.eval.skip_paragraphs == 30
    trial = trial_train_config(cfg, {**space.fixed, "sampler.source_weights.mlqa-r": 4, "sampler.batch_size": 512})
    assert trial.sampler.source_weights == {"ddtp": 1.0, "mlqa-r": 4}
    assert trial.loss.grad_cache and trial.data.lareqa_negatives == 3 and trial.run.pairs is None
