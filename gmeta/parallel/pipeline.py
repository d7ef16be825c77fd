"""Overlap the id all-to-all of the next meta-batch with the compute of this one.

Built on torchrec's own awaitables, as ``TrainPipelineSparseDist`` is: a sharded
``EmbeddingCollection`` runs ``input_dist`` (the all-to-all of ids, two stages: splits,
then values), then ``compute_and_output_dist`` (lookup and the all-to-all of embeddings).
``start(batch i+1)`` issues both input-dist stages right after batch i+1 arrives, before
batch i's inner loop, query forward and backward run; ``lookup(batch i+1)`` then only waits
for what is already in flight. Every rank issues the same collectives in the same order.

::

    step i:   start(i+1) ─► [ids a2a of i+1 in flight] ─► wait(i) lookup ─► inner ─► query ─► backward
    step i+1:              ... wait(i+1) lookup ─► ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.profiler import record_function

from gmeta.models.dlrm import MetaDLRM, lookup_rows
from gmeta.parallel.layout import layout_of
from gmeta.types import TaskBatch


@dataclass
class Pending:
    batch: TaskBatch
    ctx: Any
    dist_input: Any  # awaitable of the distributed ids


class SparseDistPipeline:
    def __init__(self, model: MetaDLRM, size_buckets: int = 1) -> None:
        self.model = model
        self.size_buckets = size_buckets
        self.ec = model.sparse_arch.ec  # a ShardedEmbeddingCollection after DMP

    def start(self, batch: TaskBatch) -> Pending:
        """Issue the id all-to-all of ``batch`` (both stages) and return without waiting."""
        with record_function("## input_dist ##"):
            ctx = self.ec.create_context()
            layout = layout_of(batch, self.model.pooling, self.size_buckets)
            batch.layout = layout
            splits = self.ec.input_dist(ctx, layout.kjt([f["name"] for f in self.model.features]))
            values = splits.wait()  # the splits are small; this issues the values all-to-all
        return Pending(batch, ctx, values)

    @staticmethod
    def wait_ids(pending: Pending):
        """The ids this rank's shards look up, once their all-to-all has arrived. torchrec
        reads the received lengths on the host here (as it reads the split sizes in
        ``start``): the price of a variable-size all-to-all, paid one batch ahead."""
        with record_function("## input_dist_wait ##"):
            return pending.dist_input.wait()

    def lookup(self, pending: Pending) -> torch.Tensor:
        """Wait for the ids, look them up and bring the embeddings back (one a2a each way)."""
        dist_input = self.wait_ids(pending)
        with record_function("## lookup ##"):
            emb = self.ec.compute_and_output_dist(pending.ctx, dist_input)
            return lookup_rows(emb.wait() if hasattr(emb, "wait") else emb, self.model.features)
