"""What communicates: the process group and everything that crosses ranks.

- ``dist``: the process group (gloo on CPU, NCCL on GPU), devices and threads, the dense
  gradients' bucketed all-reduce; ``sharding``: the tables sharded by torchrec's planner
  and ``DistributedModelParallel``; ``pipeline``: the next meta-batch's id all-to-all
  overlapping this one's compute; ``adaptive``: per-rank meta-batch sizes that follow each
  rank's speed.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config,
gmeta.io, gmeta.models, gmeta.meta.
"""
