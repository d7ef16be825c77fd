"""The id generator's training objective (Meta-Embedding, Pan et al., SIGIR 2019).

For the new ids of ``generator.feature`` in a meta-batch (rows start from ``generated``,
``MetaDLRM.start_rows``), per (task, id) group g with support rows S_g and query rows Q_g:

    cold  = (1 / S) sum over the support rows r of a new id:  loss_r(e_g)
    e'_g  = e_g - warmup_lr * d/de_g [ (1 / |S_g|) sum_{r in S_g} loss_r(e_g) ]
    warm  = (1 / Q) sum over the query rows r of a new id:    loss_r(e'_g)

with the head and every other row as they are (no other adaptation), S and Q the batch's
support and query rows (rows of known ids add 0: no count read back from the device), and
e_g the generated row. Meta-Embedding's warm-up step takes the gradient of the id's mean
loss on its first batch; here that batch is the id's support rows in the task, so a group
with no support rows is scored from e_g itself (zero-shot). Terms are means over rows, so
several processes weight them by their share of the global rows (``MetaOutput.terms``).

``generator.mode``:
* ``base_fixed``: the loss is w x cold + (1 - w) x warm (w = ``generator.cold_weight``),
  and only the generator learns: tables and head enter as constants.
* ``joint``: the meta-learner's own loss (``meta.algorithm``) already scores the query rows
  after adapting the generated rows, Meta-Embedding's warm-up term; w x cold is added.
"""

from __future__ import annotations

import torch

from gmeta.config import Config
from gmeta.layout import BatchLayout
from gmeta.meta.base import MetaOutput, gather_rows
from gmeta.models.dlrm import MetaDLRM
from gmeta.models.heads import Head
from gmeta.types import TaskBatch


def _per_task(point: torch.Tensor, row_task: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per-task mean of row losses ``[R_part]`` (for the logs)."""
    total = point.detach().new_zeros(count.shape[0]).index_add(0, row_task, point.detach())
    return total / count.clamp(min=1)


def generator_terms(head: Head, rows: torch.Tensor, new: torch.Tensor, batch: TaskBatch, layout: BatchLayout,
                    feature: int, *, warmup_lr: float, warm: bool = True, frozen_head: bool = False
                    ) -> dict[str, torch.Tensor]:
    """The cold-start and warm-up terms of the module docstring.

    ``rows`` [U, D]: the batch's distinct rows, new ids already generated; ``new`` [U]: which
    distinct ids are new ids of ``feature`` (``MetaDLRM.start_rows``). ``warm``: also the
    warm-up term (``base_fixed``); ``frozen_head``: the head's weights as constants.

    Returns {"cold", "warm" (if ``warm``): scalars; "new_share": the share of the batch's
    rows whose id is new (a constant); "support_loss", "query_loss": [N] per-task means
    over all their rows, before and after the warm-up step (for the logs)}.
    """
    L = layout
    nf, n_s, n_q, nnz_s = L.num_cells, L.num_support, L.num_query, L.num_support_occurrences
    params = {n: p.detach() for n, p in head.named_parameters()} if frozen_head else None
    groups = gather_rows(rows, L.group_unique)  # [G, D] the (task, feature, id) groups
    new_g = new.index_select(0, L.group_unique)  # [G]
    occ_row = torch.div(L.slot, nf, rounding_mode="floor")
    # each row holds exactly one id of the (single-valued) feature: is it new, and its group
    of_feature = (L.slot % nf) == feature
    occ_new = new_g.index_select(0, L.occ_group) & of_feature
    row_new = torch.zeros(L.num_rows, dtype=rows.dtype, device=rows.device).index_add(
        0, occ_row, occ_new.to(rows.dtype))
    row_group = torch.zeros(L.num_rows, dtype=L.occ_group.dtype, device=rows.device).index_add(
        0, occ_row, torch.where(of_feature, L.occ_group, torch.zeros_like(L.occ_group)))
    new_s, new_q = row_new[:n_s], row_new[n_s:]
    slot_s, slot_q = L.slot[:nnz_s], L.slot_q
    div_s, div_q = L.divisor[: n_s * nf], L.divisor[n_s * nf:]
    dense_s, dense_q = batch.dense[:n_s], batch.dense[n_s:]
    labels_s, labels_q = batch.labels[:n_s], batch.labels[n_s:]

    def row_losses(source: torch.Tensor, occ: torch.Tensor, slot, div, dense, labels, num: int) -> torch.Tensor:
        pooled = L.pool(gather_rows(source, occ), slot, div, num)
        return head.pointwise_loss(head(dense, pooled, params), labels)

    loss_s = row_losses(groups, L.occ_group[:nnz_s], slot_s, div_s, dense_s, labels_s, n_s)
    out = {"cold": (loss_s * new_s).sum() / max(n_s, 1),
           "new_share": row_new.sum() / max(L.num_rows, 1),
           "support_loss": _per_task(loss_s, L.row_task[:n_s], L.s_count)}
    if not warm:
        return out
    # the warm-up step: each new group's row moves on the mean loss of its own support rows
    count_s = torch.zeros(L.num_groups, dtype=rows.dtype, device=rows.device).index_add(
        0, row_group[:n_s], new_s)
    mean_weight = new_s / count_s.index_select(0, row_group[:n_s]).clamp(min=1)
    (grad,) = torch.autograd.grad((loss_s * mean_weight).sum(), groups, create_graph=True)
    warmed = groups - warmup_lr * grad * new_g.unsqueeze(1).to(grad.dtype)
    loss_q = row_losses(warmed, L.occ_group[nnz_s:], slot_q, div_q, dense_q, labels_q, n_q)
    out["warm"] = (loss_q * new_q).sum() / max(n_q, 1)
    out["query_loss"] = _per_task(loss_q, L.row_task[n_s:], L.q_count)
    return out


def base_fixed_objective(model: MetaDLRM, rows: torch.Tensor, new: torch.Tensor, batch: TaskBatch,
                         layout: BatchLayout, cfg: Config) -> MetaOutput:
    """``generator.mode: base_fixed``: w x cold + (1 - w) x warm, the generator alone learning."""
    g = cfg.generator
    assert model.generator is not None
    t = generator_terms(model.head, rows, new, batch, layout, model.generator.feature, warmup_lr=g.warmup_lr,
                        frozen_head=True)
    w = g.cold_weight
    terms = [(w * t["cold"], layout.num_support), ((1 - w) * t["warm"], layout.num_query)]
    out = MetaOutput(loss=terms[0][0] + terms[1][0], query_loss=t["query_loss"], support_loss=t["support_loss"],
                     terms=terms)
    out.extra = {"generator_cold_loss": t["cold"].detach(), "generator_warm_loss": t["warm"].detach(),
                 "generator_new_share": t["new_share"]}
    return out


def add_cold_term(out: MetaOutput, model: MetaDLRM, rows: torch.Tensor, new: torch.Tensor, batch: TaskBatch,
                  layout: BatchLayout, cfg: Config) -> MetaOutput:
    """``generator.mode: joint``: the meta-learner's loss plus w x cold."""
    assert model.generator is not None
    t = generator_terms(model.head, rows, new, batch, layout, model.generator.feature,
                        warmup_lr=cfg.generator.warmup_lr, warm=False)
    term = cfg.generator.cold_weight * t["cold"]
    terms = out.terms or [(out.loss, batch.num_tasks)]  # (empty: one mean over the batch's tasks)
    out.terms = terms + [(term, layout.num_support)]
    out.loss = out.loss + term
    out.extra = {**out.extra, "generator_cold_loss": t["cold"].detach(), "generator_new_share": t["new_share"]}
    return out
