"""Training: a model's weights from task shards.

- ``run``: ``gmeta train``'s recipe (``TrainingRun``: setup or resume or continue ->
  tracking -> loop -> validation and checkpoints -> the final evaluation and the logged
  MLflow model); ``step``: one optimizer step (``meta_step``, ``train_step``) and the loop
  of steps (``run_steps``).
- ``learner``: gmeta as a library (``MetaLearner``: the same steps on batches you build).
- ``sweep``: ``gmeta sweep``, Optuna trials of ``gmeta train`` as nested MLflow runs.

Training validates with ``gmeta.evaluation`` and logs the served model with
``gmeta.inference``; neither of them imports it.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config,
gmeta.io, gmeta.models, gmeta.meta, gmeta.parallel, gmeta.checkpoint, gmeta.scoring,
gmeta.evaluation, gmeta.inference.
"""
