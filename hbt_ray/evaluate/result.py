"""The scores of one evaluation (:class:`EvalResult`) and how they are written: JSON, a markdown report
and a heatmap of cross-lingual (diagonal: monolingual) scores per language pair.

    >>> r = EvalResult("demo", {"mono_map": 1.0, "cross_map": 0.5},
    ...                mono={"en": {"map": 1.0}, "de": {"map": 1.0}},
    ...                cross={"en→de": {"map": 0.5}, "de→en": {"map": 0.5}})
    >>> r.cross_matrix()
    (['de', 'en'], array([[1. , 0.5],
           [0.5, 1. ]]))
    >>> print(r.to_markdown().splitlines()[0])
    # Evaluation: demo
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hbt_ray.provenance import provenance_lines


@dataclass
class EvalResult:
    """Scores of one evaluation. ``summary`` is flat (``mono_map``, ``cross_map``, ``multi_map``, ``bias``,
    ``mean_map`` and ``{setting}_{metric}``); the tables hold per-language / per-pair values."""

    name: str
    summary: dict[str, float]
    mono: dict[str, dict[str, float]] = field(default_factory=dict)  # lang → metric → value
    cross: dict[str, dict[str, float]] = field(default_factory=dict)  # "x→y" → metric → value
    multi: dict[str, dict[str, float]] = field(default_factory=dict)  # lang → metric (+ bias) → value
    counts: dict[str, Any] = field(default_factory=dict)  # langs, queries / candidates per language, skips
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds
    config: dict[str, Any] = field(default_factory=dict)  # the EvalConfig as data, plus model (and command)

    def to_json(self) -> str:
        """The whole result as JSON (what ``eval.json`` holds)."""
        return json.dumps(asdict(self), indent=1, ensure_ascii=False, default=float)

    def to_markdown(self) -> str:
        """A report: run facts, the summary, per-language / per-pair tables, the cross mAP matrix, timings."""
        lines = [f"# Evaluation: {self.name}", ""]
        lines += run_facts(self.config)
        counts = self.counts.get("queries", {})
        if counts:
            lines.append(
                f"- languages: {', '.join(counts)}; queries {sum(counts.values())}, "
                f"candidates {sum(self.counts.get('candidates', {}).values())}"
            )
        lines += ["", "## Summary", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.summary.items()]
        for title, table in (("mono", self.mono), ("cross", self.cross), ("multi", self.multi)):
            if not table:
                continue
            cols = list(next(iter(table.values())))
            lines += ["", f"## {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [
                f"| {row} | " + " | ".join(f"{v[c]:.4f}" for c in cols) + " |" for row, v in table.items()
            ]
        if self.cross:
            lines += ["", "## cross mAP (rows: query language, columns: candidate language)", ""]
            langs, matrix = self.cross_matrix()
            lines += ["| q \\ c | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
            for lang, row in zip(langs, matrix):
                lines.append(
                    f"| {lang} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in row) + " |"
                )
        if self.timings:
            lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in self.timings.items()]
        return "\n".join(lines) + "\n"

    def cross_matrix(self, metric: str = "map") -> tuple[list[str], np.ndarray]:
        """Sorted languages and ``metric`` per (query language, candidate language); diagonal = mono,
        ``nan`` where a pair was not evaluated."""
        langs = sorted({lang for pair in self.cross for lang in pair.split("→")} | set(self.mono))
        matrix = np.full((len(langs), len(langs)), np.nan)
        for pair, values in self.cross.items():
            x, y = pair.split("→")
            matrix[langs.index(x), langs.index(y)] = values[metric]
        for lang, values in self.mono.items():
            matrix[langs.index(lang), langs.index(lang)] = values[metric]
        return langs, matrix

    def plot_heatmap(self, path: str | Path, metric: str = "map") -> Path:
        """PNG heatmap of cross (and, on the diagonal, mono) ``metric`` per language pair."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        langs, matrix = self.cross_matrix(metric)
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(langs), 0.8 + 0.7 * len(langs)))
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xlabel("candidate language")
        ax.set_ylabel("query language")
        ax.set_title(f"{self.name}: {metric} (diagonal = mono)")
        for i in range(len(langs)):
            for j in range(len(langs)):
                if not np.isnan(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``eval.json``, ``eval.md`` and (with cross) ``cross_map.png`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / "eval.json", "md": out / "eval.md"}
        files["json"].write_text(self.to_json(), encoding="utf-8")
        files["md"].write_text(self.to_markdown(), encoding="utf-8")
        if self.cross:
            files["png"] = self.plot_heatmap(out / "cross_map.png")
        return files


def run_facts(config: dict[str, Any]) -> list[str]:
    """The report's head lines: provenance (command, commit, date, host, model) and the data."""
    if "provenance" in config:
        lines = [provenance_lines(config["provenance"], config.get("model_description"))]
    else:
        lines = [f"- {key}: `{config[key]}`" for key in ("command", "model") if key in config]
    if "data" in config:
        lines.append(f"- data: `{config['data']}`")
    return lines
