"""The sweep's embedded default (``tune_default.yaml``: e5-small's recipe) cut down for a test: the tiny
model on MLQA-R alone, batches of 32 without GradCache, hard negatives, a data mix, a floor on a
language's groups or a WiSE-FT model of its own — the recipe's levers cost minutes on a tiny model and
a few hundred groups cannot feed them. Tests of those levers set them themselves."""

TINY_SWEEP = [
    "train.model.name=tiny", "train.model.freeze_layers=0", "evaluate_untuned=false",
    "train.data.train=[mlqa-r]", "train.data.limit_groups=200", "train.sampler.source_weights=null",
    "train.sampler.min_lang_groups=null", "train.sampler.batch_size=32", "train.sampler.max_negatives=0",
    "train.loss.grad_cache=false", "train.run.wise_ft=1",
]  # fmt: skip
