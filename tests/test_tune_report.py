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
    paths = plot_metrics_vs_alpha(rows, tmp_path)
    assert {p.name for p in paths} == {"mono_map_vs_alpha.png", "cross_map_vs_alpha.png",
                                      "multi_map_vs_alpha.png", "bias_vs_alpha.png"}
    heat = plot_alpha_tau_heatmap(rows, "multi_map", tmp_path)
    for p in [*paths, heat]:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
