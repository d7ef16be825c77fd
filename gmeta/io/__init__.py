"""Data: raw row-level logs -> task shards on disk -> meta-batches in memory.

- ``sources/``: raw inputs, a module per format (Parquet/CSV/TSV, libSVM/libFM, RecBole,
  MovieLens) behind one ``Source`` interface; ``synth``: the synthetic ads-CVR logs.
- ``prepare`` (``gmeta prepare``): rows -> tasks, with ``split`` (the support/query rule),
  ``features`` (labels, id hashing, value checks; shared with serving), ``id_counts``
  (per-split id counts) and ``partitions`` (daily partitions); ``formats/`` writes and
  reads the shard files; ``manifest``: what a prepare wrote, read and checked by every
  reader (and which shards a checkpoint may score).
- ``reader`` (``TaskReader``): shards -> meta-batches in background workers, with ``plan``
  (who reads which task), ``block`` (tasks in memory), ``collate`` (tasks -> one packed
  meta-batch) and ``dynamic`` (``data.sharding: dynamic``: tasks handed out as work);
  ``batch``: meta-batches from data already in memory (the library's ``task_batch``).
- ``errors``: the data path's errors.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config.
"""
