"""ESMM (``model.arch: esmm``): CTR and CVR towers, trained as pCTR and pCTCVR."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gmeta.models.heads.base import Head
from gmeta.models.layers import (
    DenseArch,
    OverArch,
    Params,
    fields,
)


class ESMMHead(Head):
    """ESMM (Ma et al., SIGIR 2018): a CTR tower and a CVR tower (``ctr``, ``cvr``: each
    ``model.over_arch`` hidden sizes and one logit) over x0, the F+1 vectors side by side.
    The labels are (click, conversion), in that order, of every impression: pCVR is never
    fitted on clicked rows alone but through pCTCVR = pCTR x pCVR against the conversion
    label, over the whole impression space.

    Outputs ``[..., R, 2]``: the CTR logit a, and the logit of pCTCVR, ``-logsumexp(-a, -b,
    -a-b)`` for the CVR logit b (1 - s(a) s(b) = s(a) s(b) (e^-a + e^-b + e^-(a+b))), whose
    log-sigmoid is log pCTCVR = logsigmoid(a) + logsigmoid(b), exact and finite for any a and
    b: the loss of the second label is then the binary cross-entropy of pCTCVR against the
    conversion label (``pointwise_loss`` as for any head). ``predict`` gives (pCTR, pCTCVR),
    the probabilities the two labels are scored against on every impression; pCVR, the
    probability of a conversion given a click, is ``pcvr(outputs)`` = pCTCVR / pCTR."""

    arch = "esmm"

    def __init__(self, num_dense: int, num_sparse: int, embedding_dim: int, dense_sizes: list[int],
                 over_sizes: list[int], objective: str = "binary", *,
                 label_weights: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__(objective, label_weights)
        if self.num_labels != 2 or objective != "binary":
            raise ValueError(f"ESMM: two binary labels (click, conversion), got {self.num_labels} label(s) and "
                             f"objective {objective!r} (features.labels, model.objective)")
        width = (num_sparse + 1) * embedding_dim
        self.dense_arch = DenseArch(num_dense, dense_sizes, embedding_dim)
        self.ctr = OverArch(width, over_sizes)
        self.cvr = OverArch(width, over_sizes)
        self.last_layer = f"ctr.mlp.layers.{len(over_sizes)}"  # (the CTR tower's; last_layers: both)

    def last_layers(self) -> list[str]:
        return [self.last_layer, self.last_layer.replace("ctr.", "cvr.", 1)]

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        x0 = fields(self.dense_arch(dense, params, "dense_arch."), pooled).flatten(-2)
        a, b = self.ctr(x0, params, "ctr."), self.cvr(x0, params, "cvr.")
        ctcvr = -torch.logsumexp(torch.stack([-a, -b, -(a + b)], dim=-1), dim=-1)
        return torch.stack([a, ctcvr], dim=-1)

    @staticmethod
    def pcvr(out: torch.Tensor) -> torch.Tensor:
        """pCVR = pCTCVR / pCTR of outputs ``[..., R, 2]``: ``[..., R]`` (as sigmoid(b),
        computed from the outputs alone, in log space)."""
        return torch.exp(F.logsigmoid(out[..., 1]) - F.logsigmoid(out[..., 0]))


