"""Inference: scoring trained models on new data.

- ``predict``: batch prediction on task shards (``gmeta predict --shards``), resumable.
- ``predict_raw``: the same on row-level logs of new tasks (``gmeta predict --input``), in
  worker processes over one or several nodes (``workers``: the coordinator, the node agents
  and the scorers).
- ``serving``: raw rows -> task blocks -> scores, as the MLflow model and raw-log
  prediction score them; ``pyfunc``: the MLflow pyfunc model.

Nothing imports it but the command line and training (which logs the pyfunc model).

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config,
gmeta.io, gmeta.models, gmeta.meta, gmeta.parallel, gmeta.checkpoint, gmeta.scoring.
"""
