"""Meta-training, top to bottom: setup (or resume) -> loop over meta-batches -> log ->
checkpoint -> evaluate -> cleanup. Run by ``gmeta train`` in every process torchrun starts
(or directly in one process).

Fault tolerance: training checkpoints (``train.checkpoint_every_steps`` / ``_minutes``)
hold the sharded tables and their fused optimizer state, the dense parameters and Adam
state, every rank's reader position as of its last *trained* meta-batch (with the
pipeline, the prefetched one is not counted) and RNG state, the step and the MLflow run.
``train.resume=auto`` continues from the newest complete one, so under
``torchrun --max-restarts`` a killed job restarts where its last checkpoint ends: every
task of an epoch contributes to exactly one optimizer step that survives.

One meta-batch (see DESIGN.md)::

    lookup of support+query ids (one all-to-all)  ->  inner loop, local, autograd.grad only
    -> query loss -> ONE backward(): embedding grads -> fused optimizer on the owning shard,
                                      dense grads -> mean all-reduce -> Adam step
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from gmeta import checkpoint
from gmeta.config import Config, dump_yaml, flatten, to_dict
from gmeta.io.prepare import check_manifest_matches, load_manifest
from gmeta.io.reader import TaskReader
from gmeta.models.dlrm import build_model, dense_autocast
from gmeta.parallel.dist import DenseGradSync, broadcast_params, configure_threads, init_distributed
from gmeta.parallel.layout import layout_of
from gmeta.parallel.maml import MetaOutput, erm_loss, maml_loss
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.parallel.sharding import shard_model
from gmeta.tracking import NullTracker, environment_tags, make_tracker, resolve_tracking_uri, ui_command
from gmeta.types import TaskBatch

log = logging.getLogger(__name__)


def meta_step(model, batch, cfg: Config, rows: torch.Tensor | None = None) -> MetaOutput:
    """Forward of one meta-batch on the (sharded) model; returns the loss to backward.
    ``rows``: the batch's looked-up embeddings when a pipeline already looked them up."""
    inner = model.module if hasattr(model, "module") else model
    m = cfg.meta
    layout = layout_of(batch, inner.pooling, m.size_buckets)
    if rows is None:
        with record_function("## lookup ##"):
            rows = inner.lookup(layout)
    with dense_autocast(cfg, rows.device):
        if m.algorithm == "erm":
            out = erm_loss(inner.head, rows, batch, layout)
        else:
            lr, emb_lr = inner.inner_lrs(m.inner_lr, m.embedding_inner_lr)
            out = maml_loss(inner.head, rows, batch, layout, steps=m.inner_steps, lr=lr, emb_lr=emb_lr,
                            adapt_dense=m.adapt_dense, adapt_embeddings=m.adapt_embeddings,
                            first_order=m.first_order, fast_weights=m.fast_weights)
    out.loss = out.loss.float()
    return out


class _Fetcher:
    """Takes batches from the reader, timing how long the loop waits for them, and keeps
    the reader's position after each batch taken until that batch is trained."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device  # None: batches stay on the host (the pipeline copies them)
        self.since = 0.0  # waited since the last log step
        self.total = 0.0  # waited in all
        self.first_total = 0.0  # waited for each epoch's first batch (reader workers starting)
        self.positions: deque[dict] = deque()

    def new_epoch(self, reader: TaskReader) -> None:
        self.reader, self.batches, self.first = reader, iter(reader), True
        self.positions.clear()

    def trained(self) -> dict:
        """Reader position just after the batch that was trained last (fetch order)."""
        return self.positions.popleft()

    def __call__(self) -> TaskBatch | None:
        t = time.perf_counter()
        with record_function("## data_wait ##"):
            batch = next(self.batches, None)  # prefetched by the reader's workers
        waited = time.perf_counter() - t
        self.since += waited
        self.total += waited
        if self.first:
            self.first_total += waited
            self.first = False
        if batch is None:
            return None
        self.positions.append(self.reader.state_dict())
        return batch if self.device is None else batch.to(self.device, non_blocking=True)


class NonFiniteLossError(RuntimeError):
    """The meta-loss became NaN or infinite (train.on_nonfinite_loss=error)."""


def agree_across_ranks(loss: torch.Tensor, local_count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tiny all-reduce per step, never read back here (a host read would stall the GPU
    every step). Returns (finite, weight): whether the loss is finite on every rank, a bool
    tensor on the loss's device; and the factor that turns this rank's mean loss into its
    share of the mean over the *global* batch, ``local_count * world / global_count``
    (None in one process). Gradients are then averaged over ranks as usual, and the step
    equals one process on the whole global batch even when ranks hold different numbers of
    rows (ERM) or tasks (MAML's last batch of an epoch)."""
    dev = loss.device
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return finite[0] > 0, None
    world = dist.get_world_size()
    both = torch.cat([finite, torch.full((1,), float(local_count), device=dev)])
    dist.all_reduce(both)  # [ranks with a finite loss, global count]
    return both[0] > world - 0.5, both[1].reciprocal() * float(local_count * world)


def _supports_skip(opt: torch.optim.Optimizer) -> bool:
    """A fused optimizer skips its step on the device when its ``found_inf`` is set."""
    return bool(opt.defaults.get("fused"))


def train_step(model, batch, cfg: Config, grad_sync: DenseGradSync, dense_opt: torch.optim.Optimizer,
               rows: torch.Tensor | None = None, times: StepTimes | None = None) -> MetaOutput:
    """One optimizer step on one meta-batch: forward, ONE backward (dense all-reduces start
    from its gradient hooks), wait for them, step.

    No value is read back from the device. A meta-loss that is not finite on some rank
    changes nothing on any: the gradient reaching the embedding lookup is zeroed on the
    device (the fused table update, inside backward, then leaves SGD and (row-wise)
    Adagrad tables and their state exactly as they were), and the fused dense optimizer is
    told to skip (``found_inf``). ``out.skipped`` is that flag, a device tensor the
    training loop reads on log steps. With a dense optimizer that is not fused the flag is
    read at once instead and backward is not run."""
    inner = model.module if hasattr(model, "module") else model
    if rows is None:
        with record_function("## lookup ##"):
            rows = inner.lookup(layout_of(batch, inner.pooling, cfg.meta.size_buckets))
    out = meta_step(model, batch, cfg, rows)
    finite, weight = agree_across_ranks(out.loss, batch.num_rows if cfg.meta.algorithm == "erm" else batch.num_tasks)
    if weight is not None:
        out.loss = out.loss * weight
    out.skipped = ~finite
    if not _supports_skip(dense_opt):
        if not bool(finite):
            return out
    elif rows.requires_grad:
        rows.register_hook(lambda g: torch.where(finite, g, torch.zeros_like(g)))
    with record_function("## backward ##"):
        out.loss.backward()  # the only backward of the step; fires the fused embedding optimizer
    t = time.perf_counter()
    with record_function("## dense_allreduce_wait ##"):
        grad_sync.wait()
    if times is not None:
        times.comm += time.perf_counter() - t
    if _supports_skip(dense_opt):
        dense_opt.found_inf = out.skipped.to(torch.float32)
    dense_opt.step()
    dense_opt.zero_grad(set_to_none=True)
    return out


class StepTimes:
    """Wall time of training steps and of their waits on communication: the embedding
    lookup (id and embedding all-to-alls; with the pipeline only what is still in flight)
    and the dense all-reduce wait. CPU clocks: on a GPU they time launches, not kernels."""

    def __init__(self) -> None:
        self.comm = 0.0
        self.step = 0.0

    def share(self) -> float:
        return self.comm / self.step if self.step else 0.0


def run_steps(model, cfg: Config, grad_sync: DenseGradSync, dense_opt: torch.optim.Optimizer, fetch,
              max_steps: int, pipe: SparseDistPipeline | None, times: StepTimes | None = None):
    """Train on batches from ``fetch()`` (None: no more) for at most ``max_steps`` steps,
    yielding (batch, output) after each. With ``pipe``, batch i+1 is fetched and its id
    all-to-all started before batch i computes."""
    times = times if times is not None else StepTimes()
    inner = model.module if hasattr(model, "module") else model
    pending = None  # the next batch (with the pipeline: its id all-to-all in flight)
    done = 0
    while done < max_steps:
        if pending is None:
            batch = fetch()
            if batch is None:
                return
            pending = pipe.start(batch) if pipe else batch
        current, pending = pending, None
        if pipe and done + 1 < max_steps:
            nxt = fetch()
            if nxt is not None:
                pending = pipe.start(nxt)
        t0 = time.perf_counter()
        with record_function("## lookup ##"):
            if pipe:
                batch, rows = current.batch, pipe.lookup(current)
            else:
                batch = current
                rows = inner.lookup(layout_of(batch, inner.pooling, cfg.meta.size_buckets))
        times.comm += time.perf_counter() - t0
        out = train_step(model, batch, cfg, grad_sync, dense_opt, rows=rows, times=times)
        if pipe and pending is not None:  # this step is queued: collect the next batch's ids meanwhile
            pipe.wait_ids(pending)
        times.step += time.perf_counter() - t0
        done += 1
        yield batch, out


def main(cfg: Config, *, tracking_uri: str = "") -> dict:
    """Train with ``cfg`` in this process (one of ``WORLD_SIZE``); returns final metrics."""
    tracker_box: list = []
    try:
        return _run(cfg, tracking_uri, tracker_box)
    except BaseException:
        if tracker_box:  # leave no MLflow run marked as running after a crash
            tracker_box[0].finish(status="FAILED")
        raise


def _resume_path(cfg: Config, out_dir: Path) -> Path | None:
    """The checkpoint to continue from, per train.resume."""
    root = out_dir / "checkpoints"
    found = checkpoint.complete_checkpoints(root)
    final = out_dir / "checkpoint"
    if (final / checkpoint.META).is_file():
        meta = checkpoint.read_meta(final)
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
        return max(found)[1] if found else None
    checkpoint.read_meta(resume)  # exists and is complete, or a CheckpointError naming it
    return Path(resume)


def _run(cfg: Config, tracking_uri: str, tracker_box: list) -> dict:
    # ---------------------------------------------------------------- setup
    configure_threads(cfg.train.threads)  # before any compute: torch's default oversubscribes shared cores
    env = init_distributed()
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    manifest = load_manifest(cfg.data.shards_dir)
    check_manifest_matches(manifest, cfg, str(Path(cfg.data.shards_dir) / "manifest.json"))
    resume_from = _resume_path(cfg, out_dir)
    # the reader first: a split too small for this many ranks is an error before the model is built
    d = cfg.data
    reader = TaskReader(d.shards_dir, "train", cfg.meta.tasks_per_batch, rank=env.rank, world_size=env.world_size,
                        num_workers=d.num_workers, seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer,
                        prefetch_factor=d.prefetch_factor, pin_memory=env.device.type == "cuda",
                        on_bad_task=d.on_bad_task, size_buckets=cfg.meta.size_buckets)

    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, env.device)
    dense_params = model.module.dense_parameters()
    mean = manifest["splits"]["train"].get("label_mean")
    if cfg.model.objective == "regression" and resume_from is None and mean is not None:
        # start the output at the mean label (e.g. a rating of 3.5, not 0): the first steps
        # then learn the features rather than the scale
        with torch.no_grad():
            model.module.head.over_arch.mlp.layers[-1].bias.fill_(float(mean))
    broadcast_params(dense_params)  # every rank starts from rank 0's dense weights
    # fused: one kernel, and it skips a non-finite step on the device (see train_step)
    dense_opt = torch.optim.Adam(dense_params, lr=cfg.optim.dense_lr, weight_decay=cfg.optim.dense_weight_decay,
                                 fused=True)
    grad_sync = DenseGradSync(dense_params)

    total_steps = len(reader) * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    step, start_epoch, tasks_total, skipped_nonfinite = 0, 0, 0, 0
    run_id = ""
    if resume_from is not None:
        meta, own = checkpoint.load_training_state(resume_from, model, dense_opt)
        step, tasks_total = int(meta["step"]), int(meta.get("tasks_total", 0))
        skipped_nonfinite = int(meta.get("skipped_nonfinite_steps", 0))
        run_id = meta.get("mlflow_run_id", "")
        if own is not None:
            reader.load_state_dict(own["reader"])
            checkpoint.set_rng_state(own["rng"])
            start_epoch = reader.epoch
        else:  # reader positions are per rank: they do not carry over to another world size
            start_epoch = int(meta["epoch"]) + (0 if meta.get("epoch_done") else 1)
            log.warning("resuming a checkpoint of %s processes in %d: model and optimizer state resharded; "
                        "the data position restarts at epoch %d", meta.get("world_size"), env.world_size,
                        start_epoch)
        if env.is_main:
            log.info("resumed from %s at step %d (epoch %d)", resume_from, step, start_epoch)

    uri = resolve_tracking_uri(cfg.tracking.uri, tracking_uri)
    tracker = NullTracker()
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tracker = _open_run(cfg, uri, run_id)
        tracker_box.append(tracker)
        tags = {**environment_tags(), "gmeta.world_size": str(env.world_size), "gmeta.algorithm": cfg.meta.algorithm,
                "gmeta.device": env.device.type, "gmeta.checkpoint": str((out_dir / "checkpoint").resolve())}
        if resume_from is not None:
            tags["gmeta.resumed_from"] = f"{resume_from} (step {step})"
        if tracker.run_id != run_id:  # a new run (not a continued one): its params and inputs
            tracker.log_params(flatten(to_dict(cfg)))
            tracker.log_text(dump_yaml(cfg), "config.yaml")
            tracker.log_artifact(Path(cfg.data.shards_dir) / "manifest.json")
        tracker.set_tags(tags)
        log.info("training %s: %d steps (%d per epoch), %d tasks per step on each of %d ranks",
                 cfg.meta.algorithm, total_steps, len(reader), cfg.meta.tasks_per_batch, env.world_size)

    # ---------------------------------------------------------------- loop
    t_log = time.perf_counter()
    t_ckpt = time.perf_counter()
    tasks_since = rows_since = 0
    fetch = _Fetcher(None if cfg.train.pipeline else env.device)  # the pipeline copies on its own stream
    t_loop = time.perf_counter()
    last: dict[str, float] = {}
    pipe = SparseDistPipeline(model.module, cfg.meta.size_buckets, env.device) if cfg.train.pipeline else None
    times = StepTimes()
    tasks_run = 0
    position = reader.state_dict()
    last_ckpt: Path | None = resume_from
    t = cfg.train

    def save(path: Path) -> Path:
        meta = {"step": step, "epoch": position["epoch"], "epoch_done": position["steps_done"] >= len(reader),
                "tasks_total": tasks_total, "skipped_nonfinite_steps": skipped_nonfinite,
                "algorithm": cfg.meta.algorithm, "mlflow_run_id": tracker.run_id if env.is_main else "",
                "tracking_uri": tracker.uri if env.is_main else "",
                "input_columns": manifest.get("input_columns")}  # raw types, for serving
        return checkpoint.save(model, cfg, path, meta, dense_opt=dense_opt,
                               rank_state={"reader": position, "rng": checkpoint.rng_state()})

    bad = torch.zeros((), device=env.device)  # non-finite steps since the last check
    first_bad = torch.full((), -1, dtype=torch.int64, device=env.device)

    def check_nonfinite(skipped: int) -> int:
        """Read the device-side count of non-finite steps (a sync point: log and checkpoint
        steps only); raise under on_nonfinite_loss=error."""
        n, first = int(bad.item()), int(first_bad.item())
        if n and t.on_nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"step {first}: the meta-loss was not finite ({n} such step(s) up to step {step}); no update was "
                f"applied for them. Last checkpoint: {last_ckpt or 'none'} (unchanged). Lower meta.inner_lr or "
                "optim.dense_lr, or set train.on_nonfinite_loss=skip")
        bad.zero_()
        first_bad.fill_(-1)
        return skipped + n

    for epoch in range(start_epoch, t.epochs):
        if step >= total_steps:
            break
        reader.set_epoch(epoch)
        fetch.new_epoch(reader)
        for batch, out in run_steps(model, cfg, grad_sync, dense_opt, fetch, total_steps - step, pipe, times):
            step += 1
            position = fetch.trained()
            # non-finite steps are counted on the device and read on log and checkpoint steps
            bad.add_(out.skipped.to(bad.dtype))
            first_bad = torch.where(out.skipped & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            tasks_run += batch.num_tasks * env.world_size
            tasks_total += batch.num_tasks * env.world_size
            tasks_since += batch.num_tasks * env.world_size
            rows_since += batch.num_rows * env.world_size

            want_ckpt = bool(t.checkpoint_every_steps) and step % t.checkpoint_every_steps == 0
            if want_ckpt or step % t.log_every == 0 or step == total_steps:
                skipped_nonfinite = check_nonfinite(skipped_nonfinite)
            if step % t.log_every == 0 or step == total_steps:
                # sync point: .item() and an all-reduce of the losses, on log steps only
                dt = time.perf_counter() - t_log
                due = env.is_main and t.checkpoint_every_minutes > 0 and \
                    time.perf_counter() - t_ckpt >= 60 * t.checkpoint_every_minutes
                stats = torch.stack([out.query_loss.mean().detach(), out.support_loss.mean().detach(),
                                     torch.tensor(fetch.since / dt, device=out.loss.device),
                                     torch.tensor(float(reader.skipped_tasks), device=out.loss.device),
                                     torch.tensor(times.share(), device=out.loss.device),
                                     torch.tensor(float(due), device=out.loss.device)])
                dist.all_reduce(stats)
                stats /= env.world_size
                want_ckpt |= stats[5].item() > 0  # rank 0's clock decides for all
                last = {"train/query_loss": stats[0].item(), "train/support_loss": stats[1].item(),
                        "train/tasks_per_s": tasks_since / dt, "train/rows_per_s": rows_since / dt,
                        "train/data_stall_share": stats[2].item(),
                        "train/skipped_bad_tasks": stats[3].item() * env.world_size,
                        "train/skipped_nonfinite_steps": float(skipped_nonfinite),
                        "train/comm_wait_share": stats[4].item(),
                        "train/epoch": float(epoch)}
                tracker.log_metrics(last, step=step)
                if env.is_main:
                    log.info("step %d/%d epoch %d query_loss %.4f support_loss %.4f %.0f tasks/s %.0f rows/s "
                             "data stall %.1f%% comm wait %.1f%%", step, total_steps, epoch,
                             last["train/query_loss"], last["train/support_loss"], last["train/tasks_per_s"],
                             last["train/rows_per_s"], 100 * last["train/data_stall_share"],
                             100 * last["train/comm_wait_share"])
                tasks_since = rows_since = 0
                fetch.since = 0.0
                t_log = time.perf_counter()
            if want_ckpt and step < total_steps:
                last_ckpt = save(checkpoint.step_dir(ckpt_root, step))
                if env.is_main:
                    checkpoint.prune(ckpt_root, t.keep_checkpoints)
                    log.info("checkpoint: %s", last_ckpt)
                t_ckpt = time.perf_counter()

    # share of the whole loop spent waiting for data (and the same without each epoch's
    # first batch, i.e. in steady state), averaged over ranks
    loop_s = max(time.perf_counter() - t_loop, 1e-9)
    steady = (fetch.total - fetch.first_total) / max(loop_s - fetch.first_total, 1e-9)
    stall = torch.tensor([fetch.total / loop_s, steady], device=env.device)
    dist.all_reduce(stall)
    stall /= env.world_size
    last["train/data_stall_share_total"] = stall[0].item()
    last["train/data_stall_share_steady"] = stall[1].item()
    last["train/tasks_per_s_total"] = tasks_run / loop_s  # the whole loop (this attempt), every rank's tasks
    last["train/comm_wait_share_total"] = times.share()
    tracker.log_metrics({k: last[k] for k in ("train/data_stall_share_total", "train/data_stall_share_steady",
                                              "train/tasks_per_s_total", "train/comm_wait_share_total")}, step=step)
    if env.is_main:
        log.info("data stall: %.2f%% of the training loop waited for data (%.2f%% after each epoch's first batch)",
                 100 * stall[0].item(), 100 * stall[1].item())

    # ---------------------------------------------------------------- checkpoint
    ckpt = save(out_dir / "checkpoint")
    if env.is_main and ckpt_root.is_dir():
        checkpoint.prune(ckpt_root, t.keep_checkpoints)
    dist.destroy_process_group()

    # ---------------------------------------------------------------- evaluate (rank 0)
    result: dict = {"checkpoint": str(ckpt), "steps": step, **last}
    if env.is_main:
        _finish_run(tracker, ckpt, cfg, out_dir, step, result)
        tracker.finish()
        tracker_box.clear()
        log.info("checkpoint: %s", ckpt)
        if tracker.run_id:
            log.info("mlflow run %s; to browse: %s", tracker.run_id, ui_command(uri))
    return result


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
                        system_metrics_s=cfg.tracking.system_metrics_s)


def _finish_run(tracker, ckpt: Path, cfg: Config, out_dir: Path, step: int, result: dict) -> None:
    """Rank 0 after training: learning curves, cold-start evaluation report, pyfunc model."""
    history = getattr(tracker, "history", {})
    curves = {k: v for k, v in history.items() if k in ("train/query_loss", "train/support_loss")}
    if curves:  # (matplotlib imported only to draw them)
        from gmeta import plots

        tracker.log_artifact(plots.learning_curves(curves, out_dir / "learning_curves.png",
                                                    cfg.model.objective), "plots")
    emodel = None
    if cfg.train.eval_at_end or (cfg.tracking.enabled and cfg.tracking.log_model):
        emodel, ecfg, _ = checkpoint.load_unsharded(ckpt)
    if cfg.train.eval_at_end:
        from gmeta.evaluate import evaluate, flat_metrics, format_table, log_report, write_report

        report = evaluate(emodel, ecfg, cfg.data.shards_dir, inner_steps=cfg.eval.inner_steps)
        report["checkpoint"] = str(ckpt)
        files = write_report(report, out_dir / "eval")
        log_report(tracker, report, files, step)
        log.info("cold-start evaluation:\n%s", format_table(report))
        result.update({f"eval/{k}": v for k, v in flat_metrics(report).items()})
    if cfg.tracking.enabled and cfg.tracking.log_model and tracker.run_id:
        from gmeta.serving import log_model

        t = time.perf_counter()
        uri = log_model(ckpt, ecfg, emodel)
        log.info("model logged as %s (mlflow.pyfunc.load_model) in %.1fs", uri, time.perf_counter() - t)
        result["model_uri"] = uri
