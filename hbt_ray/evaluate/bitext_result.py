"""The scores of one bitext evaluation (:class:`BitextResult`) and how they are written: JSON, a markdown
report, and a PNG of accuracy per language (sorted, coloured by group; a reference result, e.g. the
untuned model, side by side).

    >>> r = BitextResult("demo", {"tatoeba_acc": 0.75},
    ...                  {"deu": {"to_eng": {"accuracy": 1.0, "f1": 1.0},
    ...                           "from_eng": {"accuracy": 0.5, "f1": 0.4}}},
    ...                  groups={"deu": "inside_xlmr"})
    >>> r.accuracy()
    {'deu': 0.75}
    >>> BitextResult.from_json(r.to_json()).per_lang == r.per_lang
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hbt_ray.evaluate.result import run_facts

#: Bar colours per group of langs.tsv; a language in no group is grey.
GROUP_COLOURS = {"inside_xlmr": "tab:blue", "outside_xlmr": "tab:orange", None: "tab:gray"}


@dataclass
class BitextResult:
    """Scores of one bitext evaluation. ``summary`` is flat (:func:`hbt_ray.evaluate.bitext.summarize`);
    ``per_lang[lang][direction][metric]`` with direction ``to_eng`` / ``from_eng`` and MTEB's metric
    names; ``pooled`` holds the pooled variant (``per_lang``, ``wrong_top1``, ``absorbed``, …)."""

    name: str
    summary: dict[str, float]
    per_lang: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    pooled: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # lang → inside_xlmr / outside_xlmr
    counts: dict[str, Any] = field(default_factory=dict)  # langs, pairs per language
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the EvalConfig as data, plus model (and command)
    kind: str = "bitext"  # tells a reader of eval.json which result it holds

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False, default=float)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> BitextResult:
        """A result from its JSON text or an ``eval.json`` path (e.g. the untuned model's, as a reference)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        data = json.loads(text)
        if data.get("kind") != "bitext":
            raise ValueError(f"{str(text_or_path)[:80]}: not a bitext result (kind {data.get('kind')!r})")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def accuracy(self) -> dict[str, float]:
        """Per language, the mean of both directions' accuracy (what ``tatoeba_acc`` averages)."""
        return {
            lang: (d["to_eng"]["accuracy"] + d["from_eng"]["accuracy"]) / 2
            for lang, d in self.per_lang.items()
        }

    def to_markdown(self, reference: BitextResult | None = None) -> str:
        """Run facts, the summary, per-language table (both directions, pooled), the absorbing languages."""
        lines = [f"# Bitext evaluation: {self.name}", ""]
        lines += run_facts(self.config)
        pairs = self.counts.get("pairs", {})
        if pairs:
            lines.append(f"- languages: {len(pairs)}; pairs {sum(pairs.values())}")
        if reference is not None:
            lines.append(f"- reference: `{reference.config.get('model', reference.name)}` (column `ref acc`)")
        lines += ["", "## Summary", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.summary.items()]
        ref = reference.accuracy() if reference is not None else {}
        head = "| lang | group | pairs | acc | " + ("ref acc | " if ref else "")
        head += "to_eng accuracy | to_eng f1 | from_eng accuracy | from_eng f1 | "
        head += "pooled accuracy | pooled mrr@10 |"
        lines += ["", "## Per language (sorted by acc)", "", head, "|---" * (head.count("|") - 1) + "|"]
        pooled = self.pooled.get("per_lang", {})
        for lang, acc in sorted(self.accuracy().items(), key=lambda t: -t[1]):
            d = self.per_lang[lang]
            cells = [lang, self.groups.get(lang, "-"), str(pairs.get(lang, "")), f"{acc:.4f}"]
            if ref:
                cells.append(f"{ref[lang]:.4f}" if lang in ref else "")
            cells += [f"{d[x][m]:.4f}" for x in ("to_eng", "from_eng") for m in ("accuracy", "f1")]
            p = pooled.get(lang, {})
            cells += [f"{p[m]:.4f}" if m in p else "" for m in ("accuracy", "mrr@10")]
            lines.append("| " + " | ".join(cells) + " |")
        absorbed = self.pooled.get("absorbed_from_other_langs", {})
        if absorbed:
            lines += ["", "## Pooled: languages that absorb other languages' wrong top-1 hits", ""]
            lines += ["| lang | wrong hits from other languages | all wrong hits |", "|---|---|---|"]
            lines += [f"| {m} | {c} | {self.pooled['absorbed'].get(m, 0)} |" for m, c in absorbed.items()]
        if self.timings:
            lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in self.timings.items()]
        return "\n".join(lines) + "\n"

    def plot_accuracy(self, path: str | Path, reference: BitextResult | None = None) -> Path:
        """Bars of per-language accuracy, sorted, coloured by group; with ``reference``, its bars (hatched,
        pale) beside this result's."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        acc = self.accuracy()
        ref = reference.accuracy() if reference is not None else {}
        langs = sorted(acc, key=lambda lang: -acc[lang])
        colours = [GROUP_COLOURS.get(self.groups.get(lang), "tab:gray") for lang in langs]
        fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.28 * len(langs) * (2 if ref else 1)), 4.0))
        xs = list(range(len(langs)))
        width = 0.4 if ref else 0.8
        if ref:
            ax.bar([x - width / 2 for x in xs], [ref.get(lang, 0.0) for lang in langs], width, color=colours,
                   alpha=0.4, hatch="//", edgecolor="black", linewidth=0.3)  # fmt: skip
        ax.bar(
            [x + (width / 2 if ref else 0) for x in xs], [acc[lang] for lang in langs], width, color=colours
        )
        ax.set_xticks(xs, langs, rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (mean of both directions)")
        ax.set_title(f"{self.name}: nearest-neighbour accuracy per language")
        handles = [
            Patch(color=c, label=g) for g, c in GROUP_COLOURS.items() if g in set(self.groups.values())
        ]
        if any(lang not in self.groups for lang in langs):
            handles.append(Patch(color=GROUP_COLOURS[None], label="no group"))
        if ref:
            ref_name = reference.config.get("model", reference.name)  # type: ignore[union-attr]
            handles += [Patch(facecolor="white", edgecolor="black", hatch="//", label=f"reference: {ref_name}"),
                        Patch(facecolor="black", label=f"this: {self.config.get('model', self.name)}")]  # fmt: skip
        ax.legend(handles=handles, fontsize=7, loc="upper right")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, out_dir: str | Path, reference: BitextResult | None = None) -> dict[str, Path]:
        """``eval.json``, ``eval.md`` and ``accuracy_per_lang.png`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / "eval.json", "md": out / "eval.md"}
        files["json"].write_text(self.to_json(), encoding="utf-8")
        files["md"].write_text(self.to_markdown(reference), encoding="utf-8")
        files["png"] = self.plot_accuracy(out / "accuracy_per_lang.png", reference)
        return files
