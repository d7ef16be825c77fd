"""DCN-v2 (``model.arch: dcn_v2``), cross layers over x0, stacked or parallel with the deep tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmeta.models.heads.base import Head, ModelConfig
from gmeta.models.layers import (
    MLP,
    CrossNet,
    DenseArch,
    MetaLinear,
    OverArch,
    Params,
    fields,
    per_label,
)


class DCNv2Head(Head):
    """DCN-v2 (Wang et al., 2021): x0 = the F+1 vectors side by side ``[(F+1) D]``; ``cross``
    layers over it, then the deep ``over_arch`` ("stacked"), or the cross layers and the deep
    tower side by side, their outputs joined by the ``output`` layer ("parallel")."""

    arch = "dcn_v2"

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], objective: str = "binary", *, cross_layers: int = 3, cross_rank: int = 0,
                 structure: str = "stacked", label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__(objective, label_weights)
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"DCN-v2 structure: 'stacked' or 'parallel', got {structure!r}")
        if structure == "parallel" and not over_sizes:
            raise ValueError("DCN-v2 parallel: the deep tower (model.over_arch) needs at least one layer")
        width = (num_sparse + 1) * embedding_dim
        self.structure = structure
        self.dense_arch = DenseArch(num_dense, dense_sizes, embedding_dim)
        self.cross = CrossNet(width, cross_layers, cross_rank)
        if structure == "stacked":
            self.over_arch = OverArch(width, over_sizes, self.num_labels)
            self.last_layer = f"over_arch.mlp.layers.{len(over_sizes)}"
        else:
            self.deep = MLP(width, over_sizes, last_activation=True)
            self.output = MetaLinear(width + over_sizes[-1], self.num_labels)
            self.last_layer = "output"

    @classmethod
    def from_config(cls, m: ModelConfig, num_dense: int, num_sparse: int,
                    label_weights: Sequence[float] = (1.0,), features: Sequence[dict] | None = None) -> Head:
        return cls(num_dense, num_sparse, m.embedding_dim, m.dense_arch, m.over_arch, m.objective,
                   cross_layers=m.cross_layers, cross_rank=m.cross_rank, structure=m.cross_structure,
                   label_weights=label_weights)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        x0 = fields(self.dense_arch(dense, params, "dense_arch."), pooled).flatten(-2)
        crossed = self.cross(x0, params, "cross.")
        if self.structure == "stacked":
            return self.over_arch(crossed, params, "over_arch.")
        deep = self.deep(x0, params, "deep.")
        return per_label(self.output(torch.cat([crossed, deep], dim=-1), params, "output."))


