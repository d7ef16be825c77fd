"""The dense heads of gmeta's models (``model.arch``), from named parts.

Every model is the same sparse arch (one torchrec table per feature, per-id rows the inner
loop can adapt) under one of these heads: (dense features ``[..., R, nd]``, pooled rows
``[..., R, F, D]``, optional per-task weights) -> outputs ``[..., R]``, or ``[..., R, L]``
for the L labels of ``features.labels`` (the output layer then has L units; a row's loss is
the sum of its labels' losses weighted by ``features.label_weights``).

============  ===============================================================================
arch          head (parts, the names ``meta.adapt_dense`` takes)
============  ===============================================================================
dlrm          dense_arch -> dot interaction of the F+1 vectors -> over_arch
dcn_v2        dense_arch, then x0 = the F+1 vectors side by side; ``cross`` layers
              x_{l+1} = x0 * (W_l x_l + b_l) + x_l (full rank, or W_l = U_l V_l of rank r),
              stacked (cross -> over_arch) or parallel (cross || over_arch -> ``output``)
deepfm        dense_arch; first-order ``linear`` (x0) + FM second order of the F+1 vectors +
              deep over_arch (x0), summed
wide_deep     ``wide`` linear (the raw dense features and the F pooled rows) + deep
              dense_arch -> over_arch (x0), summed
mmoe          dense_arch; E ``experts`` (MLPs over x0); per label a ``gates`` layer (softmax
              over the experts, x0) mixing the experts' outputs into its ``towers`` MLP
esmm          dense_arch; a CTR and a CVR tower over x0 (``ctr``, ``cvr``); outputs the CTR
              logit and the logit of pCTCVR = pCTR x pCVR (labels: click, conversion)
din           dense_arch; per sequence feature an ``attention`` MLP weighing each behaviour
              by its match with the candidate; the interests, the other cells and the
              dense vector side by side -> over_arch
============  ===============================================================================

Every dense layer is a ``MetaLinear``: it takes ordinary weights ``[out, in]`` or per-task
weights ``[N, out, in]`` (with inputs ``[N, R, in]``), or a ``LinearHook`` computing it (the
implicit fast weights of gmeta.meta.fast_weights), so each adaptation form (weights, biases,
FiLM, Meta-SGD, first and second order, Reptile) applies to every head unchanged. The
operations between the layers that are not linear (ReLU, the dot interaction, the cross
layer's product with x0, the FM term) have no weights of their own: a task's fast weights
are those of the linear layers, and the inner gradient reaches them through those
operations by autograd (the implicit form takes it at each layer's output, whatever
follows).

The head takes its weights as an optional dict (``head(dense, pooled, params)``, names as in
``named_parameters``; the torchmeta ``MetaModule`` convention) rather than through
``torch.func.functional_call``: that swaps every parameter in and out of the modules on
each call, about 0.27 ms here, as much as the head's arithmetic on a meta-batch, and the
inner loop calls the head once per step and size bucket.

This module needs torch alone (not torchrec): config validation builds a head to name its
layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gmeta.meta.layout import cell_widths


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

    def __init__(self, objective: str, label_weights: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        if not label_weights:
            raise ValueError("label_weights: one weight per label, got none")
        self.objective = objective
        self.num_labels = len(label_weights)
        self.register_buffer("cell_feature", None, persistent=False)
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

    def set_cells(self, widths: Sequence[int]) -> None:
        """The cells per row of each feature (a sequence's ``max_length``, else 1). With a
        sequence, a head that does not read cells gets each sequence's cells summed into one,
        what a multi_hot feature pooled by sum gives, so it keeps ``[..., R, F, D]``."""
        if all(w == 1 for w in widths):
            return
        self.num_cells = sum(widths)
        if self.reads_cells:
            return
        feature = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(list(widths)))
        self.register_buffer("cell_feature", feature, persistent=False)
        self.num_summed = len(widths)  # a Python int: the shape below needs no host sync

    def __call__(self, dense: torch.Tensor, pooled: torch.Tensor, params: Params = None) -> torch.Tensor:
        if self.num_cells and pooled.shape[-2] != self.num_cells:
            raise ValueError(f"{self.arch} head: {pooled.shape[-2]} cells per row, the features take "
                             f"{self.num_cells} (a layout built without the sequences' cell widths?)")
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


HEADS: dict[str, type[Head]] = {h.arch: h for h in (DLRMHead, DCNv2Head, DeepFMHead, WideDeepHead, MMoEHead,
                                                     ESMMHead, DINHead)}


def build_head(m: ModelConfig, num_dense: int, num_sparse: int, label_weights: Sequence[float] = (1.0,),
               features: Sequence[dict] | None = None) -> Head:
    """The head ``model.arch`` names, sized by the config, with an output per label
    (``label_weights``: features.label_weights, one per label). ``features``: the sparse
    features' configs (as dicts): their sequences' cells (None: no sequence)."""
    head = HEADS[m.arch].from_config(m, num_dense, num_sparse, label_weights, features)
    head.set_cells(cell_widths(features) if features is not None else [1] * num_sparse)
    return head


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
