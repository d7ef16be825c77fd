"""The warm-up protocol of item cold start (Meta-Embedding, SIGIR 2019; CVAR, SIGIR 2022), as
an evaluation mode (``eval.protocol: warmup``, ``gmeta evaluate --protocol warmup``).

Shards of ``data.split.rule: warmup``: the task is one new id (item, ad) of the task-key
feature; an evaluation id's support is its warm-up rows a, b, c (K = warmup_rows each, in
time order), its query the later rows, the test rows. Each stage scores the test rows after
updating on the first k warm-up rows of each id::

    stage     cold   a    a+b   a+b+c
    k         0      K    2K    3K        (the cold stage: no support row, no update)

Methods (rows of the table), each scored at every stage:

    init_model    the base model, the new id's row as the model has it (its hashed row, or
                  the feature's default row), then SGD on the new id's rows only
    init_random   the same with a random initial row (a fresh draw at the table's init scale)
    maml          the meta-learner's own inner loop on the warm-up rows (task = the new id)
    erm_ft        the ERM model fine-tuned on the same rows (dense layers and rows)
    generator     the base model with an id generator (``--generator``: trained with
                  generator.mode base_fixed on the base model), the new id's row generated
                  from its attributes, then SGD on the new id's rows only

The base model is ``--baseline`` when given, else the checkpoint. The learning rate and the
steps of every method at every stage are chosen on the validation ids (split ``val``) with
``gmeta.evaluation.finetune.choose``, by validation AUC (``CHOICE_METRIC``); the test ids are scored once
with them. AUC is the protocol's metric in the literature, and the one an update moves: a new
id's own row shifts that id's level, which changes the overall AUC and logloss but hardly the
ranking of rows within the id (GAUC, grouped by the id).

How a new id's row starts is an ``InitRow``, resolved in ``initial_rows``; a model's own
start (its default row, or its generator's row) is ``InitRow.MODEL`` of that model.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gmeta.config import Config
from gmeta.io.collate import gather_ranges
from gmeta.io.manifest import load_manifest
from gmeta.layout import BatchLayout
from gmeta.models.dlrm import MetaDLRM, has_default_row
from gmeta.types import TaskBatch

log = logging.getLogger(__name__)

# (stage name, warm-up sets used): the rows updated on are the first sets * K support rows
STAGES = (("cold", 0), ("a", 1), ("a+b", 2), ("a+b+c", 3))
METRICS = ("auc", "gauc", "logloss")
# embedding-row learning rates of the row-only update (the embedding rates of
# gmeta.evaluation.finetune.FINE_TUNE_LRS; the dense rate is 0: no dense layer adapts)
ROW_LRS = [(0.0, b) for _, b in ((0.003, 0.015), (0.01, 0.05), (0.03, 0.15), (0.1, 0.5), (0.3, 1.5), (1.0, 5.0))]
# update steps tried at each stage, and how often the grid may widen where the best lies at
# its edge (gmeta.evaluation.finetune.choose): a smaller grid than a task's K, as every method chooses
# anew at each of three stages
STEPS = [1, 2, 4, 8]
WIDEN = 2
CHOICE_METRIC = "auc"


class InitRow(StrEnum):
    """How a new id's row starts, before any warm-up update."""

    MODEL = "model"  # as the model looks it up: the id's hashed row, or the feature's default row
    RANDOM = "random"  # a fresh draw from the table's init distribution, per id


def initial_rows(kind: InitRow, feature: int, seed: int, model: MetaDLRM, rows: torch.Tensor,
                 layout: BatchLayout) -> torch.Tensor:
    """The looked-up rows ``[U, D]`` of a batch with those of feature ``feature`` (the new
    ids) replaced as ``kind`` says. RANDOM: uniform in torchrec's default init range of the
    table, +-sqrt(1 / rows of the table), drawn per (seed, id), so an id starts from the
    same row at every stage and in every batch."""
    if kind is InitRow.MODEL:
        return rows
    if kind is InitRow.RANDOM:
        lo, hi = int(layout.unique_offsets[feature]), int(layout.unique_offsets[feature + 1])
        f = model.features[feature]
        bound = math.sqrt(1.0 / (f["num_embeddings"] + int(has_default_row(f))))
        ids = layout.unique_ids[lo:hi].cpu().numpy()
        draws = np.stack([np.random.default_rng([seed, int(i)]).uniform(-bound, bound, rows.shape[1]) for i in ids]) \
            if len(ids) else np.zeros((0, rows.shape[1]))
        out = rows.clone()
        out[lo:hi] = torch.as_tensor(draws, dtype=rows.dtype, device=rows.device)
        return out
    raise ValueError(f"unknown initial row {kind!r}")


def first_support_rows(batch: TaskBatch, k: int) -> TaskBatch:
    """The batch with each task's first ``k`` support rows (all of them when it has fewer)
    and every query row; the layout is left to be built for the new rows."""
    so, qo = batch.support_offsets.cpu().numpy(), batch.query_offsets.cpu().numpy()
    s_count = np.minimum(np.diff(so), k)
    n_s, n_q = int(so[-1]), int(qo[-1])
    keep = np.concatenate([np.concatenate([np.arange(a, a + c) for a, c in zip(so[:-1], s_count)] or [np.zeros(0)]),
                           n_s + np.arange(n_q)]).astype(np.int64)
    rows = n_s + n_q
    kjt = batch.sparse
    keys = kjt.keys()
    lengths = kjt.lengths().cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cells = (np.arange(len(keys))[:, None] * rows + keep[None, :]).reshape(-1)  # feature-major, as the KJT
    pos, lens = gather_ranges(offsets, cells)
    device = batch.labels.device
    keep_t = torch.as_tensor(keep, device=device)
    sparse = KeyedJaggedTensor(keys=keys, values=kjt.values()[torch.as_tensor(pos, device=kjt.values().device)],
                               lengths=torch.as_tensor(lens, dtype=kjt.lengths().dtype, device=kjt.lengths().device))
    return TaskBatch(sparse=sparse, dense=batch.dense[keep_t], labels=batch.labels[keep_t],
                     support_offsets=torch.as_tensor(np.concatenate([[0], np.cumsum(s_count)]), dtype=torch.int64,
                                                     device=batch.support_offsets.device),
                     query_offsets=batch.query_offsets, task_ids=batch.task_ids,
                     true_prob=None if batch.true_prob is None else batch.true_prob[keep_t])


@dataclass(frozen=True)
class Method:
    """A row of the warm-up table: which model, how the new id's row starts, what updates."""

    name: str
    label: str
    init: InitRow
    model: str  # "base" (--baseline, else the checkpoint), "checkpoint" (the meta-learner) or "generator"
    update: str  # "rows": the new id's rows only; "own": the model's own inner loop; "fine_tune": all of it


METHODS = (
    Method("init_model", "initial row of the model + row updates", InitRow.MODEL, "base", "rows"),
    Method("init_random", "random initial row + row updates", InitRow.RANDOM, "base", "rows"),
    Method("maml", "meta-learner's own inner loop", InitRow.MODEL, "checkpoint", "own"),
    Method("erm_ft", "ERM fine-tuned (dense layers and rows)", InitRow.MODEL, "base", "fine_tune"),
    Method("generator", "generated initial row + row updates", InitRow.MODEL, "generator", "rows"),
)


def rows_config(cfg: Config) -> Config:
    """``cfg`` adapting the task-key feature's rows only (the new id's), by plain SGD."""
    out = copy.deepcopy(cfg)
    m = out.meta
    m.algorithm, m.adapt_dense, m.dense_adaptation = "maml", [], "weights"
    m.adapt_embeddings, m.adapt_features, m.meta_sgd = True, [cfg.features.task_key], False
    return out


def stage_evaluate(method: Method, k: int, seed: int, evaluate: Callable[..., dict | None]):
    """``evaluate`` (``gmeta.evaluation.evaluate.evaluate``, passed in: that module's command calls this
    one, and imports run one way only) scoring after updates on each task's first ``k``
    support rows, the new ids' rows starting as ``method.init`` says (for ``finetune.choose``)."""

    def run(model, cfg: Config, shards_dir, **kw):
        if k == 0:  # the cold stage: no support row, and no step (there is nothing to step on)
            from gmeta.evaluation.finetune import adapting

            cfg = adapting(cfg, cfg.meta.inner_lr, cfg.meta.embedding_inner_lr, 0, fine_tune=False)
        feature = [s.name for s in cfg.features.sparse].index(cfg.features.task_key)
        rows_fn = None if method.init is InitRow.MODEL else functools.partial(initial_rows, method.init, feature,
                                                                                seed)
        return evaluate(model, cfg, shards_dir, batch_fn=lambda b: first_support_rows(b, k), initial_rows=rows_fn,
                        **kw)

    return run


def _stage_config(method: Method, cfg: Config) -> Config:
    """The config a method scores with (before its rates and steps are set)."""
    out = rows_config(cfg) if method.update == "rows" else copy.deepcopy(cfg)
    out.meta.algorithm = "maml"  # the scored predictions are the report's "maml" scorer, adapted or not
    return out


def _scores(report: dict) -> dict[str, float]:
    return {m: float(report[f"maml_{m}"]) for m in METRICS}


def warmup_report(model, cfg: Config, shards_dir: str | Path, *, evaluate: Callable[..., dict | None],
                  baseline: tuple[MetaDLRM, Config] | None = None, seed: int = 0,
                  methods: tuple[Method, ...] = METHODS, generator: tuple[MetaDLRM, Config] | None = None) -> dict:
    """Every method at every stage on the test ids (split ``eval.split``), each stage's rates
    and steps chosen on the validation ids; ``evaluate``: ``gmeta.evaluation.evaluate.evaluate``.
    ``model``/``cfg``: the checkpoint; ``baseline``: the base (ERM) model and its config;
    ``generator``: a model with an id generator of the task-key feature and its config.
    Methods that do not apply are left out: "maml" for an ERM checkpoint, "erm_ft" without an
    ERM model, "generator" without ``generator``."""
    from gmeta.evaluation.finetune import adapting, choose
    from gmeta.evaluation.report import NonFiniteScores

    if cfg.model.objective != "binary":
        raise ValueError(f"eval.protocol warmup reports AUC, GAUC and logloss: model.objective is "
                         f"{cfg.model.objective!r}, not binary")
    manifest = load_manifest(shards_dir, cfg.data.partitions)
    rule = manifest.get("split_rule", {})
    if rule.get("rule") != "warmup":
        raise ValueError(f"{shards_dir}: prepared with data.split.rule {rule.get('rule')!r}; eval.protocol warmup "
                         "needs shards of data.split.rule warmup (each evaluation id's support is its warm-up rows)")
    K = int(rule["warmup_rows"])
    if not manifest["splits"].get("val", {}).get("tasks"):
        raise ValueError(f"{shards_dir}: no validation ids (data.split.val_fraction): eval.protocol warmup chooses "
                         "every learning rate and step count on them, never on the test ids")
    def scored_here(pair: tuple[MetaDLRM, Config]) -> tuple[MetaDLRM, Config]:
        """A model of its own config, scored on these shards with the checkpoint's evaluation settings."""
        other = copy.deepcopy(pair[1])
        other.eval, other.data.shards_dir = copy.deepcopy(cfg.eval), str(shards_dir)
        return pair[0], other

    base_model, base_cfg = scored_here(baseline) if baseline is not None else (model, cfg)
    feature = cfg.features.task_key
    if generator is not None:
        g = generator[1].generator
        if g.feature != feature:
            raise ValueError(f"the generator model generates rows of {g.feature or 'no feature'!r}; the warm-up "
                             f"protocol's new ids are {feature!r} (features.task_key)")
        generator = scored_here(generator)
    n_val = manifest["splits"]["val"]["tasks"]
    n_val = min(n_val, cfg.eval.max_tasks or n_val)  # the ids the choices read: eval.max_tasks caps them too
    have = []
    for m in methods:
        if m.name == "maml" and cfg.meta.algorithm == "erm":
            continue
        if m.model == "generator" and generator is None:
            continue
        if m.update == "fine_tune" and base_cfg.meta.algorithm != "erm":
            continue
        if m.update == "rows" and m.model == "base" and base_cfg.meta.meta_sgd:
            # its learned inner rates would replace the rate chosen on the validation ids
            log.warning("warm-up %s left out: the base model is a Meta-SGD model; give an ERM --baseline", m.name)
            continue
        have.append(m)
    report: dict = {"protocol": "warmup", "split": cfg.eval.split, "chosen_on": "val", "warmup_rows": K,
                    "warmup_train_rows": int(rule["warmup_train_rows"]), "feature": feature, "seed": seed,
                    "stages": [name for name, _ in STAGES], "support_rows": [n * K for _, n in STAGES],
                    "val_ids": n_val, "methods": {}}
    for m in have:
        pairs = {"checkpoint": (model, cfg), "base": (base_model, base_cfg)}
        if generator is not None:
            pairs["generator"] = generator
        mod, mcfg = pairs[m.model]
        scfg = _stage_config(m, mcfg)
        entry: dict = {"label": m.label, "init": m.init.value, "update": m.update,
                       "model": m.model if m.model != "base" else "baseline" if baseline is not None else "checkpoint",
                       "stages": {}}
        for stage, sets in STAGES:
            k = sets * K
            run = stage_evaluate(m, k, seed, evaluate)
            if k == 0:  # the cold stage: no support row, no update
                tcfg = adapting(scfg, scfg.meta.inner_lr, scfg.meta.embedding_inner_lr, 0, fine_tune=False)
                choice = None
            else:
                rates = ROW_LRS if m.update == "rows" else None
                choice = choose(run, mod, scfg, shards_dir, fine_tune=m.update == "fine_tune", rates=rates,
                                steps=STEPS, widen=WIDEN, metric=CHOICE_METRIC)
                tcfg = adapting(scfg, choice.inner_lr, choice.embedding_inner_lr, choice.steps,
                                fine_tune=m.update == "fine_tune")
                tcfg.meta.algorithm = "maml"
            tcfg.eval.split = cfg.eval.split
            try:
                out = run(mod, tcfg, shards_dir)
                assert out is not None  # one process: the report
                scores: dict = _scores(out)
                report.setdefault("tasks", out["tasks"])
                report.setdefault("query_rows", out["query_rows"])
            except NonFiniteScores as e:  # chosen on the validation ids, diverged on some test id: the figure
                log.warning("warm-up %s, stage %s: diverged on the test ids: %s", m.name, stage, e)
                scores = {**dict.fromkeys(METRICS, float("nan")), "diverged": True}
            if choice is not None:
                scores.update(steps=choice.steps, inner_lr=choice.inner_lr,
                              embedding_inner_lr=choice.embedding_inner_lr, val_metric=choice.metric,
                              val_value=choice.value, at_edge=choice.at_edge)
            entry["stages"][stage] = scores
            log.info("warm-up %s, stage %s (%d rows): %s", m.name, stage, k, scores)
        report["methods"][m.name] = entry
    return report


def format_warmup(report: dict) -> str:
    """Markdown: one table per metric, a row per method, a column per stage; then the
    choices made on the validation ids."""
    stages = report["stages"]
    K = report["warmup_rows"]
    heads = [f"{s} ({n})" for s, n in zip(stages, report["support_rows"])]
    lines = [f"Warm-up protocol: new ids of {report['feature']} (at most {report['warmup_train_rows']} rows), "
             f"{int(report.get('tasks', 0))} test ids, {int(report.get('query_rows', 0))} test rows; stage = warm-up "
             f"rows updated on (K = {K})."]
    for metric in METRICS:
        lines += ["", f"{metric.upper() if metric != 'logloss' else 'logloss'}:", "",
                  "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(stages)]
        for name, e in report["methods"].items():
            cells = []
            for s in stages:
                v = e["stages"][s].get(metric)
                cells.append("diverged" if e["stages"][s].get("diverged") else
                             "n/a" if v is None or v != v else f"{v:.4f}")
            lines.append(f"| {name}: {e['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"Learning rate and steps of every method at every stage chosen on the {report['val_ids']} "
              "validation ids (split val, by GAUC), never on the test ids:", ""]
    for name, e in report["methods"].items():
        parts = []
        for s in stages[1:]:
            c = e["stages"][s]
            if "steps" in c:
                edge = " (grid edge)" if c.get("at_edge") else ""
                parts.append(f"{s}: K={c['steps']}, lr {c['inner_lr']:g} / rows {c['embedding_inner_lr']:g}{edge}")
        lines.append(f"- {name} ({e['model']}): " + "; ".join(parts))
    return "\n".join(lines)


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON: a metric that could not be computed, or a diverged one
    return value


def write_warmup_report(report: dict, out_dir: str | Path) -> list[Path]:
    """warmup_report.{json,md} into ``out_dir``; returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warmup_report.json").write_text(json.dumps(_json_ready(report), indent=2))
    (out / "warmup_report.md").write_text(format_warmup(report) + "\n")
    return [out / "warmup_report.json", out / "warmup_report.md"]


def flat_metrics(report: dict) -> dict[str, float]:
    """The report as MLflow metrics: ``warmup/<method>/<stage>/<metric>``."""
    return {f"warmup/{name}/{s}/{m}": float(v) for name, e in report["methods"].items()
            for s, c in e["stages"].items() for m, v in c.items() if m in METRICS}
