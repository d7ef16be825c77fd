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
feature, id) is one group (``gmeta.layout``); the inner loop differentiates with
respect to the group rows, so each task gets its own fast rows, applied to every occurrence
of the same id in its support and query rows. This equals real per-row fast weights
(tested against a plain per-task reference).

All index arithmetic comes precomputed with the batch (``BatchLayout``): a step launches
no op whose output size depends on values and reads nothing back from the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.profiler import record_function

from gmeta.config import Config, MetaConfig
from gmeta.layout import BatchLayout
from gmeta.meta.base import MetaOutput, gather_rows, sum_terms, task_losses
from gmeta.meta.erm import erm_loss
from gmeta.meta.fast_weights import FastWeights, choose_fast_weights, sgd_step
from gmeta.models.dlrm import MetaDLRM
from gmeta.models.heads import Head
from gmeta.types import TaskBatch


def adapt_and_query(
    head: Head,
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
    dense_adaptation: str = "weights",
    adapt_features: list[int] | None = None,
    on_adapted: Callable[[list[FastWeights], torch.Tensor | None], None] | None = None,
    on_query: tuple[set[int], Callable[[int, torch.Tensor], None]] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Adapt every task on its support rows (``steps`` SGD steps), score its query rows.

    ``rows`` [U, D]: the looked-up embeddings of the batch's distinct ids
    (``layout.unique_ids``); ``layout``: the batch's ``BatchLayout``.

    Returns (query outputs [Q] of the head, [Q, L] with L labels (logits for a binary
    objective), in query-block order, or None unless ``with_logits``;
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
    ``dense_adaptation``: what adapts in the chosen layers: "weights" (and biases), "bias"
    (biases only) or "film" (a per-task scale and shift of their outputs).
    ``adapt_features``: with ``adapt_embeddings``, the indices of the features whose rows
    adapt (None: all); the others keep their shared rows.
    ``on_adapted``: called once the inner loop is done with each size bucket's
    ``FastWeights`` and the adapted per-task rows (``[G, D]``, one per ``layout.group_unique``;
    None when no rows adapt), before the query forward (Reptile reads them).
    ``on_query``: (ks, fn): ``fn(k, query outputs)`` after k < ``steps`` inner steps, for each
    k in ks, on the way (no gradient): a curve over K from one trajectory, the outputs
    those of ``steps=k``.
    """
    if fast_weights not in ("auto", "implicit", "materialized"):
        raise ValueError(f"fast_weights must be auto, implicit or materialized, got {fast_weights!r}")
    if fast_weights == "implicit" and isinstance(lr, dict):
        raise ValueError("implicit fast weights need one scalar inner learning rate; Meta-SGD's rate per "
                         "weight element needs fast_weights='materialized' (or 'auto')")
    L = layout
    nf, n_s, n_q, nnz_s = L.num_features, L.num_support, L.num_query, L.num_support_occurrences
    n = L.s_count.shape[0]
    adapt_rows = adapt_embeddings and steps > 0 and adapt_features != []
    if adapt_rows and adapt_features is not None and len(set(adapt_features)) < nf:
        # a rate of 0 for the rows of the other features: [F, D] or [F, 1], taken per group below
        keep = torch.zeros(nf, 1, dtype=rows.dtype, device=rows.device)
        for feature in set(adapt_features):  # int indices: fills on the device, no index tensor copied from a list
            keep[feature].fill_(1.0)
        emb_lr = keep * emb_lr
    if adapt_rows:  # each task's own copy of the rows it looks up: the unit it adapts
        groups = gather_rows(rows, L.group_unique)
        occ_s, occ_q, source = L.occ_group[:nnz_s], L.occ_group[nnz_s:], groups
    else:
        occ_s, occ_q, source = L.occ_unique[:nnz_s], L.occ_unique[nnz_s:], rows
    slot_s, slot_q = L.slot[:nnz_s], L.slot_q
    div_s, div_q = L.divisor[: n_s * L.num_cells], L.divisor[n_s * L.num_cells:]
    labels_s, labels_q = batch.labels[:n_s], batch.labels[n_s:]
    dense_s, dense_q = batch.dense[:n_s], batch.dense[n_s:]
    buckets = L.buckets
    in_order_s, in_order_q = L.in_order()
    # rows [R, ...] -> padded per task [N_b, W_b, ...], per bucket
    ys = [per_task(labels_s, b.s_index, in_order_s) for b in buckets]
    xs = [per_task(dense_s, b.s_index, in_order_s) for b in buckets]
    params = dict(head.named_parameters())
    fast = [FastWeights(choose_fast_weights(head, adapt_dense, fast_weights, lr, steps, b.s_index.shape[1],
                                            b.q_index.shape[1], dense_adaptation),
                        params, b.tasks.shape[0], first_order) for b in buckets]
    support_loss0 = torch.full((n,), float("nan"), dtype=batch.labels.dtype, device=batch.labels.device)

    def query(source: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(query outputs in query-block order or None unless ``logits``, per-task query
        loss), at the current fast weights."""
        emb_q = gather_rows(source, occ_q)
        pooled_q = L.pool(emb_q, slot_q, div_q, n_q)
        parts, flat = [], []
        for i, b in enumerate(buckets):
            logits_q = head(per_task(dense_q, b.q_index, in_order_q), per_task(pooled_q, b.q_index, in_order_q),
                            fast[i])
            parts.append(task_losses(head, logits_q, per_task(labels_q, b.q_index, in_order_q), b.q_mask,
                                     b.q_count))
            flat.append(logits_q.flatten(0, 1))  # [N_b W_b] or, with several labels, [N_b W_b, L]
        # padded slots of all buckets -> the query rows in query-block order
        out = torch.cat(flat).index_select(0, L.query_order) if logits else None
        return out, torch.cat(parts)[L.task_order]

    with record_function("## inner_adapt ##"):
        for k in range(steps):
            if on_query is not None and k in on_query[0]:
                with torch.no_grad():
                    logits, _ = query(source)
                assert logits is not None
                on_query[1](k, logits)
            emb_s = gather_rows(source, occ_s)
            pooled_s = L.pool(emb_s, slot_s, div_s, n_s)
            parts = []
            for i, b in enumerate(buckets):
                logits_s = head(xs[i], per_task(pooled_s, b.s_index, in_order_s), fast[i])
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
                source = sgd_step(source, g, emb_lr[L.group_feature] if torch.is_tensor(emb_lr) else emb_lr)
    if on_adapted is not None:
        on_adapted(fast, source if adapt_rows else None)

    with record_function("## query_fwd ##"):
        logits, query_loss = query(source, with_logits)
        return logits, query_loss, support_loss0


def per_task(x: torch.Tensor, index: torch.Tensor, in_order: bool) -> torch.Tensor:
    """Rows ``[R, ...]`` -> a bucket's padded per-task layout ``[N_b, W_b, ...]``: a reshape
    (a view of contiguous rows) when the bucket holds every row in order
    (``BatchLayout.in_order``), else a gather."""
    return x.reshape(*index.shape, *x.shape[1:]) if in_order else gather_rows(x, index)


def maml_loss(head: Head, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout, *, steps: int,
              lr: float | dict[str, torch.Tensor], emb_lr: float | torch.Tensor, first_order: bool,
              erm_weight: float = 0.0, query_weighting: str = "task", **adapt) -> MetaOutput:
    """Meta-loss of a meta-batch: the query loss after adaptation, a mean over the tasks
    (``query_weighting`` "task") or over all query rows ("row": a task weighs as many query
    rows as it has); plus, with ``erm_weight`` > 0, that weight times the plain (unadapted)
    loss over every row of the batch, support and query: the shared model and the tables
    then also learn from every row, as ERM does, not only from query rows after adaptation.
    ``adapt``: what adapts (``adapt_and_query``'s adapt_dense, adapt_embeddings, ...)."""
    _, query_loss, support_loss = adapt_and_query(
        head, rows, batch, layout, steps=steps, lr=lr, emb_lr=emb_lr, with_logits=False, first_order=first_order,
        **adapt)
    if query_weighting == "row":
        terms = [((query_loss * layout.q_count).sum() / layout.num_query, layout.num_query)]
    elif query_weighting == "task":
        terms = [(query_loss.mean(), query_loss.shape[0])]
    else:
        raise ValueError(f"query_weighting must be task or row, got {query_weighting!r}")
    if erm_weight > 0:
        terms.append((erm_loss(head, rows, batch, layout).loss * erm_weight, layout.num_rows))
    return sum_terms(query_loss, support_loss, terms)


def adaptation(model: MetaDLRM, m: MetaConfig) -> dict:
    """What the inner loop adapts, from ``meta.*``, as ``adapt_and_query`` takes it."""
    names = [f["name"] for f in model.features]
    return {"adapt_dense": m.adapt_dense, "adapt_embeddings": m.adapt_embeddings,
            "adapt_features": [names.index(n) for n in m.adapt_features] or None,
            "dense_adaptation": m.dense_adaptation, "fast_weights": m.fast_weights}


def objective(model: MetaDLRM, rows: torch.Tensor, batch: TaskBatch, layout: BatchLayout, cfg: Config) -> MetaOutput:
    """``meta.algorithm: maml`` (and Meta-SGD, first-order MAML): the query loss after K
    inner steps on each task's support rows (and the ERM anchor, ``meta.erm_weight``)."""
    m = cfg.meta
    lr, emb_lr = model.inner_lrs(m.inner_lr, m.embedding_inner_lr)
    return maml_loss(model.head, rows, batch, layout, steps=m.inner_steps, lr=lr, emb_lr=emb_lr,
                     first_order=m.first_order, erm_weight=m.erm_weight, query_weighting=m.query_weighting,
                     **adaptation(model, m))
