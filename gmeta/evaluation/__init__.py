"""Evaluation: how good a trained model is, and against what.

- ``evaluate``: ``gmeta evaluate`` (held-out tasks: adapt on support, score the query),
  with ``report`` (the report's numbers), ``render`` (Markdown, HTML, JSON, MLflow) and
  ``plots``.
- ``finetune``: K and the inner rates chosen on validation tasks (ERM fine-tuned per task,
  MAML at test time).
- ``warmup``: the warm-up protocol of item cold start; ``next_day``: each daily model on
  the next day's new tasks.
- ``ceiling``: what the synthetic data's hidden model allows.

Nothing here trains a model: the table that trains its rows is ``gmeta.experiments``.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config,
gmeta.io, gmeta.models, gmeta.meta, gmeta.parallel, gmeta.checkpoint, gmeta.scoring.
"""
