"""Cold-start evaluation: adapt on each held-out task's support rows, score its query rows.

One process with the tables loaded unsharded from the checkpoint (DCP reshards, so a
checkpoint written by any number of training processes loads), or N processes under
torchrun with the tables sharded as in training: each rank scores its share of the tasks
and rank 0 gathers the predictions and computes the report.

The report (JSON, Markdown, HTML and PNG plots, all logged to MLflow), for model.objective
"binary":
- AUC, GAUC (task-weighted), logloss and calibration (mean predicted vs. observed rate) of
  the adapted model (K inner steps), the same model without adaptation, an ERM baseline
  and the oracle (true probabilities, synthetic data) where available;
- AUC, GAUC and logloss per cold-start bucket (support-set size);
- the same against the number of inner steps K (``eval.curve_steps``);
- reliability bins (predicted vs. observed rate) per scorer.

For "regression": RMSE, MAE and mean predicted vs. observed value of each scorer, and RMSE
and MAE per bucket and against K; no reliability bins.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Literal

import torch.distributed as dist

from gmeta.config import Config
from gmeta.evaluation.render import format_table, log_report, write_report
from gmeta.evaluation.report import build_report
from gmeta.io.manifest import check_shards, choose_shards, load_manifest
from gmeta.models.dlrm import MetaDLRM
from gmeta.scoring import Predictions, collect
from gmeta.storage import check_bucket, local_dir, location

__all__ = ["evaluate", "run_evaluate", "resolve_checkpoint", "format_table",
           "write_report", "log_report"]

log = logging.getLogger(__name__)


def evaluate(model, cfg: Config, shards_dir: str | Path, *, inner_steps: int | None = None,
             baseline: tuple[MetaDLRM, Config] | None = None,
             fine_tuned: tuple[MetaDLRM, Config] | None = None, **scoring) -> dict | None:
    """Evaluate in this process (or, under an initialised process group, on every rank
    together: the report is complete on rank 0, None elsewhere). ``scoring``: passed on to
    ``gmeta.scoring.collect`` (batch_fn, initial_rows: the warm-up protocol's stages)."""
    t0 = time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    pred = collect(model, cfg, shards_dir, inner_steps=inner_steps, baseline=baseline, fine_tuned=fine_tuned,
                   rank=rank, world_size=world, **scoring)
    if distributed:
        parts: list | None = [None] * world if rank == 0 else None
        dist.gather_object(pred, parts, dst=0)
        if rank != 0:
            return None
        pred = Predictions().merge(parts or [])
    report = build_report(pred, cfg, inner_steps=inner_steps, algorithm=cfg.meta.algorithm)
    # ids of the evaluated split that training never saw, per feature (what prepare counted)
    unseen = load_manifest(shards_dir, cfg.data.partitions).get("unseen", {})
    report["new_ids"] = {f: v[cfg.eval.split] for f, v in unseen.items() if cfg.eval.split in v}
    report["processes"] = float(world)
    report["seconds"] = time.perf_counter() - t0
    return report


def resolve_checkpoint(checkpoint: str | Path | None, run_id: str, tracking_uri: str) -> Path:
    """The checkpoint to evaluate: given, or the one a training run references (tag
    ``gmeta.checkpoint``)."""
    from gmeta.checkpoint import CheckpointError

    if checkpoint:
        return location(checkpoint)
    if not run_id:
        raise CheckpointError("give --checkpoint or --run-id")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from gmeta.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri("", tracking_uri)
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as e:
        raise CheckpointError(f"run {run_id} not found at {uri}: {e.message}") from None
    path = run.data.tags.get("gmeta.checkpoint")
    if not path:
        raise CheckpointError(f"run {run_id} at {uri} references no checkpoint (tag gmeta.checkpoint)")
    return location(path)


def _fine_tuned(bmodel: MetaDLRM, bcfg: Config, cfg: Config):
    """The ERM baseline fine-tuned per task, its steps and rates chosen on the validation
    tasks of the shards evaluated (``gmeta.evaluation.finetune``): ((model, config), choice), or
    (None, None) when those shards have no validation split to choose on."""
    from gmeta.evaluation import finetune

    if not load_manifest(cfg.data.shards_dir, cfg.data.partitions)["splits"].get("val", {}).get("tasks"):
        log.warning("%s has no validation tasks (data.split.val_fraction): ERM fine-tuned per task is left out, "
                    "as its steps and rates would have to be chosen on the test tasks", cfg.data.shards_dir)
        return None, None
    bcfg = copy.deepcopy(bcfg)
    bcfg.eval, bcfg.data.shards_dir = copy.deepcopy(cfg.eval), cfg.data.shards_dir
    bcfg.data.partitions = cfg.data.partitions
    choice = finetune.choose(evaluate, bmodel, bcfg, cfg.data.shards_dir, fine_tune=True)
    log.info("ERM fine-tuned per task: %s", choice.describe())
    ft = finetune.adapting(bcfg, choice.inner_lr, choice.embedding_inner_lr, choice.steps, fine_tune=True)
    ft.eval.split = cfg.eval.split
    return (bmodel, ft), choice


def run_evaluate(checkpoint: str | Path | None = None, *, run_id: str = "", cfg_override: Config | None = None,
                 baseline: str | Path | None = None, shards_dir: str | None = None, shards_why: str = "--shards",
                 tracking: bool = True, tracking_uri: str = "", out_dir: str | Path | None = None,
                 inner_steps: int | None = None, split: Literal["eval", "val"] | None = None,
                 allow_other_shards: bool = False, protocol: Literal["tasks", "warmup"] | None = None,
                 generator: str | Path | None = None) -> dict | None:
    """``gmeta evaluate``: load the checkpoint (sharded under torchrun, else unsharded),
    evaluate, write the report files and log them to the checkpoint's MLflow run.
    ``shards_dir``: the shards to evaluate on (``shards_why``: who chose them, for the log);
    None: the checkpoint's own (``choose_shards``). Shards other than those the checkpoint
    (and ``baseline``) was trained on are refused unless ``allow_other_shards``
    (``check_shards``). ``protocol``: eval.protocol ("warmup": ``gmeta.evaluation.warmup``, its report
    warmup_report.{json,md}; ``generator``: a checkpoint with an id generator, one more row
    of it). Returns the report on rank 0, None on other ranks."""
    from gmeta.checkpoint import config_of, load_sharded, load_unsharded, read_meta
    from gmeta.parallel.dist import configure_threads, init_distributed, under_torchrun
    from gmeta.tracking import make_tracker

    path = resolve_checkpoint(checkpoint, run_id, tracking_uri)
    dest = location(out_dir) if out_dir else path.parent / "eval"
    check_bucket(dest, "--out")  # before the work: a mistyped bucket fails at once
    if cfg_override is not None:  # before loading: loading is compute too
        configure_threads(cfg_override.train.threads)
    # the shards, checked before any model is built
    meta = read_meta(path)
    trained = config_of(path, meta)
    shards = choose_shards(shards_dir, shards_why, trained, path)
    check_shards(path, meta, trained, shards, allow_other_shards=allow_other_shards)
    for other, doing in ((baseline, "scoring the baseline on"), (generator, "scoring the generator on")):
        if other:
            ometa = read_meta(other)
            check_shards(other, ometa, config_of(other, ometa), shards, allow_other_shards=allow_other_shards,
                         doing=doing)
    protocol = protocol or (cfg_override or trained).eval.protocol
    if generator and protocol != "warmup":
        raise ValueError("--generator: a row of the warm-up table (eval.protocol warmup); the tasks protocol scores "
                         "a generator inside its own checkpoint")
    if protocol == "warmup" and under_torchrun():
        raise ValueError("eval.protocol warmup runs in one process: drop --nproc-per-node (its stages and choices "
                         "score the unsharded model)")
    env = init_distributed() if under_torchrun() else None
    try:
        if env is not None:
            model, cfg, meta = load_sharded(path, env.device)
        else:
            model, cfg, meta = load_unsharded(path)
        if cfg_override is None:
            configure_threads(cfg.train.threads)
        else:  # evaluation settings come from --config; the data from the checkpoint (choose_shards)
            cfg.eval = cfg_override.eval
        cfg.data.shards_dir = str(shards)
        if inner_steps is not None:
            cfg.eval.inner_steps = inner_steps
        if split is not None:
            cfg.eval.split = split
        cfg.eval.protocol = protocol
        base = fine_tuned = None
        choice = None
        if protocol == "warmup":
            from gmeta.evaluation.warmup import warmup_report

            warm = warmup_report(model, cfg, cfg.data.shards_dir, evaluate=evaluate, seed=cfg.train.seed,
                                 baseline=load_unsharded(baseline)[:2] if baseline else None,
                                 generator=load_unsharded(generator)[:2] if generator else None)
            return _finish_warmup(warm, path, dest, meta, cfg, tracking, tracking_uri)
        if baseline:
            bmodel, bcfg, _ = load_unsharded(baseline)
            base = (bmodel, bcfg)
            fine_tuned, choice = _fine_tuned(bmodel, bcfg, cfg)
        report = evaluate(model, cfg, cfg.data.shards_dir, inner_steps=cfg.eval.inner_steps, baseline=base,
                          fine_tuned=fine_tuned)
    finally:
        if env is not None:
            dist.destroy_process_group()
    if report is None:
        return None
    report["checkpoint"] = str(path)
    if choice is not None:
        report["erm_ft_choice"] = choice.describe()
    with local_dir(dest) as d:  # (uploaded at the end of the block when dest is remote)
        files = write_report(report, d)
        run = meta.get("mlflow_run_id", "")
        if tracking and run:
            uri = tracking_uri or meta.get("tracking_uri", "")
            tracker = make_tracker(True, uri, cfg.tracking.experiment, run_id=run)
            log_report(tracker, report, files, step=int(meta.get("step", 0)))
            tracker.finish()
    # the table itself is the caller's to show (gmeta evaluate prints it on stdout): logging it
    # too printed it twice
    log.info("evaluation of %s: report in %s", path, dest)
    return report


def _finish_warmup(report: dict, path: Path, dest: Path, meta: dict, cfg: Config, tracking: bool,
                   tracking_uri: str) -> dict:
    """The warm-up report's files, logged to the checkpoint's MLflow run."""
    from gmeta.evaluation.warmup import flat_metrics, write_warmup_report
    from gmeta.tracking import make_tracker

    report["checkpoint"] = str(path)
    with local_dir(dest) as d:
        files = write_warmup_report(report, d)
        run = meta.get("mlflow_run_id", "")
        if tracking and run:
            tracker = make_tracker(True, tracking_uri or meta.get("tracking_uri", ""), cfg.tracking.experiment,
                                   run_id=run)
            tracker.log_metrics(flat_metrics(report), step=int(meta.get("step", 0)))
            for f in files:
                tracker.log_artifact(f, "eval")
            tracker.finish()
    log.info("warm-up evaluation of %s: report in %s", path, dest)
    return report
