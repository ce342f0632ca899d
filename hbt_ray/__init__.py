"""hbt_ray: hybrid batch training of multilingual dense retrievers on Ray.

Data flow, one module per stage: ``data`` (pair groups, eval sets, shards) → ``sampler``
(hybrid batches) → ``trainer`` (Ray Train + DeepSpeed) → ``evaluator`` (FAISS, mono/cross/multi,
language bias) → ``tuner`` (Ray Tune over α and τ).
"""

__version__ = "0.1.0"
