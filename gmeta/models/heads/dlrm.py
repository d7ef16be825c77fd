"""DLRM (``model.arch: dlrm``): dense_arch -> dot interaction of the F+1 vectors -> over_arch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmeta.models.heads.base import Head
from gmeta.models.layers import (
    DenseArch,
    InteractionArch,
    OverArch,
    Params,
)


class DLRMHead(Head):
    """DLRM: dense_arch -> dot interaction of the F+1 vectors -> over_arch."""

    arch = "dlrm"

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], objective: str = "binary", *,
                 label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__(objective, label_weights)
        self.dense_arch = DenseArch(num_dense, dense_sizes, embedding_dim)
        self.interaction = InteractionArch(num_sparse)
        self.over_arch = OverArch(InteractionArch.out_features(num_sparse, embedding_dim), over_sizes,
                                  self.num_labels)
        self.last_layer = f"over_arch.mlp.layers.{len(over_sizes)}"

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        """``params``: weights to use instead of the module's own, by parameter name."""
        x = self.interaction(self.dense_arch(dense, params, "dense_arch."), pooled)
        return self.over_arch(x, params, "over_arch.")


