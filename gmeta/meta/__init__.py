"""The meta-learning algorithms, pure functions that never communicate.

Each is a function of (dense head, looked-up rows, batch, layout).
``gmeta.meta.algorithms.ALGORITHMS`` maps ``meta.algorithm`` to each one's objective,
``(model, rows, batch, layout, cfg) -> MetaOutput``; a new algorithm is one module with an
``objective`` and one entry there (and in ``MetaConfig.algorithm``).

- ``base``: ``MetaOutput`` and the gathers and per-task means losses are made of
- ``fast_weights``: per-task fast weights of the adapted dense layers
- ``maml``: MAML / first-order MAML / Meta-SGD (inner loop, query loss)
- ``erm``: the plain-training baseline
- ``reptile``: Reptile; ``generator``: the id generator's objective (Meta-Embedding)
- ``algorithms``: the registry

The index arithmetic of a meta-batch they read (size buckets, distinct ids, groups) is
``gmeta.layout``, shared with the reader and the model.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config,
gmeta.io, gmeta.models.
"""
