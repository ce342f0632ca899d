"""The research report, second edition: RQ1 and RQ2 on low-resource languages.

Arms (each with the same recipe; only the sampler differs): the untuned model (the dedicated multilingual
model), X-Y (α = 0), hybrid α ∈ (0, 1), X-X-mono (α = 1) and X-X (monolingual pairs, languages mixed within
a batch: standard multilingual fine-tuning), optionally the per-pair mix. Training sees ``train_langs``
only; the eval sets are never trained on, and their languages fall into groups: seen, unseen, outside
XLM-R. Seeds pair the arms; :mod:`hbt_ray.reproduce.stats` compares them, :mod:`~hbt_ray.reproduce.report`
writes the answers. ``python -m hbt_ray.reproduce --config hbt_ray/configs/reproduce_cpu.yaml``.
"""

from hbt_ray.reproduce.config import ReproduceConfig, arm_alpha, arm_overrides
from hbt_ray.reproduce.report import write_report
from hbt_ray.reproduce.runs import (
    check_records,
    lang_groups,
    load_records,
    run_all,
    run_key,
    run_setup,
    scores,
    train_config,
)
from hbt_ray.reproduce.stats import compare, mean_ci95, paired, sentence, verdict_word

__all__ = [
    "ReproduceConfig",
    "arm_alpha",
    "arm_overrides",
    "check_records",
    "compare",
    "lang_groups",
    "load_records",
    "mean_ci95",
    "paired",
    "run_all",
    "run_key",
    "run_setup",
    "scores",
    "sentence",
    "train_config",
    "verdict_word",
    "write_report",
]
