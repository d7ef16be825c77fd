"""Evaluation: how good a trained model is, and against what.

- ``evaluate``: ``gmeta evaluate`` (held-out tasks: adapt on support, score the query),
  with ``report`` (the report's numbers), ``render`` (Markdown, HTML, JSON, MLflow) and
  ``plots``.
- ``finetune``: K and the inner rates chosen on validation tasks (ERM fine-tuned per task,
  MAML at test time).
- ``warmup``: the warm-up protocol of item cold start; ``next_day``: each daily model on
  the next day's new tasks.
- ``cold_start``: the cold-start results table (searches, seeds, every row alike);
  ``ceiling``: what the synthetic data's hidden model allows.

It may import the shared modules (config, checkpoint, scoring, metrics, tracking, storage,
logs), gmeta.io, gmeta.meta, gmeta.models, gmeta.parallel, ``gmeta.synth``, and (the
cold-start table only: it trains its rows) ``gmeta.sweep`` and ``gmeta.train``.
"""
