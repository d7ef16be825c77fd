"""Scoring: adapt each task on its support rows and predict its query rows. Shared by
evaluation (``collect``), ``gmeta predict``, serving and ``MetaLearner``; the number of inner
steps K is chosen here (``inner_steps_for``) and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gmeta.config import Config
from gmeta.io.manifest import load_manifest
from gmeta.io.reader import TaskReader
from gmeta.layout import BatchLayout, layout_of
from gmeta.meta.maml import adapt_and_query, adaptation
from gmeta.models.dlrm import MetaDLRM, dense_autocast, model_device
from gmeta.types import TaskBatch


def inner_steps_for(cfg: Config, requested: int | None = None) -> int:
    """K, the inner steps to adapt with: ``requested`` when given (>= 0), else
    ``eval.inner_steps`` when set (>= 0), else ``meta.inner_steps`` (as trained)."""
    if requested is not None and requested >= 0:
        return int(requested)
    return cfg.eval.inner_steps if cfg.eval.inner_steps >= 0 else cfg.meta.inner_steps


def _inner(model) -> MetaDLRM:
    return model.module if hasattr(model, "module") else model


RowsFn = Callable[[MetaDLRM, torch.Tensor, BatchLayout], torch.Tensor]


OutputsFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def predict_queries(model, cfg: Config, batch: TaskBatch, steps: list[int],
                    initial_rows: RowsFn | None = None, outputs: OutputsFn | None = None) -> dict[int, np.ndarray]:
    """Predictions (``Head.predict``: probabilities, or values for regression) of the
    batch's query rows (query-block order) after K inner steps on each task's support rows,
    for every K in ``steps`` (0: no adaptation; a batch without support rows is scored as K = 0
    whatever K). One lookup and one layout serve every K.
    ``model``: a MetaDLRM, or one sharded by torchrec (then every rank must call this for
    the same number of batches). ``initial_rows(model, rows, layout)``: the looked-up rows
    ``[U, D]`` as adaptation starts from them (``gmeta.evaluation.warmup.initial_rows``); None: as looked up.
    ``outputs(head, out)``: what is returned of the head's outputs ``[Q, ...]`` (default
    ``head.predict``; serving adds ESMM's pCVR, ``gmeta.inference.serving.head_outputs``)."""
    inner = _inner(model)
    m = cfg.meta
    batch = batch.to(model_device(model), non_blocking=True)  # (nothing to do when it is there already)
    layout = layout_of(batch, inner.pooling, m.size_buckets, inner.cell_widths)
    with torch.no_grad():
        rows, _ = inner.start_rows(inner.lookup(layout), layout)  # new ids: their generated rows, if any
        if initial_rows is not None:
            rows = initial_rows(inner, rows, layout)
    # Inner gradients are taken with respect to the looked-up rows: make them a leaf.
    rows = rows.detach().requires_grad_(True)
    lr, emb_lr = inner.inner_lrs(m.inner_lr, m.embedding_inner_lr)
    out: dict[int, np.ndarray] = {}

    def keep(k: int, logits_q: torch.Tensor) -> None:
        logits = logits_q.detach().float()
        out[k] = (inner.head.predict(logits) if outputs is None else outputs(inner.head, logits)).cpu().numpy()

    # one trajectory of max(K) steps scores every K on its way (K steps are the same SGD steps
    # whatever follows them); no support rows: an inner step changes nothing (and its loss over
    # no rows has no shape to pool), so every K is K = 0
    last = max(steps) if batch.num_support else 0
    with torch.enable_grad(), dense_autocast(cfg, rows.device):
        logits_q, _, _ = adapt_and_query(
            inner.head, rows, batch, layout, steps=last, lr=lr, emb_lr=emb_lr, first_order=True,
            on_query=({k for k in steps if k < last}, keep), **adaptation(inner, m))
        assert logits_q is not None  # with_logits (default True): the logits are returned
        keep(last, logits_q)
    return {k: out[k if batch.num_support else 0] for k in steps}


def predict_query(model, cfg: Config, batch: TaskBatch, steps: int, outputs: OutputsFn | None = None) -> np.ndarray:
    """``predict_queries`` for one K."""
    return predict_queries(model, cfg, batch, [steps], outputs=outputs)[steps]


@dataclass
class Predictions:
    """Query rows of the evaluated tasks, and each scorer's predictions for them."""

    labels: list[np.ndarray] = field(default_factory=list)
    task_ids: list[np.ndarray] = field(default_factory=list)  # task of each row
    support_size: list[np.ndarray] = field(default_factory=list)  # support rows of its task, per row
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)  # scorer or "k=<K>" -> per batch

    def add(self, name: str, preds: np.ndarray) -> None:
        self.scores.setdefault(name, []).append(preds)

    def merge(self, others: list[Predictions]) -> Predictions:
        out = Predictions()
        for p in others:
            out.labels += p.labels
            out.task_ids += p.task_ids
            out.support_size += p.support_size
            for k, v in p.scores.items():
                out.scores.setdefault(k, []).extend(v)
        return out


def collect(model, cfg: Config, shards_dir: str | Path, *, inner_steps: int | None = None,
            baseline: tuple[MetaDLRM, Config] | None = None, fine_tuned: tuple[MetaDLRM, Config] | None = None,
            rank: int = 0, world_size: int = 1, batch_fn: Callable[[TaskBatch], TaskBatch] | None = None,
            initial_rows: RowsFn | None = None) -> Predictions:
    """Score this rank's share of the held-out tasks (split ``eval.split``) with every scorer
    and every K of the curve. ``baseline``: an ERM model, scored as it is ("erm");
    ``fine_tuned``: one adapted as its config says (``gmeta.evaluation.finetune.adapting``: "erm_ft").
    ``batch_fn``: applied to each batch as read (the warm-up protocol keeps the first k
    support rows of each task); ``initial_rows``: see ``predict_queries`` (the model's
    scorers only)."""
    steps = inner_steps_for(cfg, inner_steps)
    split = cfg.eval.split
    if not load_manifest(shards_dir, cfg.data.partitions)["splits"].get(split, {}).get("tasks"):
        raise ValueError(f"{shards_dir}: split {split!r} (eval.split) has no tasks to evaluate"
                         + (" (prepared with data.split.val_fraction > 0?)" if split == "val" else ""))
    reader = TaskReader(shards_dir, split, cfg.eval.tasks_per_batch, rank=rank, world_size=world_size,
                        shuffle=False, drop_last=False, num_workers=min(cfg.data.num_workers, 1),
                        on_bad_task=cfg.data.on_bad_task, max_tasks=cfg.eval.max_tasks,
                        size_buckets=cfg.meta.size_buckets, partitions=cfg.data.partitions)
    ks = sorted(set(cfg.eval.curve_steps) | {steps, 0})
    n_batches = len(reader)
    device = model_device(model)
    if world_size > 1:  # sharded lookups are collective: every rank runs as many batches
        t = torch.tensor([n_batches], device=device)  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_batches = int(t)
    out = Predictions()
    last = None
    it = iter(reader)
    for _ in range(n_batches):
        batch = next(it, None)
        own = batch is not None
        batch = batch if own else last  # ran out: repeat the last batch for the collectives, drop it
        if batch is None:
            raise ValueError(f"{shards_dir}: rank {rank} has no tasks of split {split!r} to evaluate")
        last = batch
        if batch_fn is not None:
            batch = batch_fn(batch)
        batch = batch.to(device)
        scored = {f"k={k}": p for k, p in predict_queries(model, cfg, batch, ks, initial_rows).items()}
        base = predict_query(baseline[0], baseline[1], batch, 0) if baseline is not None else None
        ft = predict_query(fine_tuned[0], fine_tuned[1], batch, fine_tuned[1].meta.inner_steps) \
            if fine_tuned is not None else None
        if not own:
            continue
        if ft is not None:
            out.add("erm_ft", ft)
        for name, preds in scored.items():
            out.add(name, preds)
        if base is not None:
            out.add("erm", base)
        s = batch.num_support
        q_counts = (batch.query_offsets[1:] - batch.query_offsets[:-1]).cpu().numpy()
        s_counts = (batch.support_offsets[1:] - batch.support_offsets[:-1]).cpu().numpy()
        out.labels.append(batch.labels[s:].cpu().numpy())
        out.task_ids.append(np.repeat(batch.task_ids.cpu().numpy(), q_counts))
        out.support_size.append(np.repeat(s_counts, q_counts))
        if batch.true_prob is not None:
            out.add("oracle", batch.true_prob[s:].cpu().numpy())
    return out
