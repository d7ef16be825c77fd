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

One module per head (``dlrm``, ``dcn_v2``, ``deepfm``, ``wide_deep``, ``mmoe``, ``esmm``,
``din``) on the shared layers of gmeta.models.layers and the ``Head`` of ``base``; ``HEADS``
registers them by ``model.arch``: a new head is one new module and one entry. The package
needs torch alone (not torchrec): config validation builds a head to name its layers.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from gmeta.layout import cell_widths
from gmeta.models.heads.base import (
    FILM,
    Head,
    ModelConfig,
    adapted_layers,
    adapted_parameter_names,
    adapted_shapes,
    head_parts,
)
from gmeta.models.heads.dcn_v2 import DCNv2Head
from gmeta.models.heads.deepfm import DeepFMHead
from gmeta.models.heads.din import DINHead, din_pairs
from gmeta.models.heads.dlrm import DLRMHead
from gmeta.models.heads.esmm import ESMMHead
from gmeta.models.heads.mmoe import MMoEHead
from gmeta.models.heads.wide_deep import WideDeepHead
from gmeta.models.layers import CrossLayer, LinearHook, MetaLinear, Params

__all__ = ["FILM", "HEADS", "CrossLayer", "DCNv2Head", "DINHead", "DLRMHead", "DeepFMHead", "ESMMHead", "Head",
           "LinearHook", "MMoEHead", "MetaLinear", "ModelConfig", "Params", "WideDeepHead", "adapted_layers",
           "adapted_parameter_names", "adapted_shapes", "build_head", "din_pairs", "head_parts"]


HEADS: dict[str, type[Head]] = {h.arch: h for h in (DLRMHead, DCNv2Head, DeepFMHead, WideDeepHead, MMoEHead,
                                                     ESMMHead, DINHead)}


def build_head(m: ModelConfig, num_dense: int, num_sparse: int, label_weights: Sequence[float] = (1.0,),
               features: Sequence[dict] | None = None) -> Head:
    """The head ``model.arch`` names, sized by the config, with an output per label
    (``label_weights``: features.label_weights, one per label). ``features``: the sparse
    features' configs (as dicts): their sequences' cells (None: no sequence), and which the
    head reads (``head``; the others' cells are dropped: the id generator's inputs only)."""
    in_head = [f.get("head", True) for f in features] if features is not None else [True] * num_sparse
    kept = [f for f, h in zip(features, in_head) if h] if features is not None else None
    head = HEADS[m.arch].from_config(m, num_dense, sum(in_head), label_weights, kept)
    head.set_cells(cell_widths(features) if features is not None else [1] * num_sparse, in_head)
    return head


