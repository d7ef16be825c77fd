"""Reptile (Nichol, Achiam and Schulman 2018): first-order meta-learning with no backward
through the inner loop and no gradient of the query loss.

Each task takes K SGD steps on its support rows from the shared weights θ (the same inner
loop as MAML: ``adapt_and_query``); the meta-update moves θ toward the adapted weights,
along ``g = mean_t (θ - θ'_t)``, which the optimizers then apply as a gradient (dense Adam,
and the tables' fused optimizer). ``g`` enters the one backward of the step as the gradient
of the surrogate ``<θ, stop_grad(g)>``, so the tables are updated inside backward as for
every algorithm, and the same step code runs it, sharded or not. For an embedding row, the
mean is over all N tasks of the batch: a task that does not look the row up leaves it as
it was (a difference of 0).
"""

from __future__ import annotations

import torch

from gmeta.config import Config
from gmeta.layout import BatchLayout
from gmeta.meta.base import MetaOutput, gather_rows, sum_terms
from gmeta.meta.erm import erm_loss
from gmeta.meta.fast_weights import FastWeights
from gmeta.meta.maml import adapt_and_query, adaptation
from gmeta.models.dlrm import MetaDLRM
from gmeta.models.heads import Head
from gmeta.types import TaskBatch


def reptile_loss(head: Head, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout, *, steps: int,
                 lr: float, emb_lr: float, erm_weight: float = 0.0, **adapt) -> MetaOutput:
    """The Reptile surrogate of a meta-batch: its gradient with respect to each adapted head
    parameter and looked-up row is the mean over the batch's tasks of (shared - adapted);
    plus ``erm_weight`` times the plain loss over every row (as for MAML). The MetaOutput's
    query loss (after adaptation, for the logs) carries no gradient."""
    adapt = {**adapt, "fast_weights": "materialized"}  # the adapted weights themselves are needed
    got: dict = {}

    def keep(fast: list[FastWeights], adapted_rows: torch.Tensor | None) -> None:
        got["fast"], got["rows"] = fast, adapted_rows

    _, query_loss, support_loss = adapt_and_query(head, rows, batch, layout, steps=steps, lr=lr, emb_lr=emb_lr,
                                                  first_order=True, with_logits=False, on_adapted=keep, **adapt)
    n = query_loss.shape[0]
    surrogate = rows.new_zeros(())
    for name, p in head.named_parameters():
        moved = [f.weights[name].detach() for f in got["fast"] if name in f.weights]  # [N_b, ...] per bucket
        if moved:
            delta = sum((p.detach() - w).sum(0) for w in moved) / n
            surrogate = surrogate + (p * delta).sum()
    if got["rows"] is not None:  # per-task rows [G, D] -> the mean difference per distinct id [U, D]
        diff = gather_rows(rows.detach(), layout.group_unique) - got["rows"].detach()
        delta_rows = torch.zeros_like(rows).index_add(0, layout.group_unique.reshape(-1), diff) / n
        surrogate = surrogate + (rows * delta_rows).sum()
    terms = [(surrogate, n)]
    if erm_weight > 0:
        terms.append((erm_loss(head, rows, batch, layout).loss * erm_weight, layout.num_rows))
    return sum_terms(query_loss.detach(), support_loss, terms)


def objective(model: MetaDLRM, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout, cfg: Config) -> MetaOutput:
    """``meta.algorithm: reptile``: K inner steps on each task's support rows, the shared
    weights moved toward the adapted ones (and the ERM anchor, ``meta.erm_weight``)."""
    m = cfg.meta
    return reptile_loss(model.head, rows, batch, layout, steps=m.inner_steps, lr=m.inner_lr,
                        emb_lr=m.embedding_inner_lr, erm_weight=m.erm_weight, **adaptation(model, m))
