"""Wide & Deep (``model.arch: wide_deep``): a wide linear part + a deep tower, summed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmeta.models.heads.base import Head
from gmeta.models.layers import (
    DenseArch,
    MetaLinear,
    OverArch,
    Params,
    fields,
    per_label,
)


class WideDeepHead(Head):
    """Wide & Deep (Cheng et al., 2016): a ``wide`` linear layer over the raw dense features
    and the F pooled rows, plus the deep tower (dense_arch, then over_arch over the F+1
    vectors), summed. The wide part's weight of an id is w_f . e_id, tied to the id's row
    (one table per feature; no crossed-id columns)."""

    arch = "wide_deep"

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], objective: str = "binary", *,
                 label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__(objective, label_weights)
        self.wide = MetaLinear(num_dense + num_sparse * embedding_dim, self.num_labels)
        self.dense_arch = DenseArch(num_dense, dense_sizes, embedding_dim)
        self.over_arch = OverArch((num_sparse + 1) * embedding_dim, over_sizes, self.num_labels)
        self.last_layer = f"over_arch.mlp.layers.{len(over_sizes)}"

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        flat = pooled.flatten(-2)
        dense_in = dense.expand(*flat.shape[:-1], dense.shape[-1])  # (shared dense rows under per-task pooled)
        wide = per_label(self.wide(torch.cat([dense_in, flat], dim=-1), params, "wide."))
        x0 = fields(self.dense_arch(dense, params, "dense_arch."), pooled).flatten(-2)
        return wide + self.over_arch(x0, params, "over_arch.")


