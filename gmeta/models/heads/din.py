"""DIN (``model.arch: din``): target attention of each candidate over its behaviour sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gmeta.layout import cell_widths
from gmeta.models.heads.base import Head, ModelConfig
from gmeta.models.layers import (
    MLP,
    DenseArch,
    OverArch,
    Params,
)


def din_pairs(features: Sequence[dict]) -> list[tuple[int, int]]:
    """(sequence feature, candidate feature) indices: each sequence (``max_length`` > 0)
    with the feature whose table it shares (``table``), the candidate it is compared with."""
    names = [f["name"] for f in features]
    return [(i, names.index(f["table"])) for i, f in enumerate(features) if f.get("max_length", 0) and f.get("table")]


class DINHead(Head):
    """DIN (Zhou et al., KDD 2018): target attention of the candidate (the ad being scored)
    over the user's behaviour sequence (the ads the user last clicked).

    For each sequence feature (``features.sparse[].max_length`` T) and its candidate, the
    feature whose table it shares (``table``; e.g. ``clicked_ads`` and ``ad_id``), the
    ``attention.<i>`` MLP (hidden sizes ``model.attention_arch``, ReLU, one linear output)
    gives each behaviour e_t a weight w_t = a([e_t, v, e_t - v, e_t * v]) from its match with
    the candidate's row v, and the user's interest is ``sum_t w_t e_t`` ``[..., R, D]``.
    DIN's own form, with no softmax over the positions: a padding cell (past a sequence's
    end) is zero, so it adds nothing whatever its weight, and no mask is needed; the sum
    also keeps how much of the history matches. The interests, the other features' cells
    and the dense arch's output, side by side, go through ``over_arch`` (DIN's embedding
    & MLP). Parts: ``dense_arch``, ``attention``, ``over_arch``.

    Fast weights. The attention layers are MetaLinear layers applied to the R T
    (row, position) pairs as rows of their own (``[N, R T, 4D]``); a task's fast weights
    are theirs as for any layer, and the inner gradient reaches them through the product
    w_t e_t and the sum over positions by autograd. The implicit form holds for them
    exactly as for the others: its correction is a product over the layer's own support
    inputs, here the S T (row, position) pairs of a task's support rows, and
    ``meta.fast_weights: auto`` counts the cost of either form for S T and Q T rows
    (``rows_per_row``). The candidate's and the behaviours' rows adapt per (task, feature,
    id) group like any embedding row.
    """

    arch = "din"
    reads_cells = True
    plain: torch.Tensor  # [P] buffer: the cell of each feature that is not a sequence

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], objective: str = "binary", *, features: Sequence[dict],
                 attention_sizes: Sequence[int] = (32,), label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__(objective, label_weights)
        pairs = din_pairs(features)
        if not pairs or len(features) != num_sparse:
            raise ValueError("DIN: at least one sequence feature (features.sparse[].max_length > 0) that names its "
                             "candidate's table (features.sparse[].table)")
        widths = cell_widths(features)
        first = [sum(widths[:i]) for i in range(len(widths))]
        seqs = {i for i, f in enumerate(features) if f.get("max_length", 0)}
        # (first cell, cells, the candidate's cell) of each sequence; Python ints: slices, no index tensors
        self.pairs = [(first[s], widths[s], first[c]) for s, c in pairs]
        self.register_buffer("plain", torch.tensor([first[i] for i in range(len(features)) if i not in seqs],
                                                   dtype=torch.int64), persistent=False)
        self.dense_arch = DenseArch(num_dense, dense_sizes, embedding_dim)
        self.attention = nn.ModuleList(MLP(4 * embedding_dim, list(attention_sizes) + [1], last_activation=False)
                                       for _ in self.pairs)
        width = (1 + len(features) - len(seqs) + len(self.pairs)) * embedding_dim
        self.over_arch = OverArch(width, over_sizes, self.num_labels)
        self.last_layer = f"over_arch.mlp.layers.{len(over_sizes)}"
        self.set_cells(widths)

    @classmethod
    def from_config(cls, m: ModelConfig, num_dense: int, num_sparse: int,
                    label_weights: Sequence[float] = (1.0,), features: Sequence[dict] | None = None) -> Head:
        if features is None:
            raise ValueError("DIN: built from the sparse features' configs (which are sequences, and their tables)")
        return cls(num_dense, num_sparse, m.embedding_dim, m.dense_arch, m.over_arch, m.objective,
                   features=features, attention_sizes=m.attention_arch, label_weights=label_weights)

    def rows_per_row(self, layer: str) -> int:
        part, _, rest = layer.partition(".")
        return self.pairs[int(rest.split(".")[0])][1] if part == "attention" else 1

    def interest(self, i: int, cells: torch.Tensor, params: Params = None) -> torch.Tensor:
        """Sequence ``i``'s user interest ``[..., R, D]`` from the cells ``[..., R, C, D]``."""
        start, length, cand = self.pairs[i]
        seq = cells[..., start: start + length, :]  # [..., R, T, D]
        v = cells[..., cand: cand + 1, :].expand_as(seq)
        x = torch.cat([seq, v, seq - v, seq * v], dim=-1)  # [..., R, T, 4D]
        mlp = self.attention[i]
        assert isinstance(mlp, MLP)
        w = mlp(x.flatten(-3, -2), params, f"attention.{i}.").unflatten(-2, seq.shape[-3:-1])  # [..., R, T, 1]
        return (w * seq).sum(-2)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        """``pooled``: the cells ``[..., R, C, D]``, a sequence's T cells each."""
        d = self.dense_arch(dense, params, "dense_arch.")
        plain = pooled.index_select(-2, self.plain).flatten(-2)
        interests = [self.interest(i, pooled, params) for i in range(len(self.pairs))]
        d = d.expand(*plain.shape[:-1], d.shape[-1])  # (shared dense rows under per-task cells)
        return self.over_arch(torch.cat([d, plain, *interests], dim=-1), params, "over_arch.")


