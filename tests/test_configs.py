"""The e5-small recipe lives in one file (hbt_ray/configs/recipe_e5_small.yaml); the shipped configs that
train e5-small build on it with ``base:`` and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hbt_ray.config import CONFIGS_DIR, ConfigError, flat, load_config, read_yaml, to_dict
from hbt_ray.reproduce import ReproduceConfig
from hbt_ray.train import TrainConfig
from hbt_ray.tune import TuneConfig
from hbt_ray.tune.space import load_space, resolve_space_path

RECIPE = flat(read_yaml(CONFIGS_DIR / "recipe_e5_small.yaml"))
#: where a shipped config departs from the recipe on purpose, and why
DELIBERATE: dict[tuple[str, str], str] = {}


def _train_sections() -> dict[str, TrainConfig]:
    return {
        "train_e5_small": load_config(TrainConfig, CONFIGS_DIR / "train_e5_small.yaml"),
        "tune_default": load_config(TuneConfig, CONFIGS_DIR / "tune_default.yaml").train,
        "reproduce_cpu": load_config(ReproduceConfig, CONFIGS_DIR / "reproduce_cpu.yaml").train,
    }


def test_every_e5_small_config_trains_with_the_one_recipe():
    disagreements = []
    for name, train in _train_sections().items():
        values = flat(to_dict(train))
        for key, value in RECIPE.items():
            if values[key] != value and (name, key) not in DELIBERATE:
                disagreements.append(f"{name}: {key} = {values[key]!r}, the recipe says {value!r}")
    assert not disagreements, disagreements
    # and none of them restates a recipe key (a copy is the next drift)
    for name in ("train_e5_small", "tune_default", "reproduce_cpu"):
        data = read_yaml(CONFIGS_DIR / f"{name}.yaml")
        section = data if name.startswith("train") else data["train"]
        stated = {k for k in flat({k: v for k, v in section.items() if k != "base"})}
        assert not [k for k in stated & set(RECIPE) if (name, k) not in DELIBERATE], name


def test_the_demo_space_fixes_only_what_the_demo_varies():
    space = load_space(resolve_space_path("quick"))
    assert set(space.params) == {"sampler.alpha"}
    assert {k: v for k, v in space.fixed.items() if k in RECIPE} == {"sampler.strategy": RECIPE["sampler.strategy"]}


def test_a_base_is_merged_first_and_errors_name_the_file(tmp_path: Path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: recipe_e5_small.yaml\noptim: {lr: 1.0e-4}\nrun: {max_steps: 7}\n")
    cfg = load_config(TrainConfig, mine, ["loss.temperature=0.01"])
    assert (cfg.optim.lr, cfg.run.max_steps, cfg.loss.temperature) == (1e-4, 7, 0.01)
    assert cfg.model.freeze_layers == RECIPE["model.freeze_layers"]  # from the shipped recipe, by name
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: base: loop\.yaml includes itself"):
        load_config(TrainConfig, loop)
    missing = tmp_path / "missing.yaml"
    missing.write_text("train:\n  base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: no such config file"):
        load_config(TuneConfig, missing)


def test_the_own_pairs_config_is_the_recipe_without_its_data_mix():
    own = to_dict(load_config(TrainConfig, CONFIGS_DIR / "train_own_pairs.yaml"))
    e5 = to_dict(load_config(TrainConfig, CONFIGS_DIR / "train_e5_small.yaml"))
    differ = {f"{s}.{k}" for s in e5 for k in e5[s] if own[s][k] != e5[s][k]}
    assert differ == {"sampler.source_weights", "sampler.min_lang_groups", "data.lareqa_negatives"}
    assert own["sampler"]["source_weights"] is None and own["data"]["lareqa_negatives"] == 0
