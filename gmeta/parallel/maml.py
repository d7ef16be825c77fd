"""MAML inner and outer loop over a meta-batch, vectorized over its N tasks.

The inner loop is a pure function of (dense params, looked-up embeddings): it never calls
``.backward()`` (that would fire torchrec's fused embedding optimizer and any gradient
hooks), only ``torch.autograd.grad``, and it never communicates. Per-task fast weights are
the shared weights expanded to ``[N, ...]``: the gradient of the sum of the N per-task
support losses with respect to that expanded tensor is exactly each task's own gradient.

Fast embedding rows: the gradient of a task's support loss with respect to table row r is
the sum of its gradients at every occurrence of r in that task. Grouping occurrences by
(task, feature, id) and scatter-adding gives each task its own fast rows, applied to every
occurrence of the same id in its support and query rows. This equals real per-row fast
weights (tested against a plain per-task reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

from gmeta.models.dlrm import DLRMHead, LinearHook, Lookup, MetaLinear, pool
from gmeta.types import TaskBatch


@dataclass
class SizeBucket:
    """Index tensors that move rows of some tasks of a TaskBatch into a padded layout.

    tasks   [N_b]        the tasks (indices into the batch)
    s_index [N_b, S_b]   support row (0..S-1) at each padded slot, 0 where padding
    s_mask  [N_b, S_b]   True at real rows
    s_count [N_b]        support rows per task (float)
    q_index, q_mask, q_count   the same for query rows, indexing the query block (0..Q-1)
    """

    tasks: torch.Tensor
    s_index: torch.Tensor
    s_mask: torch.Tensor
    s_count: torch.Tensor
    q_index: torch.Tensor
    q_mask: torch.Tensor
    q_count: torch.Tensor


@dataclass
class TaskLayout:
    """Where the rows of each task of a TaskBatch go.

    buckets   the tasks in groups of similar size, each padded to its own largest task:
              padding everything to the largest wastes most of the work when task sizes
              follow a power law. With one bucket: all tasks in order.
    row_task  [S+Q] task of every row
    """

    buckets: list[SizeBucket]
    row_task: torch.Tensor
    num_support: int
    num_query: int


def _padded(offsets: np.ndarray, tasks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, counts = offsets[:-1], offsets[1:] - offsets[:-1]
    if tasks is not None:
        starts, counts = starts[tasks], counts[tasks]
    width = int(counts.max()) if counts.size else 0
    ar = np.arange(width)
    mask = ar[None, :] < counts[:, None]
    index = np.where(mask, starts[:, None] + ar[None, :], 0)
    return index, mask, counts


def _split_points(sizes: list[int], num_buckets: int) -> list[int]:
    """Cut points of ascending ``sizes`` into at most ``num_buckets`` contiguous groups,
    chosen greedily to minimise the padded work sum(len(group) * max(group)): the most
    costly group is split where that saves most, until no split saves anything."""
    cuts = [0, len(sizes)]
    for _ in range(num_buckets - 1):
        best = (0, None)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            whole = (hi - lo) * sizes[hi - 1]
            for c in range(lo + 1, hi):
                saved = whole - (c - lo) * sizes[c - 1] - (hi - c) * sizes[hi - 1]
                if saved > best[0]:
                    best = (saved, c)
        if best[1] is None:
            break
        cuts = sorted(cuts + [best[1]])
    return cuts


def _bucket(tasks: np.ndarray, s: tuple, q: tuple, device: torch.device, dtype: torch.dtype) -> SizeBucket:
    def t(a: np.ndarray, dt=None) -> torch.Tensor:
        x = torch.from_numpy(a)
        if dt is not None:
            x = x.to(dt)
        return x if device.type == "cpu" else x.to(device, non_blocking=True)

    return SizeBucket(t(tasks), t(s[0]), t(s[1]), t(s[2], dtype), t(q[0]), t(q[1]), t(q[2], dtype))


def size_buckets(batch: TaskBatch, num_buckets: int) -> list[SizeBucket]:
    """Group the tasks, sorted by size, into at most ``num_buckets`` buckets of least padding."""
    so, qo = batch.support_offsets.cpu().numpy(), batch.query_offsets.cpu().numpy()
    size = np.diff(so) + np.diff(qo)
    order = np.argsort(size, kind="stable")
    cuts = _split_points(size[order].tolist(), num_buckets)
    dev, dt = batch.labels.device, batch.labels.dtype
    return [_bucket(tasks, _padded(so, tasks), _padded(qo, tasks), dev, dt)
            for tasks in (order[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:]))]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for an index of any shape, through index_select: its backward is an
    index_add, where plain indexing backward is a serial accumulating index_put on CPU."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def task_layout(batch: TaskBatch, num_buckets: int = 1) -> TaskLayout:
    """Index tensors for the padded per-task layouts of a batch. Pure index arithmetic on
    the N+1 offsets, done in numpy: a few dozen numbers, where torch's per-op overhead
    made it 3% of a meta step."""
    so, qo = batch.support_offsets.cpu().numpy(), batch.query_offsets.cpu().numpy()
    dev, dt = batch.labels.device, batch.labels.dtype
    n = len(so) - 1
    s_count, q_count = np.diff(so), np.diff(qo)
    if num_buckets > 1:
        buckets = size_buckets(batch, num_buckets)
    else:
        buckets = [_bucket(np.arange(n), _padded(so), _padded(qo), dev, dt)]
    row_task = np.concatenate([np.repeat(np.arange(n), s_count), np.repeat(np.arange(n), q_count)])
    return TaskLayout(buckets, torch.from_numpy(row_task).to(dev), int(s_count.sum()), int(q_count.sum()))


def task_losses(head: DLRMHead, out: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                count: torch.Tensor) -> torch.Tensor:
    """Masked mean per task of the head's pointwise loss: [N, R] -> [N]."""
    return (head.pointwise_loss(out, labels) * mask).sum(dim=1) / count.clamp(min=1)


@dataclass
class SplitLookup:
    """Occurrences of a Lookup split into the support block and the query block."""

    values_s: torch.Tensor
    slot_s: torch.Tensor
    group_s: torch.Tensor
    values_q: torch.Tensor
    slot_q: torch.Tensor
    group_q: torch.Tensor
    scale_s: torch.Tensor
    scale_q: torch.Tensor
    num_groups: int
    group_feature: torch.Tensor | None  # [G] feature of each group


def split_lookup(lk: Lookup, layout: TaskLayout, num_features: int, group: bool) -> SplitLookup:
    row = lk.slot // num_features
    is_s = row < layout.num_support
    sel_s = is_s.nonzero().squeeze(1)
    sel_q = (~is_s).nonzero().squeeze(1)
    num_groups = 0
    groups = torch.zeros_like(lk.ids)
    group_feature = None
    if group:
        # key = (task, feature, id); ids < 2^40 and N * F < 2^23 keep it inside int64
        key = ((layout.row_task[row] * num_features + lk.feature) << 40) | lk.ids
        uniq, groups = torch.unique(key, return_inverse=True)
        num_groups = int(uniq.numel())
        group_feature = (uniq >> 40) % num_features
    split = lk.scale.numel() // lk.num_rows * layout.num_support
    return SplitLookup(
        values_s=gather_rows(lk.values, sel_s), slot_s=lk.slot[sel_s], group_s=groups[sel_s],
        values_q=gather_rows(lk.values, sel_q), slot_q=lk.slot[sel_q] - layout.num_support * num_features,
        group_q=groups[sel_q], scale_s=lk.scale[:split], scale_q=lk.scale[split:], num_groups=num_groups,
        group_feature=group_feature,
    )


class ImplicitFastWeights(LinearHook):
    """Per-task fast weights of the adapted linear layers of one size bucket, never formed.

    The gradient of task t's support loss with respect to a layer's ``W`` is ``D^T X``: the
    loss's gradients at the layer's outputs ``D [S_t, out]`` times the layer's inputs
    ``X [S_t, in]`` on the task's support rows. After K SGD steps the task's layer applied
    to rows ``x`` is therefore exactly

        W_t x + b_t = W x + b - sum_k lr * (D_k^T (X_k x) + sum_s D_k[s])

    The heavy product ``W x`` is the shared-weight GEMM over every row of every task (as in
    ERM); the per-task part is two small batched products ``[R, S] = x X^T`` and
    ``[R, S] @ D``, of size R x S x (in + out) per task per step: attention of the rows
    over the task's support rows. Nothing of size N x out x in exists, in the forward, the
    inner gradients (taken with respect to the layer outputs, not the weights) or the
    backward. Second order is autograd through these same products; first order treats
    ``X`` and ``D`` as constants, as FOMAML treats the inner gradient.

    Padded support slots carry ``D = 0`` (their loss is masked out), so they add nothing.
    Only a scalar learning rate factors this way; Meta-SGD's rate per weight element does
    not, and keeps materialised weights (``adapt_and_query``'s ``fast_weights``).
    """

    def __init__(self, prefixes: list[str], first_order: bool) -> None:
        self.prefixes = set(prefixes)
        self.first_order = first_order
        self.past: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prefix -> (X [N,M,in], lr*D [N,M,out])
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prefix -> (input, output) of the last call

    def linear(self, prefix: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        past = self.past.get(prefix)
        if past is not None:
            xs, ds = past
            y = y - torch.baddbmm(ds.sum(1, keepdim=True), torch.bmm(x, xs.transpose(1, 2)), ds)
        if prefix in self.prefixes:
            self.seen[prefix] = (x, y)
        return y

    def outputs(self) -> list[torch.Tensor]:
        """Outputs of the adapted layers in the last forward, in a fixed order: what the
        inner gradient is taken with respect to."""
        return [self.seen[p][1] for p in sorted(self.seen)]

    def step(self, grads: list[torch.Tensor], lr: float | torch.Tensor) -> None:
        """One SGD step: ``grads`` are the loss's gradients at ``outputs()``."""
        for p, d in zip(sorted(self.seen), grads):
            x = self.seen[p][0]
            if self.first_order:
                x = x.detach()
            d = d * lr
            if p in self.past:
                xs, ds = self.past[p]
                x, d = torch.cat([xs, x], dim=1), torch.cat([ds, d], dim=1)
            self.past[p] = (x, d)
        self.seen = {}


def _adapted_layers(head: DLRMHead, adapt_dense: list[str]) -> list[str]:
    """Parameter-name prefixes of the MetaLinear layers under the adapted parts."""
    return [name + "." for name, mod in head.named_modules()
            if isinstance(mod, MetaLinear) and name.split(".")[0] in adapt_dense]


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
    lookup: Lookup,
    batch: TaskBatch,
    *,
    num_features: int,
    steps: int,
    lr: float | dict[str, torch.Tensor],
    emb_lr: float | torch.Tensor,
    adapt_dense: list[str],
    adapt_embeddings: bool,
    first_order: bool,
    layout: TaskLayout | None = None,
    size_buckets: int = 1,
    with_logits: bool = True,
    fast_weights: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Adapt every task on its support rows (``steps`` SGD steps), score its query rows.

    Returns (query outputs [Q] of the head (logits for a binary objective) in query-block
    order, or None unless ``with_logits``;
    per-task query loss [N]; per-task support loss before adaptation [N], NaN if steps == 0).

    Tasks run in ``size_buckets`` groups of similar size (each padded to its own largest
    task): a loop over a few buckets, never over tasks.

    ``first_order``: inner gradients are treated as constants (FOMAML); otherwise the graph
    of the inner steps is kept for the meta-gradient (second order).
    ``lr`` / ``emb_lr``: constants, or (Meta-SGD) a learned tensor per adapted parameter
    (parameter shape) and one [F, D] tensor for the embedding rows.
    ``fast_weights``: how the adapted dense layers hold each task's weights.
    "implicit" (``ImplicitFastWeights``): never formed, exact for a scalar ``lr``, and
    several times faster and smaller once layers have a few hundred units. "materialized":
    the shared weights expanded to ``[N_b, out, in]`` per bucket and updated per task, the
    only way a learned rate per weight element (Meta-SGD) applies. "auto": implicit unless
    ``lr`` is per element.
    """
    if fast_weights == "auto":
        fast_weights = "materialized" if isinstance(lr, dict) else "implicit"
    if fast_weights not in ("implicit", "materialized"):
        raise ValueError(f"fast_weights must be auto, implicit or materialized, got {fast_weights!r}")
    if fast_weights == "implicit" and isinstance(lr, dict):
        raise ValueError("implicit fast weights need one scalar inner learning rate; Meta-SGD's rate per "
                         "weight element needs fast_weights='materialized'")
    implicit = fast_weights == "implicit"
    layout = layout or task_layout(batch, size_buckets)
    n = batch.num_tasks
    sl = split_lookup(lookup, layout, num_features, group=adapt_embeddings and steps > 0)
    labels_s, labels_q = batch.labels[: layout.num_support], batch.labels[layout.num_support:]
    dense_s, dense_q = batch.dense[: layout.num_support], batch.dense[layout.num_support:]
    buckets = layout.buckets
    whole = len(buckets) == 1  # one bucket holding every task in order: no per-bucket gathers
    # rows [R, ...] -> padded per task [N_b, W_b, ...], per bucket
    ys = [gather_rows(labels_s, b.s_index) for b in buckets]
    xs = [gather_rows(dense_s, b.s_index) for b in buckets]
    order = torch.cat([b.tasks for b in buckets])
    inverse = torch.argsort(order)  # bucket order -> task order
    params = dict(head.named_parameters())
    adapted = [name for name in params if name.split(".")[0] in adapt_dense]
    # fast weights per bucket: every task starts from the shared weights, so each bucket's
    # are the parameters expanded to [N_b, ...] (a view, no copy and no gather)
    if implicit:
        fast = [ImplicitFastWeights(_adapted_layers(head, adapt_dense), first_order) for _ in buckets]
    else:
        fast = [{name: params[name].unsqueeze(0).expand(len(b.tasks), *params[name].shape) for name in adapted}
                for b in buckets]
    delta = None  # accumulated per-group embedding update [G, D]
    support_loss0 = torch.full((n,), float("nan"), device=batch.labels.device)

    with record_function("## inner_adapt ##"):
        for k in range(steps):
            emb_s = sl.values_s if delta is None else sl.values_s - gather_rows(delta, sl.group_s)
            pooled_s = pool(emb_s, sl.slot_s, sl.scale_s, layout.num_support, num_features)
            parts = []
            for i, b in enumerate(buckets):
                logits_s = head(xs[i], gather_rows(pooled_s, b.s_index), fast[i])
                parts.append(task_losses(head, logits_s, ys[i], b.s_mask, b.s_count))
            losses = torch.cat(parts)
            if k == 0:
                support_loss0 = losses.detach()[inverse]
            wrt = [f.outputs() for f in fast] if implicit else [list(f.values()) for f in fast]
            inputs = [t for part in wrt for t in part] + ([emb_s] if adapt_embeddings else [])
            grads = torch.autograd.grad(losses.sum(), inputs, create_graph=not first_order)
            it = iter(grads)
            if implicit:
                for f, part in zip(fast, wrt):
                    f.step([next(it) for _ in part], lr)
            else:
                fast = [{name: _sgd(w, next(it), lr[name] if isinstance(lr, dict) else lr) for name, w in f.items()}
                        for f in fast]
            if adapt_embeddings:
                g_emb = grads[-1]
                step = g_emb.new_zeros(sl.num_groups, g_emb.shape[-1]).index_add(0, sl.group_s, g_emb)
                step = step * (emb_lr[sl.group_feature] if torch.is_tensor(emb_lr) else emb_lr)
                delta = step if delta is None else delta + step

    with record_function("## query_fwd ##"):
        emb_q = sl.values_q if delta is None else sl.values_q - gather_rows(delta, sl.group_q)
        pooled_q = pool(emb_q, sl.slot_q, sl.scale_q, layout.num_query, num_features)
        parts, flat, where = [], [], []
        for i, b in enumerate(buckets):
            logits_q = head(gather_rows(dense_q, b.q_index), gather_rows(pooled_q, b.q_index), fast[i])
            parts.append(task_losses(head, logits_q, gather_rows(labels_q, b.q_index), b.q_mask, b.q_count))
            if with_logits:
                flat.append(logits_q[b.q_mask])
                where.append(b.q_index[b.q_mask])
        query_loss = torch.cat(parts)[inverse]
        if not with_logits:
            return None, query_loss, support_loss0
        flat_logits = torch.cat(flat)
        if not whole:  # back to query-block order
            flat_logits = flat_logits.new_zeros(layout.num_query).index_copy(0, torch.cat(where), flat_logits)
    return flat_logits, query_loss, support_loss0


def maml_loss(head: DLRMHead, lookup: Lookup, batch: TaskBatch, *, num_features: int, steps: int,
              lr: float | dict[str, torch.Tensor], emb_lr: float | torch.Tensor, adapt_dense: list[str],
              adapt_embeddings: bool, first_order: bool, size_buckets: int = 1,
              fast_weights: str = "auto") -> MetaOutput:
    """Meta-loss of a meta-batch: mean over its tasks of the query loss after adaptation."""
    _, query_loss, support_loss = adapt_and_query(
        head, lookup, batch, num_features=num_features, steps=steps, lr=lr, emb_lr=emb_lr,
        size_buckets=size_buckets, with_logits=False, fast_weights=fast_weights,
        adapt_dense=adapt_dense, adapt_embeddings=adapt_embeddings, first_order=first_order)
    return MetaOutput(loss=query_loss.mean(), query_loss=query_loss, support_loss=support_loss)


def erm_loss(head: DLRMHead, lookup: Lookup, batch: TaskBatch, *, num_features: int) -> MetaOutput:
    """Plain training of the same model on every row (support and query) of the batch."""
    pooled = pool(lookup.values, lookup.slot, lookup.scale, lookup.num_rows, num_features)
    logits = head(batch.dense, pooled)
    loss = head.pointwise_loss(logits, batch.labels).mean()
    layout = task_layout(batch)
    with torch.no_grad():
        e = layout.buckets[0]  # one bucket: every task, in order
        q = logits[layout.num_support:][e.q_index]
        ql = task_losses(head, q, batch.labels[layout.num_support:][e.q_index], e.q_mask, e.q_count)
        s = logits[: layout.num_support][e.s_index]
        sl = task_losses(head, s, batch.labels[: layout.num_support][e.s_index], e.s_mask, e.s_count)
    return MetaOutput(loss=loss, query_loss=ql, support_loss=sl)
