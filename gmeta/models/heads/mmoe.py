"""MMoE (``model.arch: mmoe``): shared experts, a gate and a tower per label."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gmeta.models.heads.base import Head, ModelConfig
from gmeta.models.layers import (
    MLP,
    DenseArch,
    MetaLinear,
    OverArch,
    Params,
    fields,
)


class MMoEHead(Head):
    """MMoE (Ma et al., KDD 2018): ``experts`` E MLPs (hidden sizes ``model.expert_arch``)
    over x0, the F+1 vectors side by side; per label a gate (``gates.<l>``, a linear layer
    over x0, softmax over the experts) mixes the experts' outputs, and the label's tower
    (``towers.<l>``: ``model.over_arch`` hidden sizes, one logit) scores the mixture. The
    experts are shared by every label; gates and towers are each label's own. The softmax
    and the mixing have no weights: a task's fast weights are the layers of the parts."""

    arch = "mmoe"

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], objective: str = "binary", *, experts: int = 4,
                 expert_sizes: Sequence[int] = (64,), label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__(objective, label_weights)
        if experts < 1 or not expert_sizes:
            raise ValueError(f"MMoE: at least one expert of at least one layer, got {experts} expert(s) of "
                             f"sizes {list(expert_sizes)} (model.experts, model.expert_arch)")
        width = (num_sparse + 1) * embedding_dim
        self.dense_arch = DenseArch(num_dense, dense_sizes, embedding_dim)
        self.experts = nn.ModuleList(MLP(width, list(expert_sizes), last_activation=True) for _ in range(experts))
        self.gates = nn.ModuleList(MetaLinear(width, experts) for _ in range(self.num_labels))
        self.towers = nn.ModuleList(OverArch(expert_sizes[-1], over_sizes) for _ in range(self.num_labels))
        self.last_layer = f"towers.0.mlp.layers.{len(over_sizes)}"  # (the first label's; last_layers: all)

    @classmethod
    def from_config(cls, m: ModelConfig, num_dense: int, num_sparse: int,
                    label_weights: Sequence[float] = (1.0,), features: Sequence[dict] | None = None) -> Head:
        return cls(num_dense, num_sparse, m.embedding_dim, m.dense_arch, m.over_arch, m.objective,
                   experts=m.experts, expert_sizes=m.expert_arch, label_weights=label_weights)

    def last_layers(self) -> list[str]:
        return [self.last_layer.replace("towers.0.", f"towers.{i}.", 1) for i in range(self.num_labels)]

    def init_output_bias(self, mean: float | list[float]) -> None:
        means = mean if isinstance(mean, list) else [mean]
        with torch.no_grad():
            for name, m in zip(self.last_layers(), means):
                layer = self.get_submodule(name)
                assert isinstance(layer, MetaLinear)
                layer.bias.fill_(float(m))

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        x0 = fields(self.dense_arch(dense, params, "dense_arch."), pooled).flatten(-2)
        experts = torch.stack([e(x0, params, f"experts.{i}.") for i, e in enumerate(self.experts)], dim=-2)
        outs = []
        for i, (gate, tower) in enumerate(zip(self.gates, self.towers)):
            g = torch.softmax(gate(x0, params, f"gates.{i}."), dim=-1)  # [..., R, E]
            mixed = (g.unsqueeze(-2) @ experts).squeeze(-2)  # [..., R, 1, E] @ [..., R, E, h] -> [..., R, h]
            outs.append(tower(mixed, params, f"towers.{i}."))
        return outs[0] if len(outs) == 1 else torch.stack(outs, dim=-1)


