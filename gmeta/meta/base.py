"""What every meta-learning algorithm of gmeta shares: its output, and the gather and masked
per-task mean that its losses are made of."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gmeta.models.dlrm import DLRMHead


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an index of any shape, through index_select: its backward is an
    index_add, where plain indexing backward is a serial accumulating index_put on CPU."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def task_losses(head: DLRMHead, out: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                count: torch.Tensor) -> torch.Tensor:
    """Masked mean per task of the head's pointwise loss: [N, R] -> [N]."""
    return (head.pointwise_loss(out, labels) * mask).sum(dim=1) / count.clamp(min=1)


@dataclass
class MetaOutput:
    """Results of one meta-batch. Losses are tensors; ``.item()`` them only on log steps."""

    loss: torch.Tensor  # scalar, what backward() runs on
    query_loss: torch.Tensor  # [N] per-task query loss after adaptation
    support_loss: torch.Tensor  # [N] per-task support loss before adaptation
    skipped: bool | torch.Tensor = False  # the loss was not finite: no update was applied (see gmeta.train)
