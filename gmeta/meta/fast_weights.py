"""Per-task fast weights of the adapted dense layers: implicit (each task's SGD updates kept
as the products they are made of) or materialised (the shared weights expanded to
``[N, ...]``), chosen per layer and size bucket by cost (``choose_fast_weights``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F

from gmeta.models.heads import FILM, Head, LinearHook, adapted_layers


class FastWeights(LinearHook):
    """Per-task fast weights of the adapted linear layers of one size bucket (N_b tasks),
    each layer held one of two ways.

    Implicit (``"implicit"``): never formed. The gradient of task t's support loss with
    respect to a layer's ``W`` is ``D^T X``: the loss's gradients at the layer's outputs
    ``D [S_t, out]`` times the layer's inputs ``X [S_t, in]`` on the task's support rows.
    After K SGD steps the task's layer applied to rows ``x`` is therefore exactly

        W_t x + b_t = W x + b - sum_k lr * (D_k^T (X_k x) + sum_s D_k[s])
                    = W x + b - sum_k lr * D_k^T (X_k x + 1)

    The heavy product ``W x`` is the shared-weight GEMM over every row of every task (as in
    ERM); the per-task part is two small batched products ``[R, S] = x X^T + 1`` and
    ``[R, S] @ D`` (the 1 adds the bias updates, the column sums of D, inside the second
    product: no separate full-size op per layer), of size R x S x (in + out) per task per
    step: attention of the rows over the task's support rows. Nothing of size N x out x in exists, in the forward, the
    inner gradients (taken with respect to the layer outputs, not the weights) or the
    backward. Second order is autograd through these same products; first order treats
    ``X`` and ``D`` as constants, as FOMAML treats the inner gradient. Padded support
    slots carry ``D = 0`` (their loss is masked out), so they add nothing.

    Materialised (``"materialized"``): the shared weights expanded to ``[N_b, out, in]``
    (a view until the first step), updated per task with the gradient of the summed
    support losses with respect to them (exactly each task's own gradient). It is the
    cheaper form for small layers and large tasks, whose implicit products grow with
    S x (K S + Q) x (in + out), and the only one for Meta-SGD's learned rate per weight
    element, which does not factor through ``D^T X``.

    Biases only (``"bias"``): the weights stay shared, each task adapts its own bias
    ``[N_b, out]``. FiLM (``"film"``): each task adapts a scale and shift of the layer's
    outputs, ``y (1 + s_t) + h_t``, both ``[N_b, out]`` starting from 0 (the identity): a
    learned starting point would add nothing the shared weights and bias cannot hold.
    """

    def __init__(self, layers: dict[str, str], params: Mapping[str, torch.Tensor], num_tasks: int,
                 first_order: bool) -> None:
        self.implicit = sorted(p for p, mode in layers.items() if mode == "implicit")
        self.first_order = first_order
        self.mode = layers
        self.weights: dict[str, torch.Tensor] = {}
        for p, mode in sorted(layers.items()):
            if mode in ("materialized", "bias"):
                for n in ("weight", "bias") if mode == "materialized" else ("bias",):
                    self.weights[p + n] = params[p + n].unsqueeze(0).expand(num_tasks, *params[p + n].shape)
            elif mode == "film":
                out = params[p + "bias"].shape[0]
                for n in FILM:
                    self.weights[p + n] = params[p + "bias"].new_zeros(num_tasks, out).requires_grad_()
        # prefix -> (X [N,M,in], lr*D [N,M,out]) of the M support rows of all steps so far
        self.past: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prefix -> (input, output) of the last call

    def linear(self, prefix: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        mode = self.mode.get(prefix)
        if mode == "materialized":  # x [N, R, in] -> [N, R, out]
            w = self.weights[prefix + "weight"]
            return torch.baddbmm(self.weights[prefix + "bias"].unsqueeze(1), x, w.transpose(1, 2))
        if mode == "bias":
            return F.linear(x, weight) + self.weights[prefix + "bias"].unsqueeze(1)
        if mode == "film":
            scale, shift = (self.weights[prefix + n].unsqueeze(1) for n in FILM)
            y = F.linear(x, weight, bias)
            return torch.addcmul(y + shift, y, scale)
        y = F.linear(x, weight, bias)
        past = self.past.get(prefix)
        if past is not None:
            xs, ds = past
            y = torch.baddbmm(y, torch.baddbmm(x.new_ones(()), x, xs.transpose(1, 2)), ds, alpha=-1)
        if prefix in self.implicit:
            self.seen[prefix] = (x, y)
        return y

    def wrt(self) -> list[torch.Tensor]:
        """What the inner gradient is taken with respect to, after a forward: the outputs of
        the implicit layers, then the materialised weights, in a fixed order."""
        return [self.seen[p][1] for p in self.implicit] + list(self.weights.values())

    def step(self, grads: list[torch.Tensor], lr: float | dict[str, torch.Tensor]) -> None:
        """One SGD step; ``grads`` match ``wrt()``. ``lr``: a scalar, or (Meta-SGD,
        materialised layers only) one tensor per parameter name."""
        it = iter(grads)
        for p in self.implicit:
            x, d = self.seen[p][0], next(it)
            if self.first_order:
                x = x.detach()
            d = d * cast(float, lr)  # implicit layers come with a scalar lr only (choose_fast_weights)
            if p in self.past:
                xs, ds = self.past[p]
                x, d = torch.cat([xs, x], dim=1), torch.cat([ds, d], dim=1)
            self.past[p] = (x, d)
        self.weights = {n: sgd_step(w, next(it), lr[n] if isinstance(lr, dict) else lr)
                        for n, w in self.weights.items()}
        self.seen = {}


def choose_fast_weights(head: Head, adapt_dense: list[str], mode: str, lr, steps: int, support_width: int,
                        query_width: int, dense_adaptation: str = "weights") -> dict[str, str]:
    """How each adapted layer of a bucket holds its fast weights (``FastWeights``):
    ``mode`` "implicit" or "materialized" for all, or "auto": materialised under Meta-SGD
    (a rate per weight element), else per layer whichever costs fewer multiply-adds per
    task beyond the shared forward: implicit S (in + out) (S K (K - 1) / 2 + Q K) for the
    products over the support rows, materialised K (S + 1) in out for the weight gradients
    and updates (S, Q: the bucket's padded support and query widths, times the rows the
    layer reads per row, ``Head.rows_per_row``: T for din's attention). ``dense_adaptation``
    "bias" or "film" (``meta.dense_adaptation``): that form for every chosen layer."""
    layers = {name + ".": mod for name, mod in adapted_layers(head, adapt_dense).items()}
    if dense_adaptation != "weights":  # "bias" or "film": small per-task tensors, one way to hold them
        return dict.fromkeys(layers, dense_adaptation)
    if mode == "auto" and isinstance(lr, dict):
        mode = "materialized"
    if mode != "auto":
        return {p: mode for p in layers}
    k = steps
    out = {}
    for p, mod in layers.items():
        r = head.rows_per_row(p[:-1])
        s, q = support_width * r, query_width * r
        implicit = s * (mod.in_features + mod.out_features) * (s * k * (k - 1) / 2 + q * k)
        materialized = k * (s + 1) * mod.in_features * mod.out_features
        out[p] = "implicit" if implicit < materialized else "materialized"
    return out


def sgd_step(w: torch.Tensor, g: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """w - lr * g as one op (one node fewer per parameter in the graph, per step)."""
    return torch.addcmul(w, lr, g, value=-1) if torch.is_tensor(lr) else torch.add(w, g, alpha=-lr)
