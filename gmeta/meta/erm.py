"""ERM, the baseline: plain training of the same model on every row (support and query) of
a meta-batch, no adaptation."""

from __future__ import annotations

import torch

from gmeta.config import Config
from gmeta.layout import BatchLayout
from gmeta.meta.base import MetaOutput, gather_rows, sum_terms
from gmeta.models.dlrm import MetaDLRM
from gmeta.models.heads import Head
from gmeta.types import TaskBatch


def erm_loss(head: Head, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout) -> MetaOutput:
    """Plain training of the same model on every row (support and query) of the batch."""
    L = layout
    pooled = L.pool(gather_rows(rows, L.occ_unique), L.slot, L.divisor, L.num_rows)
    logits = head(batch.dense, pooled)
    point = head.pointwise_loss(logits, batch.labels)
    loss = point.mean()
    with torch.no_grad():  # per-task means, for the logs: segment sums over the row -> task map
        n = L.s_count.shape[0]
        per = point.new_zeros(2, n)
        per[0].index_add_(0, L.row_task[: L.num_support], point[: L.num_support])
        per[1].index_add_(0, L.row_task[L.num_support:], point[L.num_support:])
        sl, ql = per[0] / L.s_count.clamp(min=1), per[1] / L.q_count.clamp(min=1)
    return sum_terms(ql, sl, [(loss, L.num_rows)])


def objective(model: MetaDLRM, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout, cfg: Config) -> MetaOutput:
    """``meta.algorithm: erm``."""
    return erm_loss(model.head, rows, batch, layout)
