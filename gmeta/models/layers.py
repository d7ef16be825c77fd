"""The layers every head is built from: ``MetaLinear`` (a linear layer that takes per-task
weights or a hook computing it), MLPs, the DLRM's dense and over arch, the dot interaction
and DCN-v2's cross layers (see gmeta.models.heads for how fast weights pass through them).
Needs torch alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHook:
    """Computes ``MetaLinear`` layers in place of their plain forward when passed as the
    head's ``params``: ``linear(prefix, x, weight, bias)`` is called with the layer's
    parameter-name prefix and its own shared weights (see gmeta.meta.fast_weights's implicit
    fast weights, which add a per-task correction to the shared product)."""

    def linear(self, prefix: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)


# replacement weights by parameter name, or a hook computing the linear layers
Params = dict[str, torch.Tensor] | LinearHook | None


class MetaLinear(nn.Linear):
    """Linear layer accepting shared ``[out, in]`` or per-task ``[N, out, in]`` weights,
    or a ``LinearHook`` that computes it. Always with a bias (the implicit fast weights
    fold the bias updates into the weight update's product)."""

    def forward(self, x: torch.Tensor, params: Params = None, prefix: str = "") -> torch.Tensor:
        w: torch.Tensor
        b: torch.Tensor
        w, b = self.weight, self.bias
        if isinstance(params, LinearHook):
            return params.linear(prefix, x, w, b)
        if params is not None:
            w, b = params.get(prefix + "weight", w), params.get(prefix + "bias", b)
        if w.dim() == 3:  # per-task fast weights: x [N, R, in] -> [N, R, out]
            return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        return F.linear(x, w, b)


class MLP(nn.Module):
    def __init__(self, in_features: int, sizes: list[int], *, last_activation: bool) -> None:
        super().__init__()
        dims = [in_features] + list(sizes)
        self.layers = nn.ModuleList(MetaLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.last_activation = last_activation

    @property
    def out_features(self) -> int:
        last = self.layers[-1]
        assert isinstance(last, MetaLinear)
        return last.out_features

    def forward(self, x: torch.Tensor, params: Params = None, prefix: str = "") -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, params, f"{prefix}layers.{i}.")
            if i < len(self.layers) - 1 or self.last_activation:
                x = torch.relu(x)
        return x


class DenseArch(nn.Module):
    """MLP of the dense features -> ``[R, D]``. With no dense feature (an all-categorical
    data set) it is one layer of 0 inputs whose bias is a learned vector, the same for
    every row (its dots with the embeddings are then learned first-order terms); no ReLU,
    which would leave its negative units dead forever, and the bias drawn like an
    embedding row (nn.Linear gives a layer of no inputs a zero bias)."""

    def __init__(self, num_dense: int, sizes: list[int], embedding_dim: int) -> None:
        super().__init__()
        if num_dense == 0:
            self.mlp = MLP(0, [embedding_dim], last_activation=False)
            nn.init.normal_(self.mlp.layers[0].bias, std=embedding_dim ** -0.5)  # type: ignore[arg-type]
        else:
            self.mlp = MLP(num_dense, list(sizes) + [embedding_dim], last_activation=True)

    def forward(self, x: torch.Tensor, params: Params = None, prefix: str = "") -> torch.Tensor:
        return self.mlp(x, params, prefix + "mlp.")


class InteractionArch(nn.Module):
    """DLRM dot interaction: dense vector plus the pairwise dots of all F+1 vectors."""

    upper: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, num_sparse: int) -> None:
        super().__init__()
        n = num_sparse + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        # flat positions of the upper triangle: index_select's backward is an index_add,
        # 2x faster on CPU than the accumulating index_put of dots[..., rows, cols]
        self.register_buffer("upper", rows * n + cols, persistent=False)

    @staticmethod
    def out_features(num_sparse: int, embedding_dim: int) -> int:
        return embedding_dim + (num_sparse + 1) * num_sparse // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense [..., D], sparse [..., F, D] -> [..., D + (F+1)F/2]"""
        combined = torch.cat([dense.unsqueeze(-2), sparse], dim=-2)
        dots = combined @ combined.transpose(-1, -2)
        upper: torch.Tensor = self.upper  # a buffer
        return torch.cat([dense, dots.flatten(-2).index_select(-1, upper)], dim=-1)


class OverArch(nn.Module):
    """The top MLP: hidden layers ``sizes`` (ReLU) and an output layer of ``outputs`` units
    (one per label; one unit's output is squeezed to ``[..., R]``)."""

    def __init__(self, in_features: int, sizes: list[int], outputs: int = 1) -> None:
        super().__init__()
        self.mlp = MLP(in_features, list(sizes) + [outputs], last_activation=False)

    def forward(self, x: torch.Tensor, params: Params = None, prefix: str = "") -> torch.Tensor:
        return per_label(self.mlp(x, params, prefix + "mlp."))


def per_label(out: torch.Tensor) -> torch.Tensor:
    """An output layer's ``[..., R, L]`` as the head's outputs: ``[..., R]`` for one label."""
    return out.squeeze(-1) if out.shape[-1] == 1 else out


def fields(dense_vec: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The F+1 vectors of a row: the dense arch's output first, then the pooled rows:
    ``[..., R, D]``, ``[..., R, F, D]`` -> ``[..., R, F+1, D]``."""
    return torch.cat([dense_vec.unsqueeze(-2), pooled], dim=-2)


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x0 * (W x + b) + x``, W full rank ``[d, d]`` (``w``) or of
    rank r as ``U (V x + c)`` (``v`` [r, d] then ``u`` [d, r]; V's bias c adds nothing U's
    bias b could not hold, and is there because every MetaLinear has one). A task's fast
    weights are W (or U and V); the product with x0 and the residual are fixed operations
    on the linear map's output."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        if rank:
            self.v = MetaLinear(width, rank)
            self.u = MetaLinear(rank, width)
        else:
            self.w = MetaLinear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor, params: Params = None, prefix: str = "") -> torch.Tensor:
        if self.rank:
            h = self.u(self.v(x, params, prefix + "v."), params, prefix + "u.")
        else:
            h = self.w(x, params, prefix + "w.")
        return torch.addcmul(x, x0, h)


class CrossNet(nn.Module):
    def __init__(self, width: int, num_layers: int, rank: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(width, rank) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor, params: Params = None, prefix: str = "") -> torch.Tensor:
        x = x0
        for i, layer in enumerate(self.layers):
            x = layer(x0, x, params, f"{prefix}layers.{i}.")
        return x


