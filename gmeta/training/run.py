"""The recipe of ``gmeta train``: setup (or resume) -> loop -> checkpoint -> evaluate.

In full: setup (or resume, or continue) -> loop over meta-batches -> log -> checkpoint ->
evaluate -> cleanup. Run by ``gmeta train`` in every process torchrun starts (or directly
in one process).

Fault tolerance: training checkpoints (``train.checkpoint_every_steps`` / ``_minutes``)
hold the sharded tables and their fused optimizer state, the dense parameters and Adam
state, every rank's reader position as of its last *trained* meta-batch (with the
pipeline, the prefetched one is not counted) and RNG state, the step and the MLflow run.
``train.resume=auto`` continues from the newest complete one, so under
``torchrun --max-restarts`` a killed job restarts where its last checkpoint ends: every
task of an epoch contributes to exactly one optimizer step that survives.

The steps themselves (``meta_step``, ``train_step``, ``run_steps``) are in
``gmeta.training.step``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gmeta import checkpoint
from gmeta.config import Config, ConfigError, OptimConfig, dump_yaml, flatten, to_dict
from gmeta.io.dynamic import DynamicTaskReader, SizeSchedule, new_nonce
from gmeta.io.features import id_hash_of
from gmeta.io.id_counts import known_ids
from gmeta.io.manifest import (
    check_manifest_matches,
    check_same_shards,
    describe_shards,
    load_manifest,
    shards_record,
)
from gmeta.io.reader import TaskReader
from gmeta.meta.base import MetaOutput
from gmeta.metrics import HIGHER_IS_BETTER
from gmeta.models.dlrm import build_model
from gmeta.models.managed import training_metrics
from gmeta.parallel.adaptive import AdaptiveBatch
from gmeta.parallel.dist import DenseGradSync, broadcast_params, configure_threads, init_distributed
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.parallel.sharding import shard_model
from gmeta.storage import absolute, append_text, check_bucket, is_url, local_copy, local_dir, location
from gmeta.tracking import NullTracker, environment_tags, make_tracker, resolve_tracking_uri, ui_command
from gmeta.training.step import (
    AgreedStop,
    Fetcher,
    NonFiniteLossError,
    StepTimes,
    StopRequest,
    TrainingInterrupted,
    run_steps,
)

log = logging.getLogger(__name__)



def main(cfg: Config, *, tracking_uri: str = "", allow_other_shards: bool = False) -> dict:
    """Train with ``cfg`` in this process (one of ``WORLD_SIZE``); returns final metrics.
    ``allow_other_shards``: resume a checkpoint on shards other than those it was trained
    on (a warning instead of an error)."""
    tracker_box: list = []
    try:
        return _run(cfg, tracking_uri, tracker_box, allow_other_shards)
    except BaseException:
        if tracker_box:  # leave no MLflow run marked as running after a crash
            tracker_box[0].finish(status="FAILED")
        raise


def _resume_path(cfg: Config, out_dir: Path) -> Path | None:
    """The checkpoint to continue from, per train.resume. ``auto`` takes the newest whole
    checkpoint: a damaged one (``checkpoint.damage``: a file missing or truncated, metadata
    unreadable) is passed over with a warning naming it, so that a restart under
    --max-restarts continues from the one before instead of failing on it again each time."""
    root = out_dir / "checkpoints"
    found = checkpoint.complete_checkpoints(root)
    final = checkpoint.resolve(out_dir / "checkpoint")
    if (final / checkpoint.META).is_file():
        try:
            meta = checkpoint.read_meta(final)
        except checkpoint.CheckpointError as e:
            log.warning("passing over damaged checkpoint %s: %s", final, e)
        else:
            if meta.get("training_state"):
                found.append((int(meta["step"]), final))
    resume = cfg.train.resume
    if resume == "none":
        if found:
            raise checkpoint.CheckpointError(
                f"{out_dir}: holds checkpoints of an earlier run (newest: step {max(found)[0]}); pass "
                "--resume auto (train.resume=auto) to continue it, or set another train.output_dir")
        return None
    if resume == "auto":
        damaged: list[Path] = []
        for _, path in sorted(found, reverse=True):
            why = checkpoint.damage(path)
            if why is None:
                if damaged:
                    log.warning("resuming from %s: the newer checkpoint(s) %s are damaged", path,
                                ", ".join(str(p) for p in damaged))
                return path
            log.warning("passing over damaged checkpoint %s: %s", path, why)
            damaged.append(path)
        if damaged:
            raise checkpoint.CheckpointError(
                f"{out_dir}: every checkpoint is damaged ({', '.join(str(p) for p in damaged)}); move them away "
                "to train afresh, or pass --resume PATH")
        return None
    path = checkpoint.resolve(resume)
    why = checkpoint.damage(path)
    if why is not None:
        raise checkpoint.CheckpointError(f"train.resume: {why}")
    return path


def lr_factor(step: int, total: int, o: OptimConfig) -> float:
    """The learning-rate factor of step ``step`` (0-based) of ``total``: linear warm-up over
    ``optim.warmup_steps``, then ``optim.lr_decay`` to ``optim.min_lr_factor`` at the last step."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.lr_decay == "none":
        return 1.0
    p = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps - 1))
    shape = 1.0 - p if o.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return o.min_lr_factor + (1.0 - o.min_lr_factor) * shape


class LrSchedule:
    """Sets both optimizers' rates for the next step: the dense Adam's groups and the tables'
    fused optimizer, whose ``step()`` only hands its group's rate to the fbgemm kernel (the
    update itself runs inside backward)."""

    def __init__(self, dense_opt: torch.optim.Optimizer, fused, cfg: Config, total: int) -> None:
        self.groups = [(g, g["lr"]) for g in dense_opt.param_groups] + [(g, g["lr"]) for g in fused.param_groups]
        self.fused, self.cfg, self.total = fused, cfg, total

    def apply(self, step: int) -> float:
        f = lr_factor(step, self.total, self.cfg.optim)
        for g, base in self.groups:
            g["lr"] = base * f
        self.fused.step()
        return f


def val_metric(cfg: Config) -> str:
    """train.val_metric, "auto" resolved: gauc for a binary objective, rmse for regression."""
    m = cfg.train.val_metric
    return m if m != "auto" else ("rmse" if cfg.model.objective == "regression" else "gauc")


@dataclass
class LogStats:
    """What the log steps report, averaged over ranks by one all-reduce (``gather``)."""

    query_loss: float
    support_loss: float
    data_stall_share: float  # of the time since the last log step, waiting for batches
    skipped_bad_tasks: float  # mean per rank (times the world: the job's total)
    comm_wait_share: float  # of step time, waiting on communication
    checkpoint_due: float  # > 0: rank 0's clock says a timed checkpoint is due

    @classmethod
    def gather(cls, device: torch.device, world: int, **values) -> LogStats:
        names = [f.name for f in fields(cls)]
        t = torch.stack([v.detach().float().reshape(()) if torch.is_tensor(v)
                         else torch.tensor(float(v), device=device) for v in (values[n] for n in names)])
        dist.all_reduce(t)
        return cls(**dict(zip(names, (t / world).tolist())))


class TrainingRun:
    """``gmeta train`` in one process, as named steps run top to bottom by ``_run``:
    ``__init__`` (setup), ``resume``, ``open_tracking``, ``loop`` (with ``log`` and
    ``checkpoint`` on their steps) and ``finish`` (final checkpoint, evaluation)."""

    def __init__(self, cfg: Config, tracking_uri: str, tracker_box: list, allow_other_shards: bool = False) -> None:
        configure_threads(cfg.train.threads)  # before any compute: torch's default oversubscribes shared cores
        self.cfg, self.t = cfg, cfg.train
        self.env = env = init_distributed()
        torch.manual_seed(cfg.train.seed)
        self.out_dir = location(cfg.train.output_dir)
        check_bucket(self.out_dir, "train.output_dir")
        self.ckpt_root = self.out_dir / "checkpoints"
        self.manifest = load_manifest(cfg.data.shards_dir, cfg.data.partitions)
        where = describe_shards(cfg.data.shards_dir, cfg.data.partitions)
        check_manifest_matches(self.manifest, cfg, where)
        self.id_hash = id_hash_of(self.manifest, where)
        self.shards = shards_record(cfg.data.shards_dir, self.manifest)  # kept in every checkpoint
        self.resume_from = _resume_path(cfg, self.out_dir)
        # the runs this model continues (train.continue_from), oldest first: kept in every checkpoint
        self.lineage: list[dict] = []
        self.continue_from = cfg.train.continue_from if self.resume_from is None else ""
        if self.continue_from:  # before anything is built: the same model, its ids hashed as these shards'
            path = checkpoint.resolve(self.continue_from)
            why = checkpoint.damage(path)
            if why is not None:
                raise checkpoint.CheckpointError(f"train.continue_from: {why}")
            before = checkpoint.check_resumable(path, cfg, key="train.continue_from")
            if not before.get("training_state"):
                raise checkpoint.CheckpointError(f"train.continue_from: {path} holds model weights only, not the "
                                                 "optimizer state to continue; give a training checkpoint, or "
                                                 "train.init_from for its weights with fresh optimizers")
            theirs = id_hash_of(before, str(path / checkpoint.META))
            if theirs != self.id_hash:
                raise checkpoint.CheckpointError(
                    f"train.continue_from: {path} was trained on ids of id_hash {theirs}, the shards in "
                    f"data.shards_dir hold id_hash {self.id_hash}: its table rows would stand for other ids")
            self.continue_from = str(path)
            self.lineage = list(before.get("lineage", [])) + [{
                "checkpoint": absolute(path), "step": int(before["step"]),
                "shards": (before.get("shards") or {}).get("content_hash"),
                "partitions": before.get("partitions", [])}]
        if self.resume_from is not None:  # before anything is built: its model, and the shards it was trained on
            resumed = checkpoint.check_resumable(self.resume_from, cfg)
            self.lineage = list(resumed.get("lineage", []))
            # its table rows stand for ids hashed one way: no flag makes other hashing right
            at = str(location(self.resume_from) / checkpoint.META)
            theirs = id_hash_of(resumed, at)
            if theirs != self.id_hash:
                raise checkpoint.CheckpointError(
                    f"{at}: its tables were trained on ids of id_hash {theirs}, the shards in data.shards_dir hold "
                    f"id_hash {self.id_hash} (manifest.json): resume on the shards it was trained on, or start a new "
                    "run (train.resume: none)")
            check_same_shards(resumed.get("shards"), self.manifest, cfg.data.shards_dir, self.resume_from,
                              allow=allow_other_shards, doing="resuming training on", quiet=not env.is_main)
        # the reader first: a split too small for this many ranks is an error before the model is built
        d = cfg.data
        how: dict[str, Any] = dict(
            rank=env.rank, world_size=env.world_size, num_workers=d.num_workers, seed=cfg.train.seed,
            shuffle_buffer=d.shuffle_buffer, prefetch_factor=d.prefetch_factor, pin_memory=env.device.type == "cuda",
            on_bad_task=d.on_bad_task, size_buckets=cfg.meta.size_buckets, partitions=d.partitions)
        self.reader = DynamicTaskReader(d.shards_dir, "train", cfg.meta.tasks_per_batch, nonce=new_nonce(), **how) \
            if d.sharding == "dynamic" else TaskReader(d.shards_dir, "train", cfg.meta.tasks_per_batch, **how)
        self.adaptive: AdaptiveBatch | None = None
        if cfg.train.adaptive_batch and env.world_size > 1:
            assert isinstance(self.reader, DynamicTaskReader)  # (config validation: data.sharding=dynamic)
            # a new split takes effect after the batches in flight (workers' prefetch, the pipeline's one)
            lag = max(1, d.num_workers) * d.prefetch_factor + 2
            self.reader.sizes = SizeSchedule(cfg.meta.tasks_per_batch, lag)
            self.adaptive = AdaptiveBatch(self.reader.sizes, cfg.meta.tasks_per_batch, cfg.train.adaptive_batch_every,
                                          cfg.train.adaptive_batch_min_share, env.device)
        self.model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, env.device)
        dense_params = self.model.module.dense_parameters()
        mean = self.manifest["splits"]["train"].get("label_mean")
        self.init_from = cfg.train.init_from if self.resume_from is None else ""
        if self.init_from:  # warm start: another run's weights (DCP reshards its tables to this plan)
            missing = checkpoint.load_init(self.init_from, self.model, cfg)
            if env.is_main:
                log.info("weights from %s%s", self.init_from,
                         f" (not in it, left as initialised: {', '.join(missing)})" if missing else "")
        elif cfg.model.objective == "regression" and self.resume_from is None and mean is not None:
            # start the output at the mean label (e.g. a rating of 3.5, not 0): the first steps
            # then learn the features rather than the scale
            self.model.module.head.init_output_bias(mean)  # (one mean per label with several)
        if self.resume_from is None and not self.continue_from:
            # ids that map to their feature's default row (resumed or continued: in the checkpoint)
            self.model.module.set_known_ids(known_ids(cfg))
        broadcast_params(dense_params)  # every rank starts from rank 0's dense weights
        # fused: one kernel, and it skips a non-finite step on the device (see train_step)
        self.dense_opt = torch.optim.Adam(dense_params, lr=cfg.optim.dense_lr,
                                          weight_decay=cfg.optim.dense_weight_decay, fused=True)
        self.grad_sync = DenseGradSync(dense_params)
        # the two-stage recipe: train.pretrain_epochs of ERM, then train.epochs of meta.algorithm
        self.epochs = cfg.train.pretrain_epochs + cfg.train.epochs
        self.pretrain_cfg = copy.deepcopy(cfg)
        self.pretrain_cfg.meta.algorithm = "erm"
        self.total_steps = len(self.reader) * self.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        o = cfg.optim
        self.schedule = LrSchedule(self.dense_opt, self.model.fused_optimizer, cfg, self.total_steps) \
            if o.warmup_steps or o.lr_decay != "none" else None
        # validation: a fixed subset of split "val", scored with the evaluation's own path
        self.val_cfg = copy.deepcopy(cfg)
        self.val_cfg.eval.split, self.val_cfg.eval.max_tasks, self.val_cfg.eval.curve_steps = \
            "val", cfg.train.val_max_tasks, [0]
        self.metric = val_metric(cfg)
        if cfg.train.val_every_steps and not self.manifest["splits"].get("val", {}).get("tasks"):
            raise ConfigError(f"train.val_every_steps: {cfg.data.shards_dir} has no validation tasks (split "
                              "'val'); prepare it with data.split.val_fraction > 0, or set train.val_every_steps=0")
        self.best: float | None = None
        self.best_step = self.since_best = 0
        self.stopped_early = self.interrupted = False
        self.epoch = 0
        self.step = self.start_epoch = self.tasks_total = self.tasks_run = self.skipped_nonfinite = 0
        self.run_id = ""
        self.tracker_uri = resolve_tracking_uri(cfg.tracking.uri, tracking_uri)
        self.tracker = NullTracker()
        self.tracker_box = tracker_box
        self.last_ckpt: Path | None = self.resume_from
        self.last: dict[str, float] = {}
        # non-finite steps since the last check, counted on the device (see check_nonfinite)
        self.bad = torch.zeros((), device=env.device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=env.device)
        # [tasks, rows] of the steps since the last log or checkpoint (see take_counts)
        self.counts = torch.zeros(2, dtype=torch.float64, device=env.device)
        self.since = {"t": time.perf_counter(), "tasks": 0, "rows": 0}  # (loop() starts the clock)
        self.t_loop = 0.0  # when loop() started (perf_counter)
        self.last_out: MetaOutput | None = None  # of the last step, and whether it was logged, validated
        self.logged, self.validated = False, -1

    @property
    def step_limit(self) -> int:
        """The step training ends at: ``total_steps``, except under dynamic sharding, where
        ranks make as many steps as the epochs' data gives (``total_steps`` is an estimate)
        unless train.max_steps (or an early stop) ends training first."""
        if self.reader.sharding == "static" or self.stopped_early:
            return self.total_steps
        return self.t.max_steps or (1 << 62)

    # ---------------------------------------------------------------- resume
    def resume(self) -> None:
        """Model, optimizer, reader position and RNG of ``resume_from``, if any; else the
        model and optimizer states of ``continue_from``, if any."""
        if self.resume_from is None:
            if self.continue_from:
                self.continue_training()
            return
        env = self.env
        checkpoint.check_state_fits(self.resume_from, self.model, self.dense_opt, self.cfg)
        meta, own = checkpoint.load_training_state(self.resume_from, self.model, self.dense_opt)
        self.step, self.tasks_total = int(meta["step"]), int(meta.get("tasks_total", 0))
        self.skipped_nonfinite = int(meta.get("skipped_nonfinite_steps", 0))
        val = meta.get("validation") or {}
        self.best, self.best_step, self.since_best = val.get("best"), int(val.get("best_step", 0)), \
            int(val.get("since_best", 0))
        if val.get("stopped_early"):  # it had ended: nothing more to train
            self.stopped_early, self.total_steps = True, self.step
        self.run_id = meta.get("mlflow_run_id", "")
        queue = meta.get("data_queue")
        dynamic = isinstance(self.reader, DynamicTaskReader)
        if own is not None:
            checkpoint.set_rng_state(own["rng"])
        if isinstance(self.reader, DynamicTaskReader) and queue is not None:
            # at any world size: the epoch's tasks no saved step trained
            self.reader.load_queue_state(queue)
            done = int(queue["trained_tasks"]) >= int(queue["epoch_tasks"])
            self.start_epoch = self.reader.epoch + (1 if done else 0)
            if env.is_main:
                log.info("data queue of epoch %d: %d of %d tasks trained, the %s handed out%s", self.reader.epoch,
                         queue["trained_tasks"], queue["epoch_tasks"], "rest" if not done else "next epoch",
                         f" (saved by {meta.get('world_size')} processes, now {env.world_size})"
                         if meta.get("world_size") != env.world_size else "")
        elif not dynamic and own is not None and own["reader"].get("sharding", "static") == "static":
            self.reader.load_state_dict(own["reader"])
            self.start_epoch = self.reader.epoch
        else:  # static positions are per rank: they do not carry over to another world size
            # a finished epoch goes on with the next; an unfinished one starts again from its
            # beginning (its tasks already trained are trained again, none is left out)
            self.start_epoch = int(meta["epoch"]) + (1 if meta.get("epoch_done") else 0)
            why = (f"{meta.get('world_size')} processes in {env.world_size}" if own is None
                   else f"data.sharding {'dynamic' if queue is not None else 'static'} with data.sharding "
                        f"{self.reader.sharding}")
            log.warning("resuming a checkpoint of %s: the data position restarts at the beginning of epoch %d (%s)%s",
                        why, self.start_epoch,
                        "the next one" if meta.get("epoch_done") else "the unfinished one, again from its start",
                        "" if dynamic else "; data.sharding=dynamic resumes mid-epoch at any world size")
        if env.is_main:
            log.info("resumed from %s at step %d (epoch %d)", self.resume_from, self.step, self.start_epoch)

    def continue_training(self) -> None:
        """Collective: the model and both optimizers' states of ``continue_from`` (resharded
        to this job), this run's rates kept; the known-id masks joined with those of this
        run's data (an id known before stays known, one seen often enough now joins)."""
        path, cfg = self.continue_from, self.cfg
        checkpoint.check_state_fits(path, self.model, self.dense_opt, cfg, key="train.continue_from")
        groups = self.dense_opt.param_groups + self.model.fused_optimizer.param_groups
        rates = [g["lr"] for g in groups]
        meta = checkpoint.load_model_and_optimizers(path, self.model, self.dense_opt)
        for g, lr in zip(groups, rates):  # (the loaded groups hold the rate its run ended with)
            g["lr"] = lr
        self.model.fused_optimizer.step()  # hands the rates to the fused kernels
        self.evict_stale_ids()
        rows = self.model.module.default_rows
        for name, mask in known_ids(cfg).items():
            before = getattr(rows, f"known_{name}").cpu()
            rows.set_known(name, before | mask)
            if self.env.is_main:
                log.info("features %s: %d ids known before, %d now", name, int(before.sum()),
                         int((before | mask).sum()))
        if self.env.is_main:
            log.info("continuing the model of %s (step %d, partitions %s): weights and optimizer states",
                     path, int(meta["step"]), ", ".join(meta.get("partitions", [])) or "-")

    def evict_stale_ids(self) -> None:
        """features.sparse[].evict_after_days: the managed ids that occur in none of the
        last D partitions up to the last this run reads give up their slots."""
        from gmeta.io import partitions as parts
        from gmeta.io.id_counts import read_all_ids

        cfg, env = self.cfg, self.env
        stale = [s for s in cfg.features.sparse if s.evict_after_days > 0]
        chosen = [p["name"] for p in self.manifest.get("selected_partitions", [])]
        if not stale or not chosen:
            if stale and env.is_main:
                log.warning("features.sparse[].evict_after_days: %s is not a partitioned data set: no id is evicted "
                            "by age", cfg.data.shards_dir)
            return
        root = location(cfg.data.shards_dir)
        every = parts.names(root)
        last = every.index(max(chosen))
        managed = self.model.module.managed
        for s in stale:
            window = every[max(0, last - s.evict_after_days + 1): last + 1]
            keep = torch.unique(torch.cat([torch.from_numpy(read_all_ids(parts.partition_dir(root, p), s.name))
                                           for p in window]))
            before = managed.live_ids()[s.name]
            n = managed.drop_ids(s.name, keep)
            if env.is_main:
                log.info("features %s: %d of %d ids evicted, not seen in the last %d partition(s) (%s..%s)", s.name,
                         n, before, len(window), window[0], window[-1])

    # ---------------------------------------------------------------- tracking
    def open_tracking(self) -> None:
        """Rank 0: the MLflow run (continued when resuming), its params, inputs and tags."""
        cfg, env = self.cfg, self.env
        if not env.is_main:
            return
        if not is_url(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker = _open_run(cfg, self.tracker_uri, self.run_id)
        self.tracker_box.append(tracker)
        tags = {**environment_tags(), "gmeta.world_size": str(env.world_size), "gmeta.algorithm": cfg.meta.algorithm,
                "gmeta.device": env.device.type, "gmeta.checkpoint": absolute(self.out_dir / "checkpoint")}
        if self.resume_from is not None:
            tags["gmeta.resumed_from"] = f"{self.resume_from} (step {self.step})"
        if self.lineage:
            tags["gmeta.continued_from"] = self.lineage[-1]["checkpoint"]
        if self.manifest.get("selected_partitions"):
            tags["gmeta.partitions"] = ",".join(p["name"] for p in self.manifest["selected_partitions"])
        if tracker.run_id != self.run_id:  # a new run (not a continued one): its params and inputs
            tracker.log_params(flatten(to_dict(cfg)))
            tracker.log_text(dump_yaml(cfg), "config.yaml")
            # (of a partitioned data set: the manifest merging the partitions read)
            tracker.log_text(json.dumps(self.manifest, indent=2), "manifest.json")
        tracker.set_tags(tags)
        log.info("training %s: %d steps (%d per epoch), %d tasks per step on each of %d ranks",
                 cfg.meta.algorithm, self.total_steps, len(self.reader), cfg.meta.tasks_per_batch, env.world_size)

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: Path, weights_only: bool = False) -> Path:
        env, reader = self.env, self.reader
        self.take_counts(self.since)
        queue = None
        if isinstance(reader, DynamicTaskReader):
            pos = reader.state_dict()
            if not weights_only:  # collective: every rank's trained tasks
                queue = reader.queue_state()
            done = queue is not None and int(queue["trained_tasks"]) >= int(queue["epoch_tasks"])
        else:
            pos = reader.committed
            done = pos["steps_done"] >= len(reader)
        meta = {"step": self.step, "epoch": pos["epoch"], "epoch_done": done, "data_queue": queue,
                "tasks_total": self.tasks_total, "skipped_nonfinite_steps": self.skipped_nonfinite,
                "algorithm": self.cfg.meta.algorithm, "mlflow_run_id": self.tracker.run_id if env.is_main else "",
                "tracking_uri": self.tracker.uri if env.is_main else "",
                "input_columns": self.manifest.get("input_columns"),  # raw types, for serving
                "id_hash": self.id_hash,  # of the shards the tables learn from: serving hashes raw ids alike
                "shards": self.shards,  # which shards: evaluate, predict and resume compare them
                # the partitions of a partitioned data set it trained on, and the runs it continues
                "partitions": [p["name"] for p in self.manifest.get("selected_partitions", [])],
                "lineage": self.lineage,
                # wall seconds of this process's training loop so far (a resumed run: since it resumed)
                "loop_seconds": round(time.perf_counter() - self.t_loop, 3) if self.t_loop else None,
                "validation": {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                               "since_best": self.since_best, "stopped_early": self.stopped_early}}
        if weights_only:
            return checkpoint.save(self.model, self.cfg, path, meta)
        return checkpoint.save(self.model, self.cfg, path, meta, dense_opt=self.dense_opt,
                               rank_state={"reader": pos, "rng": checkpoint.rng_state()})

    # ---------------------------------------------------------------- validation
    def validate(self) -> bool:
        """Collective: score the validation subset; keep the weights in <output_dir>/best when
        they beat the best so far. Returns whether to stop early."""
        from gmeta.evaluation.evaluate import evaluate

        t0 = time.perf_counter()
        report = evaluate(self.model, self.val_cfg, self.cfg.data.shards_dir)
        scorer = "erm" if self.cfg.meta.algorithm == "erm" else "maml"
        value = torch.tensor([float(report[f"{scorer}_{self.metric}"]) if report is not None else 0.0],
                             dtype=torch.float64, device=self.env.device)
        dist.broadcast(value, src=0)  # rank 0 holds the report: every rank decides alike
        v = float(value.item())
        better = self.best is None or (v > self.best if HIGHER_IS_BETTER[self.metric] else v < self.best)
        if better:
            self.best, self.best_step, self.since_best = v, self.step, 0
            self.save(self.out_dir / "best", weights_only=True)
        else:
            self.since_best += 1
        assert self.best is not None
        self.tracker.log_metrics({f"val/{self.metric}": v, f"val/best_{self.metric}": self.best}, step=self.step)
        if self.env.is_main:  # the history, one JSON line per validation (read by gmeta sweep to prune)
            stage = "pretrain" if self.epoch < self.t.pretrain_epochs else "meta"
            append_text(self.out_dir / "validation.jsonl",
                        json.dumps({"step": self.step, "stage": stage, self.metric: v, "best": self.best}) + "\n")
        if self.env.is_main:
            log.info("validation at step %d: %s %.4f (best %.4f at step %d%s) in %.1fs", self.step, self.metric, v,
                     self.best, self.best_step, ", kept in best/" if better else "", time.perf_counter() - t0)
        patience = self.t.early_stopping_patience
        return bool(patience) and self.since_best >= patience

    def checkpoint(self) -> None:
        """A training checkpoint of this step (the newest ``keep_checkpoints`` are kept)."""
        self.last_ckpt = self.save(checkpoint.step_dir(self.ckpt_root, self.step))
        if self.env.is_main:
            checkpoint.prune(self.ckpt_root, self.t.keep_checkpoints)
            log.info("checkpoint: %s", self.last_ckpt)

    def check_nonfinite(self) -> None:
        """Read the device-side count of non-finite steps (a sync point: log and checkpoint
        steps only); raise under on_nonfinite_loss=error."""
        n, first = int(self.bad.item()), int(self.first_bad.item())
        if n and self.t.on_nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"step {first}: the meta-loss was not finite ({n} such step(s) up to step {self.step}); no update "
                f"was applied for them. Last checkpoint: {self.last_ckpt or 'none'} (unchanged). Lower "
                "meta.inner_lr or optim.dense_lr, or set train.on_nonfinite_loss=skip")
        self.bad.zero_()
        self.first_bad.fill_(-1)
        self.skipped_nonfinite += n

    # ---------------------------------------------------------------- logging
    def log(self, out: MetaOutput, epoch: int, since: dict, ckpt_clock: float) -> bool:
        """Log step: losses and rates averaged over ranks, to MLflow and the log. Returns
        whether a timed checkpoint is due (rank 0's clock decides for all)."""
        env, t, fetch = self.env, self.t, self.fetch
        self.take_counts(since)
        dt = time.perf_counter() - since["t"]
        due = env.is_main and t.checkpoint_every_minutes > 0 and \
            time.perf_counter() - ckpt_clock >= 60 * t.checkpoint_every_minutes
        s = LogStats.gather(out.loss.device, env.world_size, query_loss=out.query_loss.mean(),
                            support_loss=out.support_loss.mean(), data_stall_share=fetch.since / dt,
                            skipped_bad_tasks=self.reader.skipped_tasks, comm_wait_share=self.times.share(),
                            checkpoint_due=due)
        self.last = {"train/query_loss": s.query_loss, "train/support_loss": s.support_loss,
                     "train/tasks_per_s": since["tasks"] / dt, "train/rows_per_s": since["rows"] / dt,
                     "train/data_stall_share": s.data_stall_share,
                     "train/skipped_bad_tasks": s.skipped_bad_tasks * env.world_size,
                     "train/skipped_nonfinite_steps": float(self.skipped_nonfinite),
                     "train/tasks_left_out": float(self.reader.dropped_tasks),  # this epoch's, all ranks'
                     "train/comm_wait_share": s.comm_wait_share, "train/epoch": float(epoch)}
        if self.adaptive is not None:  # this split of the global batch among ranks
            self.last.update({"train/rank_tasks_min": float(min(self.adaptive.sizes)),
                              "train/rank_tasks_max": float(max(self.adaptive.sizes))})
        if out.extra:  # the same names on every rank (they come from the config): one more all-reduce
            extra = torch.stack([v.detach().float().reshape(()) for v in out.extra.values()])
            dist.all_reduce(extra)
            self.last.update({f"train/{k}": v / env.world_size for k, v in zip(out.extra, extra.tolist())})
        managed = training_metrics(self.model.module.managed)  # features.sparse[].ids: managed
        self.last.update(managed)
        self.tracker.log_metrics(self.last, step=self.step)
        if env.is_main and managed:
            names = [k.split("/")[2] for k in managed if k.endswith("/live_ids")]
            log.info("managed ids: %s", "; ".join(
                f"{n} {managed[f'train/managed/{n}/live_ids']:.0f} live, "
                f"{managed[f'train/managed/{n}/evictions']:.0f} evicted, "
                f"{100 * managed[f'train/managed/{n}/miss_share']:.1f}% on the miss row" for n in names))
        if env.is_main:
            m = self.last
            log.info("step %d/%d epoch %d query_loss %.4f support_loss %.4f %.0f tasks/s %.0f rows/s "
                     "data stall %.1f%% comm wait %.1f%%", self.step, self.total_steps, epoch,
                     m["train/query_loss"], m["train/support_loss"], m["train/tasks_per_s"], m["train/rows_per_s"],
                     100 * m["train/data_stall_share"], 100 * m["train/comm_wait_share"])
            if out.extra:
                log.info("step %d %s", self.step, " ".join(f"{k} {m[f'train/{k}']:.4f}" for k in out.extra))
        since.update(t=time.perf_counter(), tasks=0, rows=0)
        fetch.since = 0.0
        return s.checkpoint_due > 0

    # ---------------------------------------------------------------- the loop
    def loop(self) -> None:
        env, t = self.env, self.t
        # the pipeline copies on its own stream; pads: see Fetcher
        self.fetch = Fetcher(None if t.pipeline else env.device,
                              pad=self.reader.sharding == "dynamic" and env.world_size > 1)
        self.pipe = SparseDistPipeline(self.model.module, self.cfg.meta.size_buckets, env.device) \
            if t.pipeline else None
        self.times = StepTimes()
        self.tasks_run = 0
        self.since = since = {"t": time.perf_counter(), "tasks": 0, "rows": 0}
        ckpt_clock = self.t_loop = time.perf_counter()
        stop, agreed_stop = StopRequest(), AgreedStop(env.device)
        stop.install()  # before the reader's workers are forked: they inherit it
        try:
            self._loop(stop, agreed_stop, since, ckpt_clock)
        finally:
            stop.restore()

    def _loop(self, stop: StopRequest, agreed_stop: AgreedStop, since: dict, ckpt_clock: float) -> None:
        env, t, fetch, pipe = self.env, self.t, self.fetch, self.pipe
        if t.val_every_steps and t.init_from and self.step == 0:
            # weights from another run are a candidate too: the best validation kept may be
            # the start (an id generator that never beats the default row it starts from
            # leaves that row, not its best of worse steps)
            self.stopped_early = self.validate()
            self.validated = 0
        for epoch in range(self.start_epoch, self.epochs):
            if self.step >= self.step_limit:
                break
            self.reader.set_epoch(epoch)
            fetch.new_epoch(self.reader)
            self.epoch = epoch
            stage = self.pretrain_cfg if epoch < t.pretrain_epochs else self.cfg
            if t.pretrain_epochs and env.is_main and epoch in (self.start_epoch, t.pretrain_epochs):
                log.info("epoch %d: %s", epoch, "pretraining (erm)" if stage is self.pretrain_cfg
                         else f"meta-training ({self.cfg.meta.algorithm})")
            if self.schedule is not None:
                self.schedule.apply(self.step)
            adaptive = self.adaptive
            epoch_step = 0
            for batch, out in run_steps(self.model, stage, self.grad_sync, self.dense_opt, fetch,
                                        self.step_limit - self.step, pipe, self.times, stop,
                                        adaptive.timer if adaptive is not None else None):
                self.step += 1
                epoch_step += 1
                if self.schedule is not None:  # the rate of the next step
                    self.schedule.apply(self.step)
                if adaptive is not None:  # (collective every few steps)
                    adaptive.after_step(epoch_step, 0 if fetch.oldest_is_pad() else batch.num_tasks, self.step)
                fetch.trained()
                self.bad.add_(out.skipped.to(self.bad.dtype))  # read on log and checkpoint steps
                self.first_bad = torch.where(out.skipped & (self.first_bad < 0),
                                             torch.full_like(self.first_bad, self.step), self.first_bad)
                if out.global_counts is not None:  # several ranks: what the step's all-reduce summed
                    self.counts += out.global_counts
                else:
                    self.counts += self.counts.new_tensor([batch.num_tasks, batch.num_rows])
                last = self.step == self.step_limit
                self.last_out, self.logged = out, last
                want_ckpt = bool(t.checkpoint_every_steps) and self.step % t.checkpoint_every_steps == 0
                if want_ckpt or self.step % t.log_every == 0 or last:
                    self.check_nonfinite()
                if self.step % t.log_every == 0 or last:
                    want_ckpt |= self.log(out, epoch, since, ckpt_clock)
                if t.val_every_steps and (self.step % t.val_every_steps == 0 or last):
                    self.stopped_early = self.validate()
                    self.validated = self.step
                if self.stopped_early:
                    if env.is_main:
                        log.info("early stop at step %d: %d validations without a better %s (best %.4f at step %d)",
                                 self.step, self.since_best, self.metric, self.best, self.best_step)
                    break
                if want_ckpt and not last:
                    self.checkpoint()
                    ckpt_clock = time.perf_counter()
                # every step on every rank (the GPU's read lags a step); the last step ends anyway
                asked = agreed_stop(stop.agreed) if stop.agreed is not None else stop.requested
                if asked and not last:
                    self.interrupted = True
                    break
            if self.stopped_early or self.interrupted:
                break
        if self.last_out is not None and not (self.logged or self.stopped_early or self.interrupted):
            # dynamic sharding: the last step was known only when every rank ran out of data
            self.check_nonfinite()
            self.log(self.last_out, self.epoch, since, ckpt_clock)
            if t.val_every_steps and self.validated != self.step:
                self.stopped_early = self.validate()

    def take_counts(self, since: dict) -> int:
        """Add the steps' tasks and rows counted on the device since the last call (a read:
        log and checkpoint steps only) to ``since`` and the totals; returns the tasks."""
        tasks, rows = (int(round(v)) for v in self.counts.tolist())
        self.counts.zero_()
        self.tasks_run += tasks
        self.tasks_total += tasks
        since["tasks"] += tasks
        since["rows"] += rows
        return tasks

    def stop_at_interrupt(self) -> TrainingInterrupted:
        """Collective, after a Ctrl-C ended the loop on every rank after the same step: the
        training checkpoint of that step (unless it was just written), the MLflow run marked
        KILLED. Returns the exception that says where the checkpoint is."""
        self.check_nonfinite()
        if self.last_ckpt is None or str(self.last_ckpt) != str(checkpoint.step_dir(self.ckpt_root, self.step)):
            self.checkpoint()
        assert self.last_ckpt is not None
        dist.destroy_process_group()
        if self.env.is_main:
            self.tracker.finish(status="KILLED")
            self.tracker_box.clear()
        return TrainingInterrupted(self.step, self.last_ckpt)

    # ---------------------------------------------------------------- the end
    def finish(self) -> dict:
        """Data-stall totals, the final checkpoint, and on rank 0 the evaluation."""
        env, fetch, last = self.env, self.fetch, self.last
        self.take_counts(self.since)
        # share of the whole loop spent waiting for data (and the same without each epoch's
        # first batch, i.e. in steady state), averaged over ranks
        loop_s = max(time.perf_counter() - self.t_loop, 1e-9)
        steady = (fetch.total - fetch.first_total) / max(loop_s - fetch.first_total, 1e-9)
        stall = torch.tensor([fetch.total / loop_s, steady], device=env.device)
        dist.all_reduce(stall)
        stall /= env.world_size
        last["train/data_stall_share_total"] = stall[0].item()
        last["train/data_stall_share_steady"] = stall[1].item()
        last["train/tasks_per_s_total"] = self.tasks_run / loop_s  # the whole loop (this attempt), every rank's
        last["train/comm_wait_share_total"] = self.times.share()
        self.tracker.log_metrics({k: last[k] for k in ("train/data_stall_share_total", "train/data_stall_share_steady",
                                                       "train/tasks_per_s_total", "train/comm_wait_share_total")},
                                 step=self.step)
        if env.is_main:
            log.info("data stall: %.2f%% of the training loop waited for data (%.2f%% after each epoch's first "
                     "batch)", 100 * stall[0].item(), 100 * stall[1].item())
        ckpt = self.save(self.out_dir / "checkpoint")
        if env.is_main and self.ckpt_root.is_dir():
            checkpoint.prune(self.ckpt_root, self.t.keep_checkpoints)
        dist.destroy_process_group()
        result: dict = {"checkpoint": str(ckpt), "steps": self.step, **last}
        chosen = ckpt  # what is evaluated and logged as the model: the best validated weights, if any
        if self.best is not None:
            chosen = self.out_dir / "best"
            result.update({"best_checkpoint": str(chosen), "best_step": self.best_step,
                           f"val/best_{self.metric}": self.best, "stopped_early": self.stopped_early})
        if env.is_main:
            tracker = self.tracker
            if self.best is not None:
                tracker.set_tags({"gmeta.best_checkpoint": absolute(chosen),
                                  "gmeta.best_step": str(self.best_step)})
                log.info("best %s %.4f at step %d: %s", self.metric, self.best, self.best_step, chosen)
            _finish_run(tracker, chosen, self.cfg, self.out_dir, self.step, result)
            tracker.finish()
            self.tracker_box.clear()
            log.info("checkpoint: %s", ckpt)
            if tracker.run_id:
                log.info("mlflow run %s; to browse: %s", tracker.run_id, ui_command(self.tracker_uri))
        return result


def _run(cfg: Config, tracking_uri: str, tracker_box: list, allow_other_shards: bool = False) -> dict:
    run = TrainingRun(cfg, tracking_uri, tracker_box, allow_other_shards)  # setup
    run.resume()
    inner = run.model.module
    if cfg.generator.train_ids == "all":  # the tables are loaded (train.init_from, or the resumed checkpoint)
        inner.generator_base = inner.default_row(inner.generator.feature)
    run.open_tracking()
    run.loop()
    if run.interrupted:
        raise run.stop_at_interrupt()
    return run.finish()


def _open_run(cfg: Config, uri: str, run_id: str):
    """The MLflow run of this training: the checkpoint's run when resuming (the same run
    continues, no duplicate), else a new one."""
    if run_id and cfg.tracking.enabled:
        from mlflow.exceptions import MlflowException

        try:
            return make_tracker(True, uri, cfg.tracking.experiment, run_id=run_id,
                                system_metrics_s=cfg.tracking.system_metrics_s)
        except MlflowException as e:
            log.warning("cannot continue MLflow run %s at %s (%s): starting a new run", run_id, uri, e.message)
    return make_tracker(cfg.tracking.enabled, uri, cfg.tracking.experiment, cfg.tracking.run_name,
                        system_metrics_s=cfg.tracking.system_metrics_s, parent_run_id=cfg.tracking.parent_run_id)


def _finish_run(tracker, ckpt: Path, cfg: Config, out_dir: Path, step: int, result: dict) -> None:
    """Rank 0 after training: learning curves, cold-start evaluation report, pyfunc model."""
    history = getattr(tracker, "history", {})
    curves = {k: v for k, v in history.items() if k in ("train/query_loss", "train/support_loss")}
    if curves:  # (matplotlib imported only to draw them)
        from gmeta.evaluation import plots

        with local_dir(out_dir) as d:
            tracker.log_artifact(plots.learning_curves(curves, d / "learning_curves.png", cfg.model.objective),
                                 "plots")
    emodel = None
    if cfg.train.eval_at_end or (cfg.tracking.enabled and cfg.tracking.log_model):
        emodel, ecfg, _ = checkpoint.load_unsharded(ckpt)
    if cfg.train.eval_at_end:
        from gmeta.evaluation.evaluate import evaluate
        from gmeta.evaluation.render import format_table, log_report, write_report
        from gmeta.evaluation.report import flat_metrics

        report = evaluate(emodel, ecfg, cfg.data.shards_dir, inner_steps=cfg.eval.inner_steps)
        assert report is not None  # the process group is destroyed by now: one process, the report is complete
        report["checkpoint"] = str(ckpt)
        with local_dir(out_dir / "eval") as d:
            files = write_report(report, d)
            log_report(tracker, report, files, step)
        log.info("cold-start evaluation:\n%s", format_table(report))
        result.update({f"eval/{k}": v for k, v in flat_metrics(report).items()})
    if cfg.tracking.enabled and cfg.tracking.log_model and tracker.run_id:
        from gmeta.inference.pyfunc import log_model

        t = time.perf_counter()
        with local_copy(ckpt) as local:  # MLflow copies the model's artifacts from local files
            uri = log_model(local, ecfg, emodel)
        log.info("model logged as %s (mlflow.pyfunc.load_model) in %.1fs", uri, time.perf_counter() - t)
        result["model_uri"] = uri
