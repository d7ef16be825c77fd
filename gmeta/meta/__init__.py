"""The meta-learning algorithms: pure functions of (dense head, looked-up rows, batch,
layout) that never communicate. ``gmeta.meta.algorithms.ALGORITHMS`` maps ``meta.algorithm``
to each one's objective, ``(model, rows, batch, layout, cfg) -> MetaOutput``; a new
algorithm is one module with an ``objective`` and one entry there (and in
``MetaConfig.algorithm``).

- ``layout``: the index arithmetic of a meta-batch (size buckets, distinct ids, groups)
- ``base``: ``MetaOutput`` and the gathers and per-task means losses are made of
- ``fast_weights``: per-task fast weights of the adapted dense layers
- ``maml``: MAML / first-order MAML / Meta-SGD (inner loop, query loss)
- ``erm``: the plain-training baseline
- ``algorithms``: the registry
"""
