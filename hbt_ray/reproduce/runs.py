"""Running the experiment: the untuned model once, then every (arm, seed) — seed by seed, so that a partial
grid holds whole seeds to pair — each trained on ``train_langs`` only and scored on every eval set, per
language and per language group. Every run's record is one JSON file, written atomically when the run
is complete; a rerun does only what is missing (resumable over several sessions).

    >>> lang_groups(["deu", "kzj", "hin"], ["de", "en"], {"deu": "inside_xlmr", "kzj": "outside_xlmr",
    ...                                                 "hin": "inside_xlmr"})
    {'deu': 'seen', 'kzj': 'outside_xlmr', 'hin': 'unseen'}
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hbt_ray import storage
from hbt_ray.config import ConfigError, differing_keys, flat, override, to_dict
from hbt_ray.data.records import BitextSet
from hbt_ray.evaluate import EvalConfig, evaluate, load_eval_data
from hbt_ray.provenance import provenance
from hbt_ray.reproduce.config import ISO3_TO_2, UNTUNED, ReproduceConfig, arm_alpha, arm_overrides
from hbt_ray.train import TrainConfig, prepare_shards, train
from hbt_ray.train.runfiles import WHERE_EVAL_KEYS
from hbt_ray.train.runfiles import WHERE_KEYS as RUN_WHERE_KEYS

#: What a record keeps of the run's mix (hbt_ray.train.mix): what the arm really trained on.
MIX_KEYS = ("strategy", "alpha", "pairs", "fallback_pairs", "fallback_share", "pairs_by_lang", "pairs_by_source",
            "excluded_langs")  # fmt: skip


def run_key(arm: str, seed: int) -> str:
    """``hybrid-0.5_seed1``: one run's name (its record and its training run dir); ``untuned`` has no seed."""
    return UNTUNED if arm == UNTUNED else f"{arm}_seed{seed}"


def lang_groups(langs: Sequence[str], train_langs: Sequence[str], bitext_groups: dict[str, str]) -> dict[str, str]:
    """Each language's group: ``seen`` (a training language), else ``outside_xlmr`` (a bitext language
    XLM-R was not pretrained on) or ``unseen``."""
    seen = set(train_langs)
    out = {}
    for lang in langs:
        if ISO3_TO_2.get(lang, lang) in seen:
            out[lang] = "seen"
        else:
            out[lang] = "outside_xlmr" if bitext_groups.get(lang) == "outside_xlmr" else "unseen"
    return out


def train_config(cfg: ReproduceConfig, arm: str, seed: int) -> TrainConfig:
    """One run's training config: the recipe, the arm's sampler, the seed for the model's initial state
    and the data order (the same seed gives every arm the same start: the pairing), training languages."""
    return override(
        cfg.train,
        {
            **arm_overrides(arm),
            "sampler.seed": int(seed),
            "run.seed": int(seed),
            "run.name": run_key(arm, seed),
            "run.storage_path": storage.join(cfg.work(), "runs"),
            "run.export": True,
            "data.langs": list(cfg.train_langs),
            "data.shard_dir": storage.join(cfg.work(), "shards"),
        },
        prefix="train.",
    )


#: The training keys that say where a run writes or how it runs, not what it computes (a record stays
#: valid when they change: a resumed grid on another box), as a training run's resume allows them.
WHERE_KEYS = {f"train.{k}" for k in RUN_WHERE_KEYS}


def run_setup(cfg: ReproduceConfig, arm: str, seed: int) -> dict[str, Any]:
    """What decides one run's numbers, flat (``train.optim.lr``, ``evals.xquad.max_paragraphs``, …): its
    training config (none for ``untuned``) and the eval sets, without :data:`WHERE_KEYS`. A record keeps
    it; a resumed grid reuses a record only when the config still gives the same."""
    setup: dict[str, Any] = {}
    if arm != UNTUNED:
        setup.update(flat(to_dict(train_config(cfg, arm, seed)), "train."))
    setup["train.model.name"] = cfg.train.model.name
    for name, section in cfg.evals.items():
        for key, value in flat(to_dict(section), f"evals.{name}.").items():
            if key.split(".")[2] not in WHERE_EVAL_KEYS:
                setup[key] = value
    return {k: v for k, v in setup.items() if k not in WHERE_KEYS}


def record_files(results: str | Path) -> list[str]:
    """The records (``*.json``) of a results folder, local or in remote storage (:mod:`hbt_ray.storage`)."""
    return [storage.join(results, n) for n in storage.listdir(results) if n.endswith(".json")]


def check_records(cfg: ReproduceConfig, results: str | Path) -> None:
    """Refuse (ConfigError naming the file and the keys) a record that this config would not produce
    again: resuming would mix runs of two setups in one report."""
    seen: dict[tuple[str, int], str] = {}
    for path in record_files(results):
        try:
            record = json.loads(storage.read_text(path))
            arm, seed = record["arm"], record["seed"] or 0
            if not isinstance(record["metrics"], dict):
                raise TypeError("metrics is not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a run record ({err}); move it away") from None
        if (arm, seed) in seen:  # a copy would count its run (and compute hours) twice in the report
            raise ConfigError(f"{path}: the same run ({run_key(arm, seed)}) as {seen[arm, seed]}; move one away")
        seen[arm, seed] = path
        if arm != UNTUNED and arm not in cfg.arms:
            raise ConfigError(f"{path}: arm {arm!r} is not in arms {list(cfg.arms)}; move it away or add the arm")
        # JSON turns tuples into lists: compare what a round trip through it gives
        now = json.loads(json.dumps(run_setup(cfg, arm, seed)))
        then = record.get("setup")
        if then is None:
            raise ConfigError(f"{path}: the record names no setup (made before records kept one); move it away")
        then = {k: v for k, v in then.items() if k not in WHERE_KEYS}  # older records kept a few more
        diff = differing_keys(then, now)
        if diff:
            shown = ", ".join(f"{k}={then.get(k, '(unset)')!r} (now {now.get(k, '(unset)')!r})" for k in diff[:3])
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise ConfigError(f"{path}: made with {shown}{more}; give this config another `out`, or move the "
                              "record away to rerun it")  # fmt: skip


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def scores(model: Any, cfg: ReproduceConfig, eval_sets: dict[str, Any]) -> tuple[dict[str, float], dict]:
    """Score ``model`` on every eval set; → flat metrics (``<eval>/<metric>`` from the summary,
    ``<eval>/<group>/<metric>`` per language group) and each eval set's language groups."""
    metrics: dict[str, float] = {}
    groups: dict[str, dict[str, str]] = {}
    for name, (section, data) in eval_sets.items():
        result = evaluate(model, data, section)
        metrics.update({f"{name}/{k}": float(v) for k, v in result.summary.items() if isinstance(v, (int, float))})
        if isinstance(data, BitextSet):
            per_lang = {"acc": result.accuracy()}
            groups[name] = lang_groups(list(per_lang["acc"]), cfg.train_langs, data.groups)
        else:
            cross: dict[str, list[float]] = {}
            for pair, row in result.cross.items():
                cross.setdefault(pair.split("→")[0], []).append(row["map"])
            per_lang = {
                "mono_map": {lang: row["map"] for lang, row in result.mono.items()},
                "cross_map": {lang: float(np.mean(v)) for lang, v in cross.items()},
                "multi_map": {lang: row["map"] for lang, row in result.multi.items()},
            }
            groups[name] = lang_groups(sorted(data.langs), cfg.train_langs, {})
        for metric, values in per_lang.items():
            for group in sorted(set(groups[name].values())):
                mean = _mean([v for lang, v in values.items() if groups[name].get(lang) == group])
                if mean is not None:
                    metrics[f"{name}/{group}/{metric}"] = mean
    return metrics, groups


def _write(path: str, record: dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(record, indent=1))  # atomic: a killed run leaves no half-written record


def run_all(cfg: ReproduceConfig, out: str | Path) -> list[dict[str, Any]]:
    """The untuned model and every (arm, seed) not already in ``out/results``; → every record there."""
    import ray

    from hbt_ray.cluster import init_ray

    results = storage.join(out, "results")
    check_records(cfg, results)
    todo = [(arm, s) for s in range(cfg.seeds) for arm in [UNTUNED, *cfg.arms] if not (arm == UNTUNED and s)]
    todo = [(arm, s) for arm, s in todo if not storage.exists(storage.join(results, f"{run_key(arm, s)}.json"))]
    total = 1 + len(cfg.arms) * cfg.seeds
    print(f"[reproduce] {len(todo)} runs to do, {total - len(todo)} done ({results})", flush=True)
    if todo:
        first = train_config(cfg, cfg.arms[0], 0)
        prepare_shards(first.data, first.data.shard_dir)  # written once; every run reads them
        eval_sets = {name: (section, load_eval_data(section)) for name, section in cfg.evals.items()}
        started = not ray.is_initialized()
        if started:
            init_ray()
        try:
            for i, (arm, seed) in enumerate(todo, 1):
                record = run_one(cfg, arm, seed, eval_sets)
                _write(storage.join(results, f"{run_key(arm, seed)}.json"), record)
                print(f"[reproduce] {i}/{len(todo)} {run_key(arm, seed)}: train {record['train_s']:.0f} s, "
                      f"eval {record['eval_s']:.0f} s", flush=True)  # fmt: skip
        finally:
            if started:
                ray.shutdown()
    return load_records(results)


def run_one(
    cfg: ReproduceConfig, arm: str, seed: int, eval_sets: dict[str, tuple[EvalConfig, Any]]
) -> dict[str, Any]:
    """Train one arm with one seed (nothing for ``untuned``) and score it; → its record."""
    record: dict[str, Any] = {"arm": arm, "seed": None if arm == UNTUNED else seed, "alpha": arm_alpha(arm, cfg)}
    record["provenance"] = provenance()  # runs of one grid may span sessions (and commits)
    record["setup"] = run_setup(cfg, arm, seed)
    model: Any = cfg.train.model
    t0 = time.perf_counter()
    if arm != UNTUNED:
        result = train(train_config(cfg, arm, seed))
        if result.model_path is None:
            raise RuntimeError(f"{run_key(arm, seed)}: training exported no model")
        model = result.model_path
        record["steps"] = result.steps
        record["mix"] = {k: result.mix.get(k) for k in MIX_KEYS if k in result.mix}
    record["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    record["metrics"], record["groups"] = scores(model, cfg, eval_sets)
    record["eval_s"] = time.perf_counter() - t0
    return record


def load_records(results: str | Path) -> list[dict[str, Any]]:
    """Every complete run's record in ``results`` (the report is built from whatever is there)."""
    return [json.loads(storage.read_text(p)) for p in record_files(results)]
