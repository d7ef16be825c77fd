"""What every meta-learning algorithm of gmeta shares: its output, and the gather and masked
per-task mean that its losses are made of."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gmeta.models.heads import Head


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an index of any shape, through index_select: its backward is an
    index_add, where plain indexing backward is a serial accumulating index_put on CPU."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def task_losses(head: Head, out: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                count: torch.Tensor) -> torch.Tensor:
    """Masked mean per task of the head's pointwise loss: [N, R] -> [N]."""
    return (head.pointwise_loss(out, labels) * mask).sum(dim=1) / count.clamp(min=1)


@dataclass
class MetaOutput:
    """Results of one meta-batch. Losses are tensors; ``.item()`` them only on log steps.

    ``terms``: what ``loss`` is the sum of, each a mean over ``count`` units of this
    process's batch (its tasks, or its rows). Several processes weight each term by their
    share of the global count (``gmeta.training.step.agree_across_ranks``), so that a step equals
    one process on the whole global batch. Empty: ``loss`` is one mean over the batch's tasks.
    """

    loss: torch.Tensor  # scalar, what backward() runs on
    query_loss: torch.Tensor  # [N] per-task query loss after adaptation
    support_loss: torch.Tensor  # [N] per-task support loss before adaptation
    skipped: bool | torch.Tensor = False  # the loss was not finite: no update was applied (see gmeta.training.step)
    real: torch.Tensor | None = None  # several ranks: some rank had a real batch (not a pad)
    global_counts: torch.Tensor | None = None  # several ranks: the step's [tasks, rows] on all ranks
    terms: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (mean, local count)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # more scalars for the logs, by name


def sum_terms(query_loss: torch.Tensor, support_loss: torch.Tensor,
              terms: list[tuple[torch.Tensor, int]]) -> MetaOutput:
    """A MetaOutput whose loss is the sum of ``terms``."""
    loss = terms[0][0]
    for t, _ in terms[1:]:
        loss = loss + t
    return MetaOutput(loss=loss, query_loss=query_loss, support_loss=support_loss, terms=terms)
