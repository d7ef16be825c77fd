"""What every head shares. ``Head``: the objective, its loss and predictions, its output
layer; and which of a head's layers the inner loop adapts (``meta.adapt_dense``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gmeta.models.layers import (
    MetaLinear,
    Params,
)


class ModelConfig(Protocol):
    """What a head is built from: gmeta.config.ModelConfig (``model.*``), read only here
    (named by its fields, so that this module does not import the config it helps check)."""

    @property
    def arch(self) -> str: ...
    @property
    def objective(self) -> str: ...
    @property
    def embedding_dim(self) -> int: ...
    @property
    def dense_arch(self) -> list[int]: ...
    @property
    def over_arch(self) -> list[int]: ...
    @property
    def cross_layers(self) -> int: ...
    @property
    def cross_rank(self) -> int: ...
    @property
    def cross_structure(self) -> str: ...
    @property
    def experts(self) -> int: ...
    @property
    def expert_arch(self) -> list[int]: ...
    @property
    def attention_arch(self) -> list[int]: ...


class Head(nn.Module):
    """What every head shares: the objective and its loss and predictions, and the name of
    its output layer (``last``: ANIL's layer; its bias starts a regression at the mean label).

    Shapes: dense ``[..., R, nd]``, pooled ``[..., R, F, D]`` -> outputs ``[..., R]``, or
    ``[..., R, L]`` with L > 1 labels; the leading dim is the task dim N when per-task
    weights ``[N, ...]`` are passed in ``params``.
    ``objective`` (model.objective) says what an output is: a logit ("binary") or the
    prediction itself ("regression"); ``pointwise_loss`` and ``predict`` follow it.
    ``label_weights`` (features.label_weights, one per label): their number is L, and a
    row's loss is the weighted sum of its labels' losses.
    """

    arch: ClassVar[str]
    # False: the head takes one cell per feature, and a sequence's cells reach it summed
    # (``__call__``); True: it reads them (din)
    reads_cells: ClassVar[bool] = False
    last_layer: str  # module name of the output layer
    loss_weights: torch.Tensor  # [L] buffer (not saved: the config holds it), with L > 1 only
    cell_feature: torch.Tensor | None  # [C] buffer: the feature of each cell, with sequences only
    kept_cells: torch.Tensor | None  # [C'] buffer: the cells the head reads, with features.sparse[].head false only

    def __init__(self, objective: str, label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        if not label_weights:
            raise ValueError("label_weights: one weight per label, got none")
        self.objective = objective
        self.num_labels = len(label_weights)
        self.register_buffer("cell_feature", None, persistent=False)
        self.register_buffer("kept_cells", None, persistent=False)
        self.num_cells = 0  # the cells of a row with sequences (set_cells), else 0: not checked
        if self.num_labels > 1:
            self.register_buffer("loss_weights", torch.tensor([float(w) for w in label_weights]), persistent=False)

    @classmethod
    def from_config(cls, m: ModelConfig, num_dense: int, num_sparse: int,
                    label_weights: Sequence[float] = (1.0,), features: Sequence[dict] | None = None) -> Head:
        """The head sized by ``model.*`` (every concrete head takes these arguments first),
        with one output per label weight. ``features``: the sparse features' configs, read by
        heads that need more than their number (din)."""
        return cls(num_dense, num_sparse, m.embedding_dim, m.dense_arch, m.over_arch,  # type: ignore[call-arg, arg-type, misc]
                   m.objective, label_weights=label_weights)

    def set_cells(self, widths: Sequence[int], in_head: Sequence[bool] | None = None) -> None:
        """The cells per row of each feature (a sequence's ``max_length``, else 1). With a
        sequence, a head that does not read cells gets each sequence's cells summed into one,
        what a multi_hot feature pooled by sum gives, so it keeps ``[..., R, F, D]``.
        ``in_head``: per feature, whether the head reads it (features.sparse[].head); the
        cells of the others are dropped before anything else."""
        in_head = [True] * len(widths) if in_head is None else list(in_head)
        if all(w == 1 for w in widths) and all(in_head):
            return
        self.num_cells = sum(widths)
        if not all(in_head):
            starts = [sum(widths[:f]) for f in range(len(widths))]
            keep = [c for f, w in enumerate(widths) if in_head[f] for c in range(starts[f], starts[f] + w)]
            self.register_buffer("kept_cells", torch.tensor(keep), persistent=False)
            widths = [w for w, h in zip(widths, in_head) if h]
        if self.reads_cells or all(w == 1 for w in widths):
            return
        feature = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(list(widths)))
        self.register_buffer("cell_feature", feature, persistent=False)
        self.num_summed = len(widths)  # a Python int: the shape below needs no host sync

    def __call__(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        if self.num_cells and pooled.shape[-2] != self.num_cells:
            raise ValueError(f"{self.arch} head: {pooled.shape[-2]} cells per row, the features take "
                             f"{self.num_cells} (a layout built without the sequences' cell widths?)")
        keep: torch.Tensor | None = self.kept_cells
        if keep is not None:  # features only the id generator reads
            pooled = pooled.index_select(-2, keep)
        cells: torch.Tensor | None = self.cell_feature
        if cells is not None:
            shape = (*pooled.shape[:-2], self.num_summed, pooled.shape[-1])
            pooled = pooled.new_zeros(shape).index_add(-2, cells, pooled)
        return super().__call__(dense, pooled, params)

    def rows_per_row(self, layer: str) -> int:
        """Rows of its own that the layer named ``layer`` (a module name) applies to per row
        of the batch: 1, but T for din's attention, which reads each (row, position) pair of
        a sequence; ``meta.fast_weights: auto`` counts a layer's cost with it."""
        return 1

    def output_layer(self) -> MetaLinear:
        layer = self.get_submodule(self.last_layer)
        assert isinstance(layer, MetaLinear)
        return layer

    def last_layers(self) -> list[str]:
        """The output layers (``meta.adapt_dense: [last]``): ``last_layer``, or one per
        label's tower in a head with a tower per label."""
        return [self.last_layer]

    def init_output_bias(self, mean: float | list[float]) -> None:
        """Start the outputs at the labels' mean (one number, or one per label): a regression
        then learns the features first rather than the scale."""
        bias = self.output_layer().bias
        with torch.no_grad():
            bias.copy_(torch.as_tensor(mean, dtype=bias.dtype))

    def pointwise_loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of every row (no reduction): binary cross-entropy on logits, or squared error;
        with several labels (``out`` and ``labels`` ``[..., R, L]``), the sum of the labels'
        losses weighted by ``label_weights``: ``[..., R]``."""
        if self.objective == "regression":
            per = (out - labels) ** 2
        else:
            per = F.binary_cross_entropy_with_logits(out, labels, reduction="none")
        if self.num_labels == 1:
            return per
        return per @ self.loss_weights.to(per.dtype)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs -> predictions: probabilities (sigmoid of the logits), or the outputs as they
        are; ``[..., R, L]`` with several labels, one column per label."""
        return out if self.objective == "regression" else torch.sigmoid(out)


def adapted_layers(head: Head, adapt_dense: list[str]) -> dict[str, MetaLinear]:
    """The linear layers ``meta.adapt_dense`` selects, by module name: ``all`` (every layer
    of the head), a part (``dense_arch``, ``over_arch``, ``cross``, ...: all its layers), one
    layer (``over_arch.mlp.layers.1``), or ``last``, the output layer (ANIL: adapt the head's
    last layer only)."""
    layers = {name: mod for name, mod in head.named_modules() if isinstance(mod, MetaLinear)}
    out = {}
    for part in adapt_dense:
        if part == "all":
            out.update(layers)
            continue
        names = head.last_layers() if part == "last" else [part]
        chosen = {n: m for n, m in layers.items() if any(n == name or n.startswith(name + ".") for name in names)}
        if not chosen:
            raise ValueError(f"meta.adapt_dense: {part!r} names no layer of the head; its layers: {sorted(layers)}")
        out.update(chosen)
    return out


def adapted_parameter_names(head: Head, adapt_dense: list[str]) -> list[str]:
    """The names of the head's parameters ``meta.adapt_dense`` selects (weights and biases of
    ``adapted_layers``), in ``named_parameters`` order."""
    layers = adapted_layers(head, adapt_dense)
    return [n for n, _ in head.named_parameters() if n.rpartition(".")[0] in layers]


def head_parts(head: nn.Module) -> list[str]:
    """The names of the head's parts that hold linear layers (what ``meta.adapt_dense`` may
    name whole): its direct children with a MetaLinear in them."""
    return [name for name, child in head.named_children()
            if isinstance(child, MetaLinear) or any(isinstance(m, MetaLinear) for m in child.modules())]


FILM = ("film_scale", "film_shift")  # the per-task parameters of a FiLM-adapted layer: [out] each


def adapted_shapes(head: Head, adapt_dense: list[str], dense_adaptation: str) -> dict[str, torch.Size]:
    """Name and shape of every per-task parameter the inner loop adapts in the head (what
    Meta-SGD learns a rate for): the chosen layers' weights and biases ("weights"), their
    biases ("bias"), or their FiLM scale and shift ("film", ``<layer>.film_scale``)."""
    out = {}
    for name, mod in adapted_layers(head, adapt_dense).items():
        if dense_adaptation == "film":
            out.update({f"{name}.{n}": torch.Size([mod.out_features]) for n in FILM})
        else:
            for n in ("weight", "bias") if dense_adaptation == "weights" else ("bias",):
                out[f"{name}.{n}"] = getattr(mod, n).shape
    return out
