"""hbt_ray: hybrid batch training of multilingual dense retrievers on Ray.

Data flow, one package or module per stage, each with its command where it has one:
``data`` (pair groups, eval sets, shards; ``python -m hbt_ray.data``) → ``sampler`` (hybrid batches)
→ ``train`` (Ray Train + DeepSpeed ZeRO; ``python -m hbt_ray.train``) → ``evaluate`` (FAISS,
mono/cross/multi, language bias; ``python -m hbt_ray.evaluate``) → ``tune`` (Ray Tune over α and τ;
``python -m hbt_ray.tune``). Beside them: ``model`` (the dual encoder), ``loss`` (InfoNCE and its
hyperparameters), ``config`` (typed YAML configs) and ``cluster`` (starting Ray).

Imports go one way: config, cluster → data → sampler → model → loss → evaluate → train → tune
(``tests/test_layout.py`` checks it).
"""

__version__ = "0.1.0"
