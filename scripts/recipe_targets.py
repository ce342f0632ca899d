"""How close a fine-tuned model is to the recipe targets of issue 34, from two pairs of committed
evaluations (``python -m hbt_ray.evaluate`` folders: the untuned model's and the candidate's).

    python scripts/recipe_targets.py \\
        --untuned-xquad results/xquad-r_e5-small --xquad results/xquad-r_<recipe> \\
        --untuned-tatoeba results/tatoeba200_e5-small --tatoeba results/tatoeba200_<recipe> \\
        --out results/recipe_targets.md

The targets: on full-pool XQuAD-R, mono mAP ≥ the untuned model's, cross ≥ 0.72, multi ≥ 0.62 and the
language bias ≤ 200; on Tatoeba (its first 200 pairs per language), accuracy outside XLM-R ≥ the untuned
model's + 0.05 and every other group ≥ the untuned model's. Each pair of evaluations must have been made
on the same pool (languages, paragraphs, pairs); a mismatch is one line and exit 2. The table says, per
target, the candidate's value, what it needed and by how much it is over or under.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Report  # noqa: E402

from hbt_ray.config import error_line  # noqa: E402
from hbt_ray.provenance import provenance, provenance_lines  # noqa: E402

TATOEBA_PAIRS = 200
#: the pool keys of an evaluation's config that both sides of a comparison must share
POOL_KEYS = ("data", "langs", "max_paragraphs", "skip_paragraphs", "subset_seed", "max_pairs", "skip_pairs")


class BadEvaluation(ValueError):
    """An input that is not an evaluation, or a pair of evaluations of different pools."""


def fail(message: str) -> NoReturn:
    raise BadEvaluation(message)


@dataclass(frozen=True)
class Target:
    """``key`` of the candidate's summary against ``floor`` (``relative``: the untuned value + floor;
    ``ceiling``: at most, not at least)."""

    label: str
    key: str
    floor: float
    relative: bool = False
    ceiling: bool = False

    def needed(self, untuned: float) -> float:
        return untuned + self.floor if self.relative else self.floor

    def margin(self, value: float, untuned: float) -> float:
        """How far past the target (≥ 0: met)."""
        need = self.needed(untuned)
        return need - value if self.ceiling else value - need


XQUAD_TARGETS = (
    Target("XQuAD-R mono mAP ≥ untuned", "mono_map", 0.0, relative=True),
    Target("XQuAD-R cross mAP ≥ 0.72", "cross_map", 0.72),
    Target("XQuAD-R multi mAP ≥ 0.62", "multi_map", 0.62),
    Target("XQuAD-R language bias ≤ 200", "bias", 200.0, ceiling=True),
)
TATOEBA_TARGETS = (
    Target("Tatoeba outside XLM-R ≥ untuned + 0.05", "tatoeba_outside_xlmr_acc", 0.05, relative=True),
    Target("Tatoeba inside XLM-R ≥ untuned", "tatoeba_inside_xlmr_acc", 0.0, relative=True),
    Target("Tatoeba all languages ≥ untuned", "tatoeba_acc", 0.0, relative=True),
)


def load_eval(folder: str) -> dict[str, Any]:
    """A ``python -m hbt_ray.evaluate`` folder's eval.json (one line and exit 2 when it is not one)."""
    path = Path(folder) / "eval.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(result["summary"], dict) or not isinstance(result["config"], dict):
            raise TypeError("summary and config are not objects")
    except (OSError, ValueError, KeyError, TypeError) as err:
        fail(f"{path}: not an evaluation's eval.json ({err})")
    return result


def check_same_pool(untuned: dict[str, Any], tuned: dict[str, Any], what: str) -> None:
    """Both evaluations scored the same pool, full XQuAD-R or Tatoeba's first 200 pairs (else exit 2)."""
    for key in POOL_KEYS:
        a, b = untuned["config"].get(key), tuned["config"].get(key)
        if key.startswith("skip_"):  # older evaluations have no skip keys: they skipped nothing
            a, b = a or 0, b or 0
        if a != b:
            fail(f"{what}: the evaluations differ in {key} ({a!r} vs {b!r}): not the same pool")
    if untuned.get("counts", {}).get("langs") != tuned.get("counts", {}).get("langs"):
        fail(f"{what}: the evaluations cover different languages")
    config = tuned["config"]
    if what == "xquad" and (config.get("max_paragraphs") or config.get("skip_paragraphs")):
        fail("xquad: the targets are for the full pool (no max_paragraphs, no skip_paragraphs)")
    if what == "tatoeba" and (config.get("max_pairs") != TATOEBA_PAIRS or config.get("skip_pairs")):
        fail(f"tatoeba: the targets are for the first {TATOEBA_PAIRS} pairs per language (--max-pairs 200)")


def rows(targets: tuple[Target, ...], untuned: dict[str, Any], tuned: dict[str, Any]) -> list[list[str]]:
    """Table rows: target, untuned, candidate, needed, margin, met.

    >>> t = (Target("mono ≥ untuned", "mono_map", 0.0, relative=True), Target("bias ≤ 200", "bias", 200, ceiling=True))
    >>> rows(t, {"summary": {"mono_map": 0.8, "bias": 500.0}}, {"summary": {"mono_map": 0.79, "bias": 150.0}})
    [['mono ≥ untuned', '0.8000', '0.7900', '0.8000', '-0.0100', 'no'], ['bias ≤ 200', '500.0', '150.0', '200.0', '+50.0', 'yes']]
    """
    out = []
    for target in targets:
        try:
            base, value = float(untuned["summary"][target.key]), float(tuned["summary"][target.key])
        except (KeyError, TypeError, ValueError):
            fail(f"an evaluation has no number {target.key!r} in its summary")
        margin = target.margin(value, base)
        fmt = "{:.1f}" if target.ceiling else "{:.4f}"
        out.append([target.label, fmt.format(base), fmt.format(value), fmt.format(target.needed(base)),
                    ("+" if margin >= 0 else "") + fmt.format(margin), "yes" if margin >= 0 else "no"])  # fmt: skip
    return out


def source_line(name: str, result: dict[str, Any]) -> str:
    prov = result["config"].get("provenance", {})
    return (f"- {name}: `{result['config'].get('command', '?')}` (commit `{str(prov.get('commit', '?'))[:12]}`, "
            f"{prov.get('date', '?')}); model {result['config'].get('model_description') or result['config'].get('model')}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--untuned-xquad", required=True)
    ap.add_argument("--xquad", required=True, help="the candidate's full-pool XQuAD-R evaluation folder")
    ap.add_argument("--untuned-tatoeba", required=True)
    ap.add_argument(
        "--tatoeba", required=True, help="the candidate's Tatoeba (first 200 pairs) evaluation folder"
    )
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args(argv)
    problem = None
    try:
        evals = {
            name: load_eval(getattr(args, name))
            for name in ("untuned_xquad", "xquad", "untuned_tatoeba", "tatoeba")
        }
        check_same_pool(evals["untuned_xquad"], evals["xquad"], "xquad")
        check_same_pool(evals["untuned_tatoeba"], evals["tatoeba"], "tatoeba")
        table = rows(XQUAD_TARGETS, evals["untuned_xquad"], evals["xquad"])
        table += rows(TATOEBA_TARGETS, evals["untuned_tatoeba"], evals["tatoeba"])
    except BadEvaluation as err:
        problem = err
    if problem is not None:
        return error_line(problem)
    report = Report()
    command = "python scripts/recipe_targets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report.say("# The recipe targets of issue 34: how close the candidate is")
    model = evals["xquad"]["config"].get("model_description") or evals["xquad"]["config"].get("model", "?")
    start = evals["untuned_xquad"]["config"].get("model_description")
    report.say(provenance_lines(provenance(command), f"{model}; the untuned model: {start}"))
    report.say("")
    report.say("From these evaluations:")
    for name, result in evals.items():
        report.say(source_line(name.replace("_", " "), result))
    report.say("")
    report.say("| target | untuned | candidate | needed | margin | met |")
    report.say("|---|---|---|---|---|---|")
    for row in table:
        report.say("| " + " | ".join(row) + " |")
    met = sum(row[-1] == "yes" for row in table)
    report.say("")
    report.say(f"RESULT targets_met={met} targets={len(table)}")
    report.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
