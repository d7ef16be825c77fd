"""Overlap the data movement of the next meta-batch with the compute of this one.

Built on torchrec's own awaitables, as ``TrainPipelineSparseDist`` is: a sharded
``EmbeddingCollection`` runs ``input_dist`` (the all-to-all of ids, two stages: splits,
then values), then ``compute_and_output_dist`` (lookup and the all-to-all of embeddings).
``start(batch i+1)`` copies the batch to the device and issues both input-dist stages right
after it arrives, before batch i computes; ``wait_ids(i+1)`` collects the ids once batch i's
step is queued; ``lookup(i+1)`` then only runs the lookup and the embedding all-to-all.
Every rank issues the same collectives in the same order.

::

    step i:   start(i+1): [H2D copy] -> [ids a2a]   (side streams on CUDA)
              lookup(i) -> inner -> query -> backward -> optimizer   (default stream)
              wait_ids(i+1)                           (host waits while the GPU runs step i)
    step i+1: lookup(i+1) -> ...

On CUDA the copy runs on its own stream and input_dist on another, as in torchrec's
pipeline: torchrec reads the all-to-all split sizes on the host inside input_dist, and on a
side stream that read waits only for the copy, not for the queued compute of batch i. The
input-dist stream waits for the copy stream (``wait_stream``); once a batch's ids are
collected an event is recorded on the input-dist stream, and the lookup of that batch waits
for its event only, not for the whole stream, where the next batch's copy and id all-to-all
may already be queued. Tensors made on one stream and used on another are
``record_stream``-ed so the caching allocator does not reuse their memory early. On the CPU
the streams and events are absent and the order is the same.

The embedding all-to-all of batch i+1 is not overlapped with batch i: batch i's backward
updates the tables (fused optimizer), and a lookup before it would read rows one step stale
(torchrec's ``TrainPipelineSemiSync`` makes that trade; gmeta keeps steps exact).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.profiler import record_function

from gmeta.layout import layout_of
from gmeta.models.dlrm import MetaDLRM, lookup_rows
from gmeta.types import TaskBatch


@dataclass
class Pending:
    batch: TaskBatch  # on the device
    ctx: Any
    dist_input: Any  # awaitable of the distributed ids
    ids: Any = None  # the ids, once ``wait_ids`` has collected them
    ready: Any = None  # CUDA: an event on the input-dist stream after this batch's copy and ids (CPU: None)


class SparseDistPipeline:
    def __init__(self, model: MetaDLRM, size_buckets: int = 1, device: torch.device | None = None) -> None:
        self.model = model
        self.size_buckets = size_buckets
        self.ec = model.sparse_arch.ec  # a ShardedEmbeddingCollection after DMP
        self.device = device if device is not None else torch.device("cpu")
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=self.device) if cuda else None
        self.dist_stream = torch.cuda.Stream(device=self.device) if cuda else None

    @staticmethod
    def _on(stream):
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def start(self, batch: TaskBatch) -> Pending:
        """Copy ``batch`` to the device and issue its id all-to-all (both stages); returns
        without waiting for the values."""
        with record_function("## h2d ##"), self._on(self.copy_stream):
            batch = batch.to(self.device, non_blocking=True)  # from pinned memory: asynchronous
        if self.dist_stream is not None and self.copy_stream is not None:
            self.dist_stream.wait_stream(self.copy_stream)
            batch.record_stream(self.dist_stream)
        with record_function("## input_dist ##"), self._on(self.dist_stream):
            ctx = self.ec.create_context()
            layout = layout_of(batch, self.model.pooling, self.size_buckets, self.model.cell_widths)
            batch.layout = layout
            splits = self.ec.input_dist(ctx, self.model.table_ids(layout))
            values = splits.wait()  # the splits are small; this issues the values all-to-all
        return Pending(batch, ctx, values)

    def wait_ids(self, pending: Pending):
        """The ids this rank's shards look up, once their all-to-all has arrived. torchrec
        reads the received lengths on the host here (as it reads the split sizes in
        ``start``): the price of a variable-size all-to-all, paid one batch ahead, after
        the previous step is queued."""
        if pending.ids is None:
            with record_function("## input_dist_wait ##"), self._on(self.dist_stream):
                pending.ids = pending.dist_input.wait()
            if self.dist_stream is not None:
                pending.ready = torch.cuda.Event()
                pending.ready.record(self.dist_stream)
        return pending.ids

    def lookup(self, pending: Pending) -> torch.Tensor:
        """Look the ids up and bring the embeddings back (one a2a each way), on the current stream."""
        ids = self.wait_ids(pending)
        if self.dist_stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(pending.ready)  # this batch's copy and ids a2a, not the next batch's queued since
            for t in (pending.batch, ids, pending.ctx):
                if hasattr(t, "record_stream"):
                    t.record_stream(current)
        with record_function("## lookup ##"):
            emb = self.ec.compute_and_output_dist(pending.ctx, ids)
            return lookup_rows(emb.wait() if hasattr(emb, "wait") else emb, self.model.features)
