import csv

from hbt_ray.tune.report import pareto_front, plot_alpha_tau_heatmap, plot_metrics_vs_alpha, write_table


def _rows():
    rows = []
    for i, (alpha, tau) in enumerate([(0.0, 0.02), (0.5, 0.02), (1.0, 0.02), (0.0, 0.1), (0.5, 0.1), (1.0, 0.1)]):
        rows.append({"trial": f"t{i}", "status": "TERMINATED", "sampler.alpha": alpha, "loss.temperature": tau,
                     "mono_map": 0.5 + 0.1 * alpha, "cross_map": 0.5 - 0.1 * alpha,
                     "multi_map": 0.4 + 0.1 * alpha * (1 - alpha), "bias": 3.0 - alpha, "pairs_per_s": 10})
    rows.append({"trial": "t6", "status": "ERROR", "sampler.alpha": 0.3, "loss.temperature": 0.05,
                 "error": "RuntimeError: injected"})
    return rows


def test_trial_ids_of_digits_stay_ids_in_the_table(tmp_path):
    """Tune's trial ids are '<5 hex>_<5 digits>'; when the hex part is all digits, float() would read
    '29753_00000' as 2975300000 (underscores are legal in Python numbers)."""
    rows = [{"trial": "29753_00000", "status": "TERMINATED", "sampler.alpha": 0.5, "multi_map": 0.41},
            {"trial": "1e300_00001", "status": "TERMINATED", "sampler.alpha": 1.0, "multi_map": 0.4}]
    _, md_path = write_table(rows, tmp_path)
    body = md_path.read_text().splitlines()[2:]
    assert body[0].startswith("| 29753_00000 | TERMINATED | 0.5000 |"), body[0]
    assert body[1].startswith("| 1e300_00001 |"), body[1]


def test_pareto_front_excludes_dominated_and_failed():
    rows = _rows()
    # mono grows with α, cross shrinks: every finished trial at one τ trades off; τ=0.02/0.1 tie
    front = pareto_front(rows, ["mono_map", "cross_map"])
    assert 6 not in front and set(front) == set(range(6))
    assert pareto_front(rows, ["multi_map"]) == [1, 4]
    assert pareto_front(rows, ["bias"], ["min"]) == [2, 5]


def test_table_and_plots(tmp_path):
    rows = _rows()
    csv_path, md_path = write_table(rows, tmp_path)
    with csv_path.open() as f:
        back = list(csv.DictReader(f))
    assert len(back) == 7 and back[6]["status"] == "ERROR" and "injected" in back[6]["error"]
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| trial | status | α | τ | mono mAP")
    assert len(md) == 2 + 7
    # the other swept keys: a column each, after the status, named without their section
    rows[0]["optim.lr"] = 3e-4
    _, md_path = write_table(rows, tmp_path, swept=["sampler.alpha", "optim.lr", "loss.temperature"])
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| trial | status | lr | α | τ | mono mAP") and "| 3.00e-04 |" in md[2]
    paths = plot_metrics_vs_alpha(rows, tmp_path)
    assert {p.name for p in paths} == {"mono_map_vs_alpha.png", "cross_map_vs_alpha.png",
                                      "multi_map_vs_alpha.png", "bias_vs_alpha.png"}
    heat = plot_alpha_tau_heatmap(rows, "multi_map", tmp_path)
    for p in [*paths, heat]:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_optuna_knows_the_finished_trials_and_continues_the_interrupted_one_first():
    """A resume never unpickles Ray's searcher state: Optuna is rebuilt from the JSON trial records."""
    from hbt_ray.config import load_config
    from hbt_ray.tune import TuneConfig
    from hbt_ray.tune.records import resume_plan
    from hbt_ray.tune.space import parse_space
    from hbt_ray.tune.sweep import make_search_alg

    space = parse_space({"search": "optuna", "num_samples": 5,
                         "params": {"sampler.alpha": {"type": "uniform", "low": 0.0, "high": 1.0}}})  # fmt: skip
    records = [
        {"trial": "a", "status": "TERMINATED", "params": {"sampler.alpha": 0.2},
         "metrics": {"final": 1, "eval/multi_map": 0.5}},
        {"trial": "b", "status": "TERMINATED", "params": {"sampler.alpha": 0.9},  # stopped by ASHA
         "metrics": {"step": 4, "eval/multi_map": 0.1}},
        {"trial": "c", "status": "ERROR", "params": {"sampler.alpha": 0.4}, "metrics": {}},
        {"trial": "d", "status": "RUNNING", "params": {"sampler.alpha": 0.7}, "metrics": {}},
    ]  # fmt: skip
    plan = resume_plan(records, space, num_samples=5, seed=0)
    assert (len(plan.done), len(plan.running), plan.new, plan.trials) == (3, 1, 1, 2)
    search = make_search_alg(space, load_config(TuneConfig, None, ["objective=multi_map"]), plan)
    assert search.set_search_properties(None, None, space.param_space())
    told = {t.params["sampler.alpha"]: t for t in search._ot_study.trials if t.state.name != "WAITING"}
    assert {a: t.state.name for a, t in told.items()} == {0.2: "COMPLETE", 0.9: "PRUNED", 0.4: "FAIL"}
    assert told[0.2].value == 0.5 and told[0.9].intermediate_values == {4: 0.1}
    assert search.suggest("t1") == {"sampler.alpha": 0.7, "_resume_run": "d"}
    assert "_resume_run" not in search.suggest("t2")


def test_a_resumed_optuna_does_not_propose_the_first_runs_trials_again():
    """TPE starts with random draws from its seeded generator: a resume must not replay them (it did,
    and round 3 of the recipe sweep ran two of its first trials twice)."""
    from hbt_ray.config import load_config
    from hbt_ray.tune import TuneConfig
    from hbt_ray.tune.records import resume_plan
    from hbt_ray.tune.space import parse_space
    from hbt_ray.tune.sweep import make_search_alg

    space = parse_space({"search": "optuna", "num_samples": 8,
                         "params": {"sampler.alpha": {"type": "uniform", "low": 0.0, "high": 1.0},
                                    "loss.temperature": {"type": "loguniform", "low": 0.003, "high": 0.01}}})  # fmt: skip
    cfg = load_config(TuneConfig, None, ["objective=multi_map"])
    first = make_search_alg(space, cfg)
    assert first.set_search_properties(None, None, space.param_space())
    first_run = [first.suggest(f"t{i}") for i in range(6)]
    records = [{"trial": f"t{i}", "status": "TERMINATED", "params": params,
                "metrics": {"final": 1, "eval/multi_map": 0.5 + i / 100}}
               for i, params in enumerate(first_run[:4])]  # fmt: skip
    resumed = make_search_alg(space, cfg, resume_plan(records, space, num_samples=8, seed=0))
    assert resumed.set_search_properties(None, None, space.param_space())
    proposed = [resumed.suggest(f"r{i}") for i in range(4)]
    assert not any(p in first_run for p in proposed), (proposed, first_run)


def test_a_resumed_random_sweep_continues_the_interrupted_trial_and_draws_only_the_rest():
    from hbt_ray.tune.records import resume_plan
    from hbt_ray.tune.space import parse_space

    space = parse_space({"search": "random", "num_samples": 4,
                         "params": {"sampler.alpha": {"type": "uniform", "low": 0.0, "high": 1.0},
                                    "loss.temperature": {"type": "choice", "values": [0.01, 0.05]}}})  # fmt: skip
    records = [{"trial": "a", "status": "TERMINATED", "params": {"sampler.alpha": 0.2, "loss.temperature": 0.01}},
               {"trial": "b", "status": "RUNNING", "params": {"sampler.alpha": 0.7, "loss.temperature": 0.05}}]
    points = resume_plan(records, space, num_samples=4, seed=0).points
    assert points[0] == {"sampler.alpha": 0.7, "loss.temperature": 0.05, "_resume_run": "b"} and len(points) == 3
    assert all(0 <= p["sampler.alpha"] <= 1 and p["loss.temperature"] in (0.01, 0.05) for p in points[1:])
    assert all(type(p["sampler.alpha"]) is float for p in points)  # plain JSON values, not numpy's
