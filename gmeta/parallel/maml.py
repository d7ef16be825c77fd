"""MAML inner and outer loop over a meta-batch, vectorized over its N tasks.

The inner loop is a pure function of (dense params, looked-up embeddings): it never calls
``.backward()`` (that would fire torchrec's fused embedding optimizer and any gradient
hooks), only ``torch.autograd.grad``, and it never communicates.

Fast dense weights (``FastWeights``) are implicit, each task's SGD updates kept as the
products they are made of, never a per-task weight tensor; or materialised, the shared
weights expanded to ``[N, ...]``, where the gradient of the sum of the N per-task support
losses with respect to that expanded tensor is exactly each task's own gradient. Which
one, per layer and size bucket, is a matter of cost (``choose_fast_weights``), except for
Meta-SGD, which needs the materialised form.

Fast embedding rows: the gradient of a task's support loss with respect to table row r is
the sum of its gradients at every occurrence of r in that task. Each distinct (task,
feature, id) is one group (``gmeta.parallel.layout``); the inner loop differentiates with
respect to the group rows, so each task gets its own fast rows, applied to every occurrence
of the same id in its support and query rows. This equals real per-row fast weights
(tested against a plain per-task reference).

All index arithmetic comes precomputed with the batch (``BatchLayout``): a step launches
no op whose output size depends on values and reads nothing back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

from gmeta.models.dlrm import DLRMHead, LinearHook, MetaLinear
from gmeta.parallel.layout import BatchLayout
from gmeta.types import TaskBatch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an index of any shape, through index_select: its backward is an
    index_add, where plain indexing backward is a serial accumulating index_put on CPU."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def task_losses(head: DLRMHead, out: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                count: torch.Tensor) -> torch.Tensor:
    """Masked mean per task of the head's pointwise loss: [N, R] -> [N]."""
    return (head.pointwise_loss(out, labels) * mask).sum(dim=1) / count.clamp(min=1)


class FastWeights(LinearHook):
    """Per-task fast weights of the adapted linear layers of one size bucket (N_b tasks),
    each layer held one of two ways.

    Implicit (``"implicit"``): never formed. The gradient of task t's support loss with
    respect to a layer's ``W`` is ``D^T X``: the loss's gradients at the layer's outputs
    ``D [S_t, out]`` times the layer's inputs ``X [S_t, in]`` on the task's support rows.
    After K SGD steps the task's layer applied to rows ``x`` is therefore exactly

        W_t x + b_t = W x + b - sum_k lr * (D_k^T (X_k x) + sum_s D_k[s])

    The heavy product ``W x`` is the shared-weight GEMM over every row of every task (as in
    ERM); the per-task part is two small batched products ``[R, S] = x X^T`` and
    ``[R, S] @ D``, of size R x S x (in + out) per task per step: attention of the rows
    over the task's support rows. Nothing of size N x out x in exists, in the forward, the
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
    """

    def __init__(self, layers: dict[str, str], params: dict[str, torch.Tensor], num_tasks: int,
                 first_order: bool) -> None:
        self.implicit = sorted(p for p, mode in layers.items() if mode == "implicit")
        self.first_order = first_order
        self.weights = {p + n: params[p + n].unsqueeze(0).expand(num_tasks, *params[p + n].shape)
                        for p, mode in sorted(layers.items()) if mode == "materialized" for n in ("weight", "bias")}
        # prefix -> (X [N,M,in], lr*D [N,M,out], its sum over the M rows [N,1,out]: the bias update)
        self.past: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prefix -> (input, output) of the last call

    def linear(self, prefix: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        w = self.weights.get(prefix + "weight")
        if w is not None:  # materialised: x [N, R, in] -> [N, R, out]
            return torch.baddbmm(self.weights[prefix + "bias"].unsqueeze(1), x, w.transpose(1, 2))
        y = F.linear(x, weight, bias)
        past = self.past.get(prefix)
        if past is not None:
            xs, ds, dsum = past
            y = y - torch.baddbmm(dsum, torch.bmm(x, xs.transpose(1, 2)), ds)
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
            d = d * lr
            dsum = d.sum(1, keepdim=True)
            if p in self.past:
                xs, ds, prev = self.past[p]
                x, d, dsum = torch.cat([xs, x], dim=1), torch.cat([ds, d], dim=1), prev + dsum
            self.past[p] = (x, d, dsum)
        self.weights = {n: _sgd(w, next(it), lr[n] if isinstance(lr, dict) else lr) for n, w in self.weights.items()}
        self.seen = {}


def choose_fast_weights(head: DLRMHead, adapt_dense: list[str], mode: str, lr, steps: int, support_width: int,
                        query_width: int) -> dict[str, str]:
    """How each adapted layer of a bucket holds its fast weights (``FastWeights``):
    ``mode`` "implicit" or "materialized" for all, or "auto": materialised under Meta-SGD
    (a rate per weight element), else per layer whichever costs fewer multiply-adds per
    task beyond the shared forward: implicit S (in + out) (S K (K - 1) / 2 + Q K) for the
    products over the support rows, materialised K (S + 1) in out for the weight gradients
    and updates (S, Q: the bucket's padded support and query widths)."""
    layers = {name + ".": mod for name, mod in head.named_modules()
              if isinstance(mod, MetaLinear) and name.split(".")[0] in adapt_dense}
    if mode == "auto" and isinstance(lr, dict):
        mode = "materialized"
    if mode != "auto":
        return {p: mode for p in layers}
    s, q, k = support_width, query_width, steps
    out = {}
    for p, mod in layers.items():
        implicit = s * (mod.in_features + mod.out_features) * (s * k * (k - 1) / 2 + q * k)
        materialized = k * (s + 1) * mod.in_features * mod.out_features
        out[p] = "implicit" if implicit < materialized else "materialized"
    return out


def _sgd(w: torch.Tensor, g: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
    """w - lr * g as one op (one node fewer per parameter in the graph, per step)."""
    return torch.addcmul(w, lr, g, value=-1) if torch.is_tensor(lr) else torch.add(w, g, alpha=-lr)


@dataclass
class MetaOutput:
    """Results of one meta-batch. Losses are tensors; ``.item()`` them only on log steps."""

    loss: torch.Tensor  # scalar, what backward() runs on
    query_loss: torch.Tensor  # [N] per-task query loss after adaptation
    support_loss: torch.Tensor  # [N] per-task support loss before adaptation
    skipped: bool = False  # the loss was not finite: no update was applied (see gmeta.train)


def adapt_and_query(
    head: DLRMHead,
    rows: torch.Tensor,
    batch: TaskBatch,
    layout: BatchLayout,
    *,
    steps: int,
    lr: float | dict[str, torch.Tensor],
    emb_lr: float | torch.Tensor,
    adapt_dense: list[str],
    adapt_embeddings: bool,
    first_order: bool,
    with_logits: bool = True,
    fast_weights: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Adapt every task on its support rows (``steps`` SGD steps), score its query rows.

    ``rows`` [U, D]: the looked-up embeddings of the batch's distinct ids
    (``layout.unique_ids``); ``layout``: the batch's ``BatchLayout``.

    Returns (query outputs [Q] of the head (logits for a binary objective) in query-block
    order, or None unless ``with_logits``;
    per-task query loss [N]; per-task support loss before adaptation [N], NaN if steps == 0).

    Tasks run in the layout's size buckets (each padded to its own largest task): a loop
    over a few buckets, never over tasks.

    ``first_order``: inner gradients are treated as constants (FOMAML); otherwise the graph
    of the inner steps is kept for the meta-gradient (second order).
    ``lr`` / ``emb_lr``: constants, or (Meta-SGD) a learned tensor per adapted parameter
    (parameter shape) and one [F, D] tensor for the embedding rows.
    ``fast_weights``: how the adapted dense layers hold each task's weights (``FastWeights``):
    "implicit" (never formed; several times faster and smaller once layers have a few
    hundred units), "materialized" (``[N_b, out, in]`` per bucket; the only form for a
    learned rate per weight element), or "auto": chosen per layer and bucket by
    ``choose_fast_weights``. Every choice gives the same result.
    """
    if fast_weights not in ("auto", "implicit", "materialized"):
        raise ValueError(f"fast_weights must be auto, implicit or materialized, got {fast_weights!r}")
    if fast_weights == "implicit" and isinstance(lr, dict):
        raise ValueError("implicit fast weights need one scalar inner learning rate; Meta-SGD's rate per "
                         "weight element needs fast_weights='materialized' (or 'auto')")
    L = layout
    nf, n_s, n_q, nnz_s = L.num_features, L.num_support, L.num_query, L.num_support_occurrences
    n = L.s_count.shape[0]
    adapt_rows = adapt_embeddings and steps > 0
    if adapt_rows:  # each task's own copy of the rows it looks up: the unit it adapts
        groups = gather_rows(rows, L.group_unique)
        occ_s, occ_q, source = L.occ_group[:nnz_s], L.occ_group[nnz_s:], groups
    else:
        occ_s, occ_q, source = L.occ_unique[:nnz_s], L.occ_unique[nnz_s:], rows
    slot_s, slot_q = L.slot[:nnz_s], L.slot_q
    div_s, div_q = L.divisor[: n_s * nf], L.divisor[n_s * nf:]
    labels_s, labels_q = batch.labels[:n_s], batch.labels[n_s:]
    dense_s, dense_q = batch.dense[:n_s], batch.dense[n_s:]
    buckets = L.buckets
    # rows [R, ...] -> padded per task [N_b, W_b, ...], per bucket
    ys = [gather_rows(labels_s, b.s_index) for b in buckets]
    xs = [gather_rows(dense_s, b.s_index) for b in buckets]
    params = dict(head.named_parameters())
    fast = [FastWeights(choose_fast_weights(head, adapt_dense, fast_weights, lr, steps, b.s_index.shape[1],
                                            b.q_index.shape[1]), params, b.tasks.shape[0], first_order)
            for b in buckets]
    support_loss0 = torch.full((n,), float("nan"), dtype=batch.labels.dtype, device=batch.labels.device)

    with record_function("## inner_adapt ##"):
        for k in range(steps):
            emb_s = gather_rows(source, occ_s)
            pooled_s = L.pool(emb_s, slot_s, div_s, n_s)
            parts = []
            for i, b in enumerate(buckets):
                logits_s = head(xs[i], gather_rows(pooled_s, b.s_index), fast[i])
                parts.append(task_losses(head, logits_s, ys[i], b.s_mask, b.s_count))
            losses = torch.cat(parts)
            if k == 0:
                support_loss0 = losses.detach()[L.task_order]
            wrt = [f.wrt() for f in fast]
            inputs = [t for part in wrt for t in part] + ([source] if adapt_rows else [])
            grads = torch.autograd.grad(losses.sum(), inputs, create_graph=not first_order)
            it = iter(grads)
            for f, part in zip(fast, wrt):
                f.step([next(it) for _ in part], lr)
            if adapt_rows:
                g = grads[-1]
                source = source - g * (emb_lr[L.group_feature] if torch.is_tensor(emb_lr) else emb_lr)

    with record_function("## query_fwd ##"):
        emb_q = gather_rows(source, occ_q)
        pooled_q = L.pool(emb_q, slot_q, div_q, n_q)
        parts, flat = [], []
        for i, b in enumerate(buckets):
            logits_q = head(gather_rows(dense_q, b.q_index), gather_rows(pooled_q, b.q_index), fast[i])
            parts.append(task_losses(head, logits_q, gather_rows(labels_q, b.q_index), b.q_mask, b.q_count))
            flat.append(logits_q.reshape(-1))
        query_loss = torch.cat(parts)[L.task_order]
        if not with_logits:
            return None, query_loss, support_loss0
        # padded slots of all buckets -> the query rows in query-block order
        return torch.cat(flat).index_select(0, L.query_order), query_loss, support_loss0


def maml_loss(head: DLRMHead, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout, *, steps: int,
              lr: float | dict[str, torch.Tensor], emb_lr: float | torch.Tensor, adapt_dense: list[str],
              adapt_embeddings: bool, first_order: bool, fast_weights: str = "auto") -> MetaOutput:
    """Meta-loss of a meta-batch: mean over its tasks of the query loss after adaptation."""
    _, query_loss, support_loss = adapt_and_query(
        head, rows, batch, layout, steps=steps, lr=lr, emb_lr=emb_lr, with_logits=False,
        fast_weights=fast_weights, adapt_dense=adapt_dense, adapt_embeddings=adapt_embeddings,
        first_order=first_order)
    return MetaOutput(loss=query_loss.mean(), query_loss=query_loss, support_loss=support_loss)


def erm_loss(head: DLRMHead, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout) -> MetaOutput:
    """Plain training of the same model on every row (support and query) of the batch."""
    L = layout
    pooled = L.pool(gather_rows(rows, L.occ_unique), L.slot, L.divisor, L.num_rows)
    logits = head(batch.dense, pooled)
    point = head.pointwise_loss(logits, batch.labels)
    loss = point.mean()
    with torch.no_grad():  # per-task means, for the logs: segment sums over the row -> task map
        n = L.s_count.shape[0]
        per = point.new_zeros(2, n)
        per[0].index_add_(0, L.row_task[: L.num_support], point[: L.num_support])
        per[1].index_add_(0, L.row_task[L.num_support:], point[L.num_support:])
        sl, ql = per[0] / L.s_count.clamp(min=1), per[1] / L.q_count.clamp(min=1)
    return MetaOutput(loss=loss, query_loss=ql, support_loss=sl)
