"""Plain-PyTorch MAML reference: a Python loop over tasks, each with real fast weights —
its own copy of every dense parameter and of every whole embedding table. Slow and obvious
on purpose; gmeta's vectorized step is tested against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from gmeta.types import TaskBatch


def row_losses(head: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The binary cross-entropy of each row, written out label by label: ``[R]`` outputs
    and labels as they are, ``[R, L]`` ones as the sum over the labels of the head's
    ``loss_weights`` times each label's own loss."""
    if labels.dim() == 1:
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    weights = head.loss_weights.tolist()
    assert logits.shape == labels.shape and labels.shape[1] == len(weights)
    return sum(w * F.binary_cross_entropy_with_logits(logits[:, i], labels[:, i], reduction="none")
               for i, w in enumerate(weights))


def embed(tables: dict[str, torch.Tensor], features: list[dict], batch: TaskBatch) -> torch.Tensor:
    """Pooled embeddings of every row: [S+Q, C, D], a cell per feature, or T for a sequence
    of max_length T (its i-th id in the i-th, zeros past its end), built row by row."""
    per = batch.sparse.to_dict()
    cols = []
    for f in features:
        jt = per[f["name"]]
        lengths = jt.lengths()
        table = tables[f["name"]]
        if f.get("max_length", 0):
            width, ids = f["max_length"], jt.values().tolist()
            cells, start = [], 0
            for n in lengths.tolist():
                row = [table[ids[start + i]] if i < n else table.new_zeros(table.shape[1]) for i in range(width)]
                cells.append(torch.stack(row))
                start += n
            cols.append(torch.stack(cells))
            continue
        rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        # (F.embedding_bag would be the natural call, but it has no double backward)
        pooled = table.new_zeros(len(lengths), table.shape[1]).index_add(0, rows, table[jt.values()])
        if f["pooling"] == "mean":
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(table.dtype)
        cols.append(pooled.unsqueeze(1))
    return torch.cat(cols, dim=1)


def adapted_names(head: torch.nn.Module, adapt_dense: list[str]) -> list[str]:
    """Parameter names meta.adapt_dense selects, written out plainly: every one ("all"), a
    part or a layer prefix, or "last" (the head's output layer)."""
    params = [n for n, _ in head.named_parameters()]
    if "all" in adapt_dense:
        return params
    prefixes = [p for a in adapt_dense for p in (head.last_layers() if a == "last" else [a])]
    return [n for n in params if any(n.startswith(p + ".") for p in prefixes)]


def task_query_losses(head: torch.nn.Module, tables: dict[str, torch.Tensor], features: list[dict],
                      batch: TaskBatch, *, steps: int, lr, emb_lr, adapt_dense: list[str],
                      adapt_embeddings: bool, first_order: bool, dense_adaptation: str = "weights",
                      adapt_features: list[int] | None = None) -> list[torch.Tensor]:
    """Each task's query loss after ``steps`` SGD steps on its support rows. FiLM
    (``dense_adaptation`` "film"): forward hooks scale and shift the chosen layers' outputs
    by the task's own [out] vectors, which start at 0."""
    s_total = batch.num_support
    so, qo = batch.support_offsets.tolist(), batch.query_offsets.tolist()
    dense = batch.dense.to(next(head.parameters()).dtype)
    labels = batch.labels.to(dense.dtype)
    names = adapted_names(head, adapt_dense)
    layers = sorted({n.rpartition(".")[0] for n in names})
    if dense_adaptation == "bias":
        names = [n for n in names if n.endswith(".bias")]
    film: dict[str, torch.Tensor] = {}
    modules = dict(head.named_modules())
    hooks = [modules[p].register_forward_hook(
        lambda mod, args, out, p=p: out * (1 + film[p + ".film_scale"]) + film[p + ".film_shift"])
        for p in layers] if dense_adaptation == "film" else []
    chosen = [f["name"] for i, f in enumerate(features) if adapt_features is None or i in adapt_features]
    out = []
    for t in range(batch.num_tasks):
        s_rows = torch.arange(so[t], so[t + 1])
        q_rows = s_total + torch.arange(qo[t], qo[t + 1])
        fast = dict(head.named_parameters())
        if dense_adaptation == "film":
            for p in layers:
                width = modules[p].out_features
                film[p + ".film_scale"] = torch.zeros(width, dtype=dense.dtype, requires_grad=True)
                film[p + ".film_shift"] = torch.zeros(width, dtype=dense.dtype, requires_grad=True)
            adapted = film
        else:
            adapted = fast
        keys = list(film) if dense_adaptation == "film" else names
        fast_tables = dict(tables)
        for _ in range(steps):
            pooled = embed(fast_tables, features, batch)[s_rows]
            logits = functional_call(head, fast, (dense[s_rows], pooled))
            loss = row_losses(head, logits, labels[s_rows]).mean()
            tnames = chosen if adapt_embeddings else []
            inputs = [adapted[n] for n in keys] + [fast_tables[n] for n in tnames]
            grads = torch.autograd.grad(loss, inputs, create_graph=not first_order)
            for n, g in zip(keys, grads[: len(keys)]):
                adapted[n] = adapted[n] - (lr[n] if isinstance(lr, dict) else lr) * g
            for n, g in zip(tnames, grads[len(keys):]):
                if torch.is_tensor(emb_lr):  # Meta-SGD: one rate per (feature, dim)
                    fi = [f["name"] for f in features].index(n)
                    fast_tables[n] = fast_tables[n] - emb_lr[fi] * g
                else:
                    fast_tables[n] = fast_tables[n] - emb_lr * g
        pooled = embed(fast_tables, features, batch)[q_rows]
        logits = functional_call(head, fast, (dense[q_rows], pooled))
        out.append(row_losses(head, logits, labels[q_rows]).mean())
    for h in hooks:
        h.remove()
    return out


def erm_row_losses(head: torch.nn.Module, tables: dict[str, torch.Tensor], features: list[dict],
                   batch: TaskBatch) -> torch.Tensor:
    """Unadapted loss of every row (support and query) of ``batch``: [S+Q]."""
    dense = batch.dense.to(next(head.parameters()).dtype)
    logits = head(dense, embed(tables, features, batch))
    return row_losses(head, logits, batch.labels.to(dense.dtype))


def reptile_directions(head: torch.nn.Module, tables: dict[str, torch.Tensor], features: list[dict],
                       batch: TaskBatch, *, steps: int, lr: float, emb_lr: float, adapt_dense: list[str],
                       adapt_embeddings: bool, dense_adaptation: str = "weights") -> dict[str, torch.Tensor]:
    """Reptile's meta-gradient, task by task: the mean over the batch's tasks of (shared -
    adapted) for every head parameter and every whole table (by name), each task adapted by
    ``steps`` plain SGD steps on its support rows."""
    so = batch.support_offsets.tolist()
    dense = batch.dense.to(next(head.parameters()).dtype)
    labels = batch.labels.to(dense.dtype)
    names = adapted_names(head, adapt_dense)
    if dense_adaptation == "bias":
        names = [n for n in names if n.endswith(".bias")]
    shared = {n: p.detach() for n, p in head.named_parameters()} | {n: t.detach() for n, t in tables.items()}
    total = {n: torch.zeros_like(v) for n, v in shared.items()}
    for t in range(batch.num_tasks):
        s_rows = torch.arange(so[t], so[t + 1])
        fast = dict(shared)
        moving = names + (list(tables) if adapt_embeddings else [])
        for _ in range(steps):
            inputs = {n: fast[n].clone().requires_grad_() for n in moving}
            now = fast | inputs
            pooled = embed({n: now[n] for n in tables}, features, batch)[s_rows]
            logits = functional_call(head, {n: now[n] for n, _ in head.named_parameters()},
                                     (dense[s_rows], pooled))
            loss = row_losses(head, logits, labels[s_rows]).mean()
            grads = torch.autograd.grad(loss, list(inputs.values()))
            for n, g in zip(moving, grads):
                fast[n] = fast[n] - (emb_lr if n in tables else lr) * g
        for n in total:
            total[n] += shared[n] - fast[n]
    return {n: v / batch.num_tasks for n, v in total.items()}
