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

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function
from torch.func import functional_call

from gmeta.models.dlrm import DLRMHead, Lookup, pool
from gmeta.types import TaskBatch


@dataclass
class TaskLayout:
    """Index tensors that move rows of a TaskBatch into a padded per-task layout.

    s_index [N, S_max]  support row (0..S-1) at each padded slot, 0 where padding
    s_mask  [N, S_max]  True at real rows
    s_count [N]         support rows per task (float)
    q_index, q_mask, q_count   the same for query rows, indexing the query block (0..Q-1)
    row_task [S+Q]      task of every row
    """

    s_index: torch.Tensor
    s_mask: torch.Tensor
    s_count: torch.Tensor
    q_index: torch.Tensor
    q_mask: torch.Tensor
    q_count: torch.Tensor
    row_task: torch.Tensor
    num_support: int
    num_query: int


def _padded(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = offsets[1:] - offsets[:-1]
    width = int(counts.max()) if counts.numel() else 0
    ar = torch.arange(width, device=offsets.device)
    mask = ar.unsqueeze(0) < counts.unsqueeze(1)
    index = torch.where(mask, offsets[:-1].unsqueeze(1) + ar.unsqueeze(0), torch.zeros_like(ar))
    return index, mask, counts


def task_layout(batch: TaskBatch) -> TaskLayout:
    s_index, s_mask, s_count = _padded(batch.support_offsets)
    q_index, q_mask, q_count = _padded(batch.query_offsets)
    n = batch.num_tasks
    tasks = torch.arange(n, device=s_count.device)
    row_task = torch.cat([torch.repeat_interleave(tasks, s_count), torch.repeat_interleave(tasks, q_count)])
    return TaskLayout(s_index, s_mask, s_count.to(batch.labels.dtype), q_index, q_mask,
                      q_count.to(batch.labels.dtype), row_task, int(s_count.sum()), int(q_count.sum()))


def task_losses(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Masked mean binary cross-entropy per task: [N, R] -> [N]."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (bce * mask).sum(dim=1) / count.clamp(min=1)


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
        values_s=lk.values[sel_s], slot_s=lk.slot[sel_s], group_s=groups[sel_s],
        values_q=lk.values[sel_q], slot_q=lk.slot[sel_q] - layout.num_support * num_features,
        group_q=groups[sel_q], scale_s=lk.scale[:split], scale_q=lk.scale[split:], num_groups=num_groups,
        group_feature=group_feature,
    )


@dataclass
class MetaOutput:
    """Results of one meta-batch. Losses are tensors; ``.item()`` them only on log steps."""

    loss: torch.Tensor  # scalar, what backward() runs on
    query_loss: torch.Tensor  # [N] per-task query loss after adaptation
    support_loss: torch.Tensor  # [N] per-task support loss before adaptation


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adapt every task on its support rows (``steps`` SGD steps), score its query rows.

    Returns (query logits [N, Q_max] (padded), per-task query loss [N], per-task support
    loss before adaptation [N], NaN if steps == 0).

    ``first_order``: inner gradients are treated as constants (FOMAML); otherwise the graph
    of the inner steps is kept for the meta-gradient (second order).
    ``lr`` / ``emb_lr``: constants, or (Meta-SGD) a learned tensor per adapted parameter
    (parameter shape) and one [F, D] tensor for the embedding rows.
    """
    layout = layout or task_layout(batch)
    n = batch.num_tasks
    sl = split_lookup(lookup, layout, num_features, group=adapt_embeddings and steps > 0)
    labels_s, labels_q = batch.labels[: layout.num_support], batch.labels[layout.num_support:]
    dense_s, dense_q = batch.dense[: layout.num_support], batch.dense[layout.num_support:]
    # rows [R, ...] -> padded per task [N, W, ...]
    ys, xs = labels_s[layout.s_index], dense_s[layout.s_index]

    params = dict(head.named_parameters())
    adapted = [name for name in params if name.split(".")[0] in adapt_dense]
    fast = {name: params[name].unsqueeze(0).expand(n, *params[name].shape) for name in adapted}
    delta = None  # accumulated per-group embedding update [G, D]
    support_loss0 = torch.full((n,), float("nan"), device=batch.labels.device)

    with record_function("## inner_adapt ##"):
        for k in range(steps):
            emb_s = sl.values_s if delta is None else sl.values_s - delta[sl.group_s]
            pooled_s = pool(emb_s, sl.slot_s, sl.scale_s, layout.num_support, num_features)
            logits_s = functional_call(head, {**params, **fast}, (xs, pooled_s[layout.s_index]))
            losses = task_losses(logits_s, ys, layout.s_mask, layout.s_count)
            if k == 0:
                support_loss0 = losses.detach()
            inputs = list(fast.values()) + ([emb_s] if adapt_embeddings else [])
            grads = torch.autograd.grad(losses.sum(), inputs, create_graph=not first_order)
            fast = {name: fast[name] - (lr[name] if isinstance(lr, dict) else lr) * g
                    for name, g in zip(fast, grads)}
            if adapt_embeddings:
                g_emb = grads[-1]
                step = g_emb.new_zeros(sl.num_groups, g_emb.shape[-1]).index_add(0, sl.group_s, g_emb)
                step = step * (emb_lr[sl.group_feature] if torch.is_tensor(emb_lr) else emb_lr)
                delta = step if delta is None else delta + step

    with record_function("## query_fwd ##"):
        emb_q = sl.values_q if delta is None else sl.values_q - delta[sl.group_q]
        pooled_q = pool(emb_q, sl.slot_q, sl.scale_q, layout.num_query, num_features)
        logits_q = functional_call(head, {**params, **fast}, (dense_q[layout.q_index], pooled_q[layout.q_index]))
        query_loss = task_losses(logits_q, labels_q[layout.q_index], layout.q_mask, layout.q_count)
    return logits_q, query_loss, support_loss0


def maml_loss(head: DLRMHead, lookup: Lookup, batch: TaskBatch, *, num_features: int, steps: int,
              lr: float | dict[str, torch.Tensor], emb_lr: float | torch.Tensor, adapt_dense: list[str],
              adapt_embeddings: bool, first_order: bool) -> MetaOutput:
    """Meta-loss of a meta-batch: mean over its tasks of the query loss after adaptation."""
    _, query_loss, support_loss = adapt_and_query(
        head, lookup, batch, num_features=num_features, steps=steps, lr=lr, emb_lr=emb_lr,
        adapt_dense=adapt_dense, adapt_embeddings=adapt_embeddings, first_order=first_order)
    return MetaOutput(loss=query_loss.mean(), query_loss=query_loss, support_loss=support_loss)


def erm_loss(head: DLRMHead, lookup: Lookup, batch: TaskBatch, *, num_features: int) -> MetaOutput:
    """Plain training of the same model on every row (support and query) of the batch."""
    pooled = pool(lookup.values, lookup.slot, lookup.scale, lookup.num_rows, num_features)
    logits = head(batch.dense, pooled)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    layout = task_layout(batch)
    with torch.no_grad():
        q = logits[layout.num_support:][layout.q_index]
        ql = task_losses(q, batch.labels[layout.num_support:][layout.q_index], layout.q_mask, layout.q_count)
        s = logits[: layout.num_support][layout.s_index]
        sl = task_losses(s, batch.labels[: layout.num_support][layout.s_index], layout.s_mask, layout.s_count)
    return MetaOutput(loss=loss, query_loss=ql, support_loss=sl)
