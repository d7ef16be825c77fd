"""Experiments: many models trained and judged alike, for the published tables.

- ``cold_start``: the cold-start results table of docs/results.md (``python -m
  gmeta.experiments.cold_start``): searches on validation tasks, seeds, every row scored
  on the same test tasks; the warm-up table of new ids (``--warmup``).

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config,
gmeta.io, gmeta.models, gmeta.meta, gmeta.parallel, gmeta.checkpoint, gmeta.scoring,
gmeta.evaluation, gmeta.inference, gmeta.training.
"""
