"""Core types shared by the reader, the model and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gmeta.layout import BatchLayout


@dataclass
class TaskBatch:
    """One meta-batch of N whole tasks, support and query rows of all of them together.

    Rows are laid out support-first, task-major, so that one embedding lookup serves the
    inner and the outer loop::

        row:      0 ........ S-1 | S ........... S+Q-1
                  support rows   | query rows
                  t0 | t1 | ...  | t0 | t1 | ...
                  ^support_offsets ^S + query_offsets

        sparse    KeyedJaggedTensor, keys = sparse feature names, stride = S+Q
                  (lengths[f * (S+Q) + r] = number of ids of feature f in row r)
        dense     float [S+Q, num_dense]
        labels    float [S+Q], or [S+Q, L] for the L labels of features.labels
        support_offsets  int64 [N+1]; task t's support rows: support_offsets[t]:support_offsets[t+1]
        query_offsets    int64 [N+1]; task t's query rows: S + query_offsets[t]:S + query_offsets[t+1]
        task_ids  int64 [N], stable hash of each task's key
        true_prob float [S+Q] or None, true label probability (synthetic data, oracle AUC)
        layout    BatchLayout or None: the index arithmetic of a meta step (deduplicated ids,
                  size buckets), built by the reader's workers; ``layout_of`` builds one
                  for a batch made elsewhere

    The support/query split is made in ``gmeta.io``; the training loop only reads it.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    support_offsets: torch.Tensor
    query_offsets: torch.Tensor
    task_ids: torch.Tensor
    true_prob: torch.Tensor | None = None
    layout: BatchLayout | None = None

    @property
    def num_tasks(self) -> int:
        return int(self.task_ids.numel())

    @property
    def num_support(self) -> int:
        return int(self.support_offsets[-1])

    @property
    def num_query(self) -> int:
        return int(self.query_offsets[-1])

    @property
    def num_labels(self) -> int:
        """L: the labels of each row (1 when ``labels`` is ``[S+Q]``)."""
        return 1 if self.labels.dim() == 1 else int(self.labels.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def _map(self, fn) -> TaskBatch:
        kwargs: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kwargs[f.name] = None if v is None else fn(v)
        return TaskBatch(**kwargs)

    def to(self, device: torch.device, non_blocking: bool = False) -> TaskBatch:
        return self._map(lambda v: v.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> TaskBatch:
        return self._map(lambda v: v.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                v.record_stream(stream)
