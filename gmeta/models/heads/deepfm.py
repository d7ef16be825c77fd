"""DeepFM (``model.arch: deepfm``): first order + FM second order + deep tower, summed."""

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


class DeepFMHead(Head):
    """DeepFM (Guo et al., 2017): first-order term + FM second-order term + deep tower,
    summed, over the F+1 vectors (the dense arch's output a field like the others).

    The FM term is the sum over pairs of fields of their dot, ``((sum v)^2 - sum v^2) / 2``
    summed over the dims, with no weights. The first-order term is the ``linear`` layer over
    x0: an id's own weight is w_f . e_id, tied to its row rather than held in a second,
    one-wide table per feature, so one table per feature serves all three terms (DeepFM
    shares its embeddings between FM and the deep part too)."""

    arch = "deepfm"

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], objective: str = "binary", *,
                 label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__(objective, label_weights)
        width = (num_sparse + 1) * embedding_dim
        self.dense_arch = DenseArch(num_dense, dense_sizes, embedding_dim)
        self.linear = MetaLinear(width, self.num_labels)
        self.over_arch = OverArch(width, over_sizes, self.num_labels)
        self.last_layer = f"over_arch.mlp.layers.{len(over_sizes)}"

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        v = fields(self.dense_arch(dense, params, "dense_arch."), pooled)
        x0 = v.flatten(-2)
        fm = 0.5 * (v.sum(-2).square() - v.square().sum(-2)).sum(-1)
        if self.num_labels > 1:  # the FM term, which has no weights, is each label's alike
            fm = fm.unsqueeze(-1)
        return per_label(self.linear(x0, params, "linear.")) + fm + self.over_arch(x0, params, "over_arch.")


