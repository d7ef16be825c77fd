"""Choosing how a model adapts to a new task, on the validation tasks: the number of inner
steps K and the inner learning rates, over a grid. Used for the fair baseline, ERM
fine-tuned per task (the ERM model adapted by the inner loop's SGD on each task's support
rows, dense layers and embedding rows), and for MAML's own K and rates at test time.

Every setting of the grid is scored on split ``val`` (never the test tasks) along one K
curve per pair of rates; a pair whose adaptation diverges there is left out. The choice
says whether it lies at an edge of the grid, where a wider grid might do better.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gmeta.config import Config
from gmeta.evaluation.report import OBJECTIVES, NonFiniteScores
from gmeta.metrics import HIGHER_IS_BETTER

log = logging.getLogger(__name__)

# (dense lr, embedding-row lr) pairs for fine-tuning an ERM model; K read off each curve
FINE_TUNE_LRS = [(0.003, 0.015), (0.01, 0.05), (0.03, 0.15), (0.1, 0.5), (0.3, 1.5), (1.0, 5.0)]
# a tenth of those for squared error: its gradients scale with the labels' range (ratings 1-5),
# where the log loss's are at most 1 per row
REGRESSION_SCALE = 0.1
STEPS = [1, 2, 3, 5, 8, 12]
# a meta-trained model: its own rates times these
RATE_SCALES = [0.25, 0.5, 1.0, 2.0, 4.0]
# where the best lies at an edge: K extended by these, a rate pair added beyond the end,
# at most WIDEN times in all
EXTRA_STEPS = [20, 32, 50]
WIDEN = 6


@dataclass
class Choice:
    inner_lr: float
    embedding_inner_lr: float
    steps: int
    value: float  # the validation metric there
    metric: str
    at_edge: list[str]  # "steps", "rates": the choice lies at that end of the (widened) grid
    rates_tried: list[tuple[float, float]] = field(default_factory=list)
    steps_tried: list[int] = field(default_factory=list)

    def describe(self) -> str:
        edge = f", at the edge of the grid ({', '.join(self.at_edge)})" if self.at_edge else ""
        return (f"K={self.steps}, inner_lr {self.inner_lr:g}, embedding_inner_lr {self.embedding_inner_lr:g} "
                f"(validation {self.metric} {self.value:.4f}{edge})")


def adapting(cfg: Config, inner_lr: float, embedding_inner_lr: float, steps: int, *,
             fine_tune: bool) -> Config:
    """``cfg`` scoring its model adapted by K steps at these rates. ``fine_tune``: adapt every
    dense layer's weights and every embedding row (an ERM model has no adaptation of its own)."""
    out = copy.deepcopy(cfg)
    m = out.meta
    if fine_tune:
        m.algorithm = "maml"
        m.adapt_dense, m.dense_adaptation = ["all"], "weights"
        m.adapt_embeddings, m.adapt_features, m.meta_sgd = True, [], False
    m.inner_lr, m.embedding_inner_lr, m.inner_steps = inner_lr, embedding_inner_lr, steps
    out.eval.inner_steps = steps
    out.eval.curve_steps = [steps]
    return out


def _validation(evaluate, model, cfg: Config, shards_dir, rates) -> dict | None:
    """The validation report on every rank (None where these rates diverge): under a process
    group the report is made on rank 0 and broadcast, so every rank makes the same choice."""
    import torch.distributed as dist

    try:
        report = evaluate(model, cfg, shards_dir)
    except NonFiniteScores as e:  # these rates diverge on the validation tasks: not a choice
        log.info("rates (%g, %g) left out: %s", *rates, e)
        report = {"diverged": True}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [report]
        dist.broadcast_object_list(box, src=0)
        report = box[0]
    return None if report is None or report.get("diverged") else report


def choose(evaluate: Callable[..., dict | None], model, cfg: Config, shards_dir: str | Path, *, fine_tune: bool,
           rates: list[tuple[float, float]] | None = None, steps: list[int] | None = None,
           max_tasks: int | None = None, widen: int | None = None, metric: str | None = None) -> Choice:
    """The (rates, K) with the best validation metric (GAUC for a binary objective, RMSE for
    regression), on a grid widened where the best lies at its edge. ``rates``: (dense,
    embedding) pairs; default ``FINE_TUNE_LRS`` for ``fine_tune`` (times ``REGRESSION_SCALE``
    for regression), else the model's own rates times ``RATE_SCALES`` (a Meta-SGD model keeps
    its learned rates: only K is chosen). While the best pair is the lowest or the highest
    tried (and did not diverge), the next pair beyond it, at the grid's own spacing, is tried;
    while the best K is the largest tried, the best pair's curve is extended by
    ``EXTRA_STEPS``; at most ``widen`` (``WIDEN``) such steps. ``metric``: another metric of
    the report's K curve to choose by (e.g. "auc"). ``evaluate``:
    ``gmeta.evaluation.evaluate.evaluate`` (passed in: that module uses this one for its fine-tuned
    baseline)."""
    steps = sorted(steps or STEPS)
    if rates is None:
        m = cfg.meta
        scale = REGRESSION_SCALE if cfg.model.objective == "regression" else 1.0
        rates = [(a * scale, b * scale) for a, b in FINE_TUNE_LRS] if fine_tune else (
            [(m.inner_lr, m.embedding_inner_lr)] if m.meta_sgd else
            [(m.inner_lr * s, m.embedding_inner_lr * s) for s in RATE_SCALES])
    rates = sorted(rates)
    obj = OBJECTIVES[cfg.model.objective]
    metric = metric or ("gauc" if cfg.model.objective == "binary" else "rmse")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    curves: dict[tuple[float, float], dict[int, float] | None] = {}  # None: diverged
    top: dict[tuple[float, float], int] = {}  # the largest K scored at each pair

    def score(pair: tuple[float, float], ks: list[int]) -> None:
        vcfg = adapting(cfg, pair[0], pair[1], max(ks), fine_tune=fine_tune)
        vcfg.eval.split = "val"
        vcfg.eval.curve_steps = ks
        if max_tasks is not None:
            vcfg.eval.max_tasks = max_tasks
        report = _validation(evaluate, model, vcfg, shards_dir, pair)
        top[pair] = max(ks)
        if report is None:
            curves[pair] = None
            return
        curve = report[f"{obj.main}_vs_k"]
        curves[pair] = {**(curves.get(pair) or {}),
                        **{int(k): sign * float(v) for k, v in zip(curve["k"], curve[metric]) if k > 0}}

    def best() -> tuple[float, tuple[float, float], int] | None:
        points = [(v, pair, k) for pair, c in curves.items() if c for k, v in c.items()]
        return max(points, key=lambda x: x[0]) if points else None

    for pair in rates:
        score(pair, steps)
    for _ in range(WIDEN if widen is None else widen):
        b = best()
        if b is None:
            break
        _, pair, k = b
        tried = sorted(curves)
        if len(tried) > 1 and pair in (tried[0], tried[-1]):  # a rate at the end of the grid
            i = tried.index(pair)
            j = 1 if i == 0 else i - 1
            # the grid's spacing, outwards (its pairs scale together: one ratio for both rates)
            ratio = pair[0] / tried[j][0] if tried[j][0] else pair[1] / tried[j][1]
            score((pair[0] * ratio, pair[1] * ratio), steps)
        elif k == top[pair] and any(s > k for s in EXTRA_STEPS):  # the largest K tried
            more = next(s for s in EXTRA_STEPS if s > k)
            score(pair, sorted({*steps, *(s for s in EXTRA_STEPS if s <= more)}))
        else:
            break
    b = best()
    if b is None:
        raise NonFiniteScores(f"every rate of {sorted(curves)} diverged on the validation tasks")
    value, pair, k = b
    tried = sorted(curves)
    edge = (["steps"] if k == top[pair] else []) + \
        (["rates"] if len(tried) > 1 and pair in (tried[0], tried[-1]) else [])
    return Choice(pair[0], pair[1], k, sign * value, metric, edge, rates_tried=tried,
                  steps_tried=sorted({kk for c in curves.values() if c for kk in c}))
