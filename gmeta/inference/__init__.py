"""Inference: scoring trained models on new data.

- ``predict``: batch prediction on task shards (``gmeta predict --shards``), resumable.
- ``predict_raw``: the same on row-level logs of new tasks (``gmeta predict --input``), in
  worker processes over one or several nodes (``workers``: the coordinator, the node agents
  and the scorers).
- ``serving``: raw rows -> task blocks -> scores, as the MLflow model and raw-log
  prediction score them; ``pyfunc``: the MLflow pyfunc model.

It may import the shared modules (config, checkpoint, scoring, storage, logs), gmeta.io,
gmeta.models, gmeta.parallel, and ``gmeta.evaluation.evaluate`` (the checks of which shards a
checkpoint may score); nothing imports it but the command line and training (which logs
the pyfunc model).
"""
