"""MAML the way it is usually written with ``torch.func``, for the benchmarks to race gmeta.

The contenders compute exactly what gmeta's step computes (same model, weights, rows and
hyperparameters: K SGD steps on each task's support rows adapting the listed dense parts
and the task's own copy of its looked-up embedding rows, mean query loss, one backward),
starting from the same looked-up rows ``[U, D]``:

- ``loop_loss``: a Python loop over tasks; each task adapts with
  ``torch.func.functional_call`` + ``torch.autograd.grad`` (learn2learn / higher style).
- ``vmap_loss``: the tasks padded to one size and the whole per-task inner loop batched
  with ``torch.func.vmap`` over ``torch.func.grad`` (the functorch MAML recipe).
- ``vmap_bucketed_loss``: the same, once per size bucket of the batch's layout (the
  buckets gmeta runs, ``meta.size_buckets``), each bucket padded to its own largest task:
  what a user who pads no task to the batch's largest would write.

Padding slots of the vmap versions carry zero weight in the losses and pool into a spare
cell that is dropped, so all are exact (tested against gmeta in tests/test_benchmarks.py,
with behaviour sequences in tests/test_benchmark_din.py). Occurrences pool into the
layout's cells, ``layout.num_cells`` C per row (slot = row * C + cell): one per feature,
and a sequence's ``max_length`` T each, as gmeta pools them (gmeta/layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from gmeta.layout import BatchLayout
from gmeta.models.heads import adapted_parameter_names
from gmeta.types import TaskBatch


@dataclass
class TaskViews:
    """Per-task index plans (data preparation, not timed)."""

    loop: list[dict]  # per task: its rows and occurrences, unpadded
    padded: dict  # [N, ...] tensors for vmap
    num_cells: int  # C, the cells of a row the slots index (layout.num_cells)


def _check_cells(nc: int, views: TaskViews) -> None:
    # the pooled cells are viewed as [rows, nc, D]: a wrong nc would reshape them into other
    # rows' cells without any error of shape
    if nc != views.num_cells:
        raise ValueError(f"nc={nc}: the views' layout has {views.num_cells} cells per row (layout.num_cells; a "
                         "sequence feature takes its max_length cells, so it is not the number of features)")


def task_views(batch: TaskBatch, layout: BatchLayout) -> TaskViews:
    """The plans, worked out on the host from host copies of a batch on any device, and
    placed on that device (no CPU operand left in a device op of the timed losses)."""
    device = batch.dense.device
    L = {k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in vars(layout).items()}
    nc, n_s = layout.num_cells, layout.num_support
    so, qo = batch.support_offsets.cpu().numpy(), batch.query_offsets.cpu().numpy()
    n = len(so) - 1
    row_task = L["row_task"]
    gu = L["group_unique"]
    # groups are sorted by (task, id): each task's groups are one contiguous range
    g_task = np.empty(len(gu), np.int64)
    occ_group, slot, nnz_s = L["occ_group"], L["slot"], layout.num_support_occurrences
    occ_row = slot // nc
    g_task[occ_group] = row_task[occ_row]
    g_start = np.searchsorted(g_task, np.arange(n + 1))
    dense, labels = batch.dense.cpu(), batch.labels.cpu()
    loop = []
    for t in range(n):
        s_rows = np.arange(so[t], so[t + 1])
        q_rows = n_s + np.arange(qo[t], qo[t + 1])
        sel_s = np.flatnonzero((occ_row[:nnz_s] >= so[t]) & (occ_row[:nnz_s] < so[t + 1]))
        sel_q = nnz_s + np.flatnonzero((occ_row[nnz_s:] >= q_rows[0]) & (occ_row[nnz_s:] <= q_rows[-1]))
        loop.append({
            "groups": torch.from_numpy(gu[g_start[t]:g_start[t + 1]]),
            "dense_s": dense[s_rows], "y_s": labels[s_rows], "dense_q": dense[q_rows], "y_q": labels[q_rows],
            "occ_s": torch.from_numpy(occ_group[sel_s] - g_start[t]),
            "slot_s": torch.from_numpy(slot[sel_s] - so[t] * nc),
            "occ_q": torch.from_numpy(occ_group[sel_q] - g_start[t]),
            "slot_q": torch.from_numpy(slot[sel_q] - q_rows[0] * nc),
            "div_s": torch.from_numpy(L["divisor"][so[t] * nc: so[t + 1] * nc]).to(dense.dtype),
            "div_q": torch.from_numpy(L["divisor"][q_rows[0] * nc: (q_rows[-1] + 1) * nc]).to(dense.dtype),
        })
    s_max = max(len(v["y_s"]) for v in loop)
    q_max = max(len(v["y_q"]) for v in loop)
    g_max = max(len(v["groups"]) for v in loop)
    os_max = max(len(v["occ_s"]) for v in loop)
    oq_max = max(len(v["occ_q"]) for v in loop)

    def pad(x: torch.Tensor, size: int, value=0) -> torch.Tensor:
        out = x.new_full((size, *x.shape[1:]), value)
        out[: len(x)] = x
        return out

    padded = {
        "groups": torch.stack([pad(v["groups"], g_max) for v in loop]),
        "dense_s": torch.stack([pad(v["dense_s"], s_max) for v in loop]),
        "y_s": torch.stack([pad(v["y_s"], s_max) for v in loop]),
        "m_s": torch.stack([pad(torch.ones(len(v["y_s"]), dtype=dense.dtype), s_max) for v in loop]),
        "dense_q": torch.stack([pad(v["dense_q"], q_max) for v in loop]),
        "y_q": torch.stack([pad(v["y_q"], q_max) for v in loop]),
        "m_q": torch.stack([pad(torch.ones(len(v["y_q"]), dtype=dense.dtype), q_max) for v in loop]),
        "occ_s": torch.stack([pad(v["occ_s"], os_max) for v in loop]),
        "slot_s": torch.stack([pad(v["slot_s"], os_max, s_max * nc) for v in loop]),  # spare cell
        "occ_q": torch.stack([pad(v["occ_q"], oq_max) for v in loop]),
        "slot_q": torch.stack([pad(v["slot_q"], oq_max, q_max * nc) for v in loop]),
        "div_s": torch.stack([pad(v["div_s"], s_max * nc, 1) for v in loop]),
        "div_q": torch.stack([pad(v["div_q"], q_max * nc, 1) for v in loop]),
    }
    return TaskViews([{k: v.to(device) for k, v in t.items()} for t in loop],
                     {k: v.to(device) for k, v in padded.items()}, nc)


def _pool(rows: torch.Tensor, occ: torch.Tensor, slot: torch.Tensor, div: torch.Tensor, num_rows: int,
          nc: int) -> torch.Tensor:
    """Occurrences into ``[num_rows, C, D]`` cells, a sequence's T cells each (``nc`` = C)."""
    cells = rows.new_zeros(div.shape[0] + 1, rows.shape[-1]).index_add(0, slot, rows[occ])
    return (cells[:-1] / div.unsqueeze(-1)).view(num_rows, nc, -1)


def _loss(head, params, rows, dense, y, m, occ, slot, div, nc):
    pooled = _pool(rows, occ, slot, div, dense.shape[0], nc)
    out = functional_call(head, params, (dense, pooled))
    return (head.pointwise_loss(out, y) * m).sum() / m.sum()


def loop_loss(head, rows: torch.Tensor, views: TaskViews, nc: int, kw: dict) -> torch.Tensor:
    """Per task: clone-free fast weights through functional_call, autograd.grad per step.
    ``nc``: the cells per row, ``layout.num_cells`` (ValueError if not the views')."""
    _check_cells(nc, views)
    params = dict(head.named_parameters())
    adapted = adapted_parameter_names(head, kw["adapt_dense"])
    losses = []
    for v in views.loop:
        fast = dict(params)
        fast_rows = rows[v["groups"]]
        # one weight per row, whatever the labels per row ([R] or [R, L])
        ones_s, ones_q = v["dense_s"].new_ones(len(v["y_s"])), v["dense_q"].new_ones(len(v["y_q"]))
        for _ in range(kw["steps"]):
            loss = _loss(head, fast, fast_rows, v["dense_s"], v["y_s"], ones_s, v["occ_s"], v["slot_s"], v["div_s"],
                         nc)
            wrt = [fast[n] for n in adapted] + ([fast_rows] if kw["adapt_embeddings"] else [])
            g = torch.autograd.grad(loss, wrt, create_graph=not kw["first_order"])
            for i, n in enumerate(adapted):
                fast[n] = fast[n] - kw["lr"] * g[i]
            if kw["adapt_embeddings"]:
                fast_rows = fast_rows - kw["emb_lr"] * g[-1]
        losses.append(_loss(head, fast, fast_rows, v["dense_q"], v["y_q"], ones_q, v["occ_q"], v["slot_q"],
                            v["div_q"], nc))
    return torch.stack(losses).mean()


def vmap_loss(head, rows: torch.Tensor, views: TaskViews, nc: int, kw: dict) -> torch.Tensor:
    """All tasks at once: vmap over a per-task inner loop written with torch.func.grad.
    ``nc``: the cells per row, ``layout.num_cells`` (ValueError if not the views')."""
    _check_cells(nc, views)
    params = {n: p for n, p in head.named_parameters()}
    adapted = {n: params[n] for n in adapted_parameter_names(head, kw["adapt_dense"])}
    frozen = {n: p for n, p in params.items() if n not in adapted}
    p = views.padded

    def support(fast, fast_rows, d):
        return _loss(head, {**frozen, **fast}, fast_rows, d["dense_s"], d["y_s"], d["m_s"], d["occ_s"], d["slot_s"],
                     d["div_s"], nc)

    def task(fast, groups, d):
        fast_rows = rows[groups]
        for _ in range(kw["steps"]):
            g_fast, g_rows = grad(support, argnums=(0, 1))(fast, fast_rows, d)
            if kw["first_order"]:
                g_fast = {n: g.detach() for n, g in g_fast.items()}
                g_rows = g_rows.detach()
            fast = {n: w - kw["lr"] * g_fast[n] for n, w in fast.items()}
            if kw["adapt_embeddings"]:
                fast_rows = fast_rows - kw["emb_lr"] * g_rows
        return _loss(head, {**frozen, **fast}, fast_rows, d["dense_q"], d["y_q"], d["m_q"], d["occ_q"], d["slot_q"],
                     d["div_q"], nc)

    data = {k: v for k, v in p.items() if k != "groups"}
    return vmap(task, in_dims=(None, 0, 0))(adapted, p["groups"], data).mean()


def bucket_views(batch: TaskBatch, layout: BatchLayout) -> list[TaskViews]:
    """The tasks of each of the layout's size buckets (the buckets gmeta runs), padded to
    their own bucket's largest task rather than to the batch's (data preparation, not timed)."""
    views = task_views(batch, layout)
    out = []
    for b in layout.buckets:
        loop = [views.loop[t] for t in b.tasks.cpu().tolist()]  # (host indices: the batch may be on a GPU)
        out.append(TaskViews(loop, pad_tasks(loop, layout.num_cells), layout.num_cells))
    return out


def pad_tasks(loop: list[dict], nc: int) -> dict:
    """``[N, ...]`` tensors of the given tasks' views, each padded to the largest of them:
    ``task_views``'s padding, for any subset of the tasks; ``nc`` the cells per row."""
    s_max = max(len(v["y_s"]) for v in loop)
    q_max = max(len(v["y_q"]) for v in loop)

    def stack(key: str, size: int, value=0) -> torch.Tensor:
        parts = [v[key] for v in loop]
        out = parts[0].new_full((len(parts), size, *parts[0].shape[1:]), value)
        for i, x in enumerate(parts):
            out[i, : len(x)] = x
        return out

    def mask(key: str, size: int) -> torch.Tensor:
        x = loop[0]["dense_s"]
        counts = torch.tensor([len(v[key]) for v in loop], device=x.device)
        return (torch.arange(size, device=x.device) < counts[:, None]).to(x.dtype)

    return {
        "groups": stack("groups", max(len(v["groups"]) for v in loop)),
        "dense_s": stack("dense_s", s_max), "y_s": stack("y_s", s_max), "m_s": mask("y_s", s_max),
        "dense_q": stack("dense_q", q_max), "y_q": stack("y_q", q_max), "m_q": mask("y_q", q_max),
        "occ_s": stack("occ_s", max(len(v["occ_s"]) for v in loop)),
        "slot_s": stack("slot_s", max(len(v["slot_s"]) for v in loop), s_max * nc),  # padding: the spare cell
        "occ_q": stack("occ_q", max(len(v["occ_q"]) for v in loop)),
        "slot_q": stack("slot_q", max(len(v["slot_q"]) for v in loop), q_max * nc),
        "div_s": stack("div_s", s_max * nc, 1), "div_q": stack("div_q", q_max * nc, 1),
    }


def vmap_bucketed_loss(head, rows: torch.Tensor, buckets: list[TaskViews], nc: int, kw: dict) -> torch.Tensor:
    """``vmap_loss`` once per size bucket (``bucket_views``), as one would write it to pad each
    task only to its own bucket's largest: the mean over all tasks of the buckets' task means,
    weighted by their task counts."""
    n = sum(len(b.loop) for b in buckets)
    return torch.stack([vmap_loss(head, rows, b, nc, kw) * (len(b.loop) / n) for b in buckets]).sum()
