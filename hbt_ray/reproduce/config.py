"""The reproduce section: the recipe every arm trains with, the arms, seeds, the declared training languages
and the evaluation sets (never trained on), each split into language groups.

    >>> cfg = ReproduceConfig(arms=["x-y", "hybrid-0.5", "x-x"], train_langs=["en", "de"])
    >>> arm_overrides("hybrid-0.25"), arm_overrides("x-x"), arm_alpha("x-x-mono", cfg)
    ({'sampler.strategy': 'hybrid', 'sampler.alpha': 0.25}, {'sampler.strategy': 'x-x'}, 1.0)
    >>> ReproduceConfig(arms=["hybrid-2"]).validate()
    Traceback (most recent call last):
    ...
    hbt_ray.config.ConfigError: arms: 'hybrid-2': α must be in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hbt_ray.config import ConfigError
from hbt_ray.evaluate import EvalConfig
from hbt_ray.train import TrainConfig

#: Arms that are one sampler strategy each (``hybrid-<α>`` is the hybrid at that α).
STRATEGY_ARMS = ("x-y", "x-x-mono", "x-x", "hybrid-sample")
#: The model before any training: evaluated once (no seed), every arm's first baseline (RQ1).
UNTUNED = "untuned"
#: Standard multilingual fine-tuning: languages mixed within a batch (RQ2's baseline).
STANDARD = "x-x"

#: ISO 639-3 (Tatoeba) → the two-letter codes of the training data (DDTP, LAReQA), for the languages
#: where one exists: a Tatoeba language is "seen" when its code here is one of ``train_langs``.
ISO3_TO_2 = {
    "afr": "af", "ara": "ar", "bel": "be", "bos": "bs", "bul": "bg", "ces": "cs", "cym": "cy", "dan": "da",
    "deu": "de", "ell": "el", "epo": "eo", "eus": "eu", "fin": "fi", "fra": "fr", "gla": "gd", "glg": "gl",
    "hin": "hi", "hrv": "hr", "hun": "hu", "ind": "id", "ita": "it", "jpn": "ja", "kaz": "kk", "kor": "ko",
    "lat": "la", "lvs": "lv", "mar": "mr", "mon": "mn", "nld": "nl", "nno": "nn", "nob": "nb", "pes": "fa",
    "pol": "pl", "por": "pt", "ron": "ro", "rus": "ru", "slk": "sk", "slv": "sl", "spa": "es", "sqi": "sq",
    "srp": "sr", "swe": "sv", "tam": "ta", "tgl": "tl", "tur": "tr", "ukr": "uk", "uzb": "uz", "vie": "vi",
    "xho": "xh", "zsm": "ms", "cmn": "zh",
}  # fmt: skip


def arm_overrides(arm: str) -> dict[str, Any]:
    """The sampler keys an arm sets on the recipe (``untuned`` trains nothing: no keys)."""
    if arm == UNTUNED:
        return {}
    if arm.startswith("hybrid-") and arm != "hybrid-sample":
        return {"sampler.strategy": "hybrid", "sampler.alpha": float(arm.removeprefix("hybrid-"))}
    if arm in STRATEGY_ARMS:
        return {"sampler.strategy": arm}
    raise ConfigError(f"arms: {arm!r} is not one of {UNTUNED}, hybrid-<α>, {', '.join(STRATEGY_ARMS)}")


def arm_alpha(arm: str, cfg: ReproduceConfig) -> float | None:
    """Where the arm sits on the α axis (share of monolingual batches): X-Y 0, X-X-mono 1, the hybrids
    their α, the per-pair mix the recipe's α; X-X and the untuned model are not on it (None)."""
    if arm == "x-y":
        return 0.0
    if arm == "x-x-mono":
        return 1.0
    if arm == "hybrid-sample":
        return cfg.train.sampler.alpha
    if arm.startswith("hybrid-"):
        return float(arm.removeprefix("hybrid-"))
    return None


@dataclass
class ReproduceConfig:
    """The experiment: ``train`` is the recipe (every arm changes only its sampler strategy / α), ``evals``
    the sets every model is scored on (name → eval section), ``train_langs`` what training may see."""

    train: TrainConfig = field(default_factory=TrainConfig)
    arms: list[str] = field(
        default_factory=lambda: ["x-y", "hybrid-0.25", "hybrid-0.5", "hybrid-0.75", "x-x-mono", "x-x"]
    )
    seeds: int = 3
    #: the training languages (codes of the training data); every other language is zero-shot
    train_langs: list[str] = field(default_factory=lambda: ["en", "de", "es", "fr", "it", "ru", "zh"])
    evals: dict[str, EvalConfig] = field(default_factory=lambda: {"xquad": EvalConfig(data="xquad-r")})
    #: the hybrid arm RQ1 asks about, declared before the runs (choosing the best α afterwards would
    #: report the luckiest of several draws)
    hybrid_arm: str = "hybrid-0.5"
    out: str = "results/reproduce"
    #: shards and training runs (GBs of checkpoints and models): never under ``out``, which holds the
    #: records and the report (written by this driver alone); default ``runs/reproduce/<name of out>``.
    #: A URI (s3://…) or shared mount on a cluster: the training workers and evaluators read it
    work_dir: str | None = None

    def work(self) -> str:
        """``work_dir`` as a storage location (:mod:`hbt_ray.storage`): a URI, or an absolute path."""
        from hbt_ray import storage

        return storage.resolve(self.work_dir or Path("runs") / "reproduce" / Path(self.out).name)

    def validate(self) -> None:
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"arms: give each arm once, got {self.arms}")
        for arm in self.arms:
            if arm == UNTUNED:
                raise ConfigError(f"arms: {UNTUNED} is always evaluated (once, it has no seed): drop it")
            if arm.startswith("hybrid-") and arm != "hybrid-sample":
                try:
                    alpha = float(arm.removeprefix("hybrid-"))
                except ValueError:
                    raise ConfigError(f"arms: {arm!r}: α must be a number") from None
                if not 0.0 <= alpha <= 1.0:
                    raise ConfigError(f"arms: {arm!r}: α must be in [0, 1]")
            arm_overrides(arm)  # an unknown name is an error
        if self.hybrid_arm not in self.arms:
            raise ConfigError(f"hybrid_arm: {self.hybrid_arm!r} is not one of the arms {self.arms}")
        if self.seeds < 1:
            raise ConfigError(f"seeds: must be >= 1, got {self.seeds}")
        if not self.train_langs:
            raise ConfigError("train_langs: name the languages training may see")
        if not self.evals:
            raise ConfigError("evals: name at least one eval set")
        check_grid_decides(self.train)
        for name, section in self.evals.items():
            if section.data in self.train.data.train:
                raise ConfigError(f"evals.{name}.data: {section.data} is in train.data.train: not zero-shot")


#: Training keys the grid sets for every run itself (:func:`hbt_ray.reproduce.runs.train_config`), and
#: the setting that decides them instead: a value given for one of them would be dropped without a word.
GRID_DECIDES = {"data.langs": "train_langs", "run.seed": "seeds", "sampler.seed": "seeds",
                "run.name": "arms and seeds", "run.storage_path": "work_dir", "data.shard_dir": "work_dir",
                "run.export": "the grid (every run is exported)"}  # fmt: skip


def check_grid_decides(train: TrainConfig) -> None:
    """Refuse, naming the key and what sets it, a ``train.`` key the grid replaces for every run."""
    from hbt_ray.config import flat, to_dict

    given, default = flat(to_dict(train)), flat(to_dict(TrainConfig()))
    for key, setter in GRID_DECIDES.items():
        if given[key] != default[key]:
            raise ConfigError(f"train.{key}: every run of the grid gets it from {setter}, not from "
                              f"{given[key]!r}: drop it")  # fmt: skip
