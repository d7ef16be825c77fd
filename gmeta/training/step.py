"""One optimizer step and the loop of steps: ``meta_step`` (the algorithm's objective on a
looked-up meta-batch), ``train_step`` (objective -> one backward -> fused table optimizer,
dense all-reduce, Adam; a non-finite loss updates nothing, agreed by every rank),
``run_steps`` (fetch -> step, with the pipeline's prefetch and dynamic sharding's pads),
and what the loop needs around them (the batch fetcher, stop requests agreed across ranks,
step timings). ``gmeta.training.run`` drives them.

One meta-batch (see docs/design.md)::

    lookup of support+query ids (one all-to-all)  ->  inner loop, local, autograd.grad only
    -> query loss -> ONE backward(): embedding grads -> fused optimizer on the owning shard,
                                      dense grads -> mean all-reduce -> Adam step
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from gmeta.config import Config
from gmeta.layout import layout_of
from gmeta.meta.algorithms import ALGORITHMS
from gmeta.meta.base import MetaOutput
from gmeta.meta.generator import add_cold_term, base_fixed_objective
from gmeta.models.dlrm import dense_autocast
from gmeta.parallel.dist import DenseGradSync
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.types import TaskBatch

log = logging.getLogger(__name__)


def meta_step(model, batch, cfg: Config, rows: torch.Tensor | None = None) -> MetaOutput:
    """Forward of one meta-batch on the (sharded) model; returns the loss to backward.
    ``rows``: the batch's looked-up embeddings when a pipeline already looked them up."""
    inner = model.module if hasattr(model, "module") else model
    m = cfg.meta
    layout = layout_of(batch, inner.pooling, m.size_buckets, inner.cell_widths)
    if rows is None:
        with record_function("## lookup ##"):
            rows = inner.lookup(layout)
    if inner.generator is not None:
        return generator_step(inner, rows, batch, layout, cfg)
    with dense_autocast(cfg, rows.device):
        out = ALGORITHMS[m.algorithm](inner, rows, batch, layout, cfg)
    out.loss = out.loss.float()
    return out


def generator_step(inner, rows: torch.Tensor, batch, layout, cfg: Config) -> MetaOutput:
    """``meta_step`` with an id generator (gmeta.meta.generator): new ids start from their
    generated rows; under base_fixed the tables get no gradient (their rows are constants;
    those of features only the generator reads learn with it) and the loss is the
    generator's own, else the cold-start term joins the meta-loss."""
    if inner.generator_only:
        rows = inner.fixed_rows(rows, layout)
    rows, new = inner.start_rows(rows, layout, every_id=cfg.generator.train_ids == "all")
    with dense_autocast(cfg, rows.device):
        if inner.generator_only:
            out = base_fixed_objective(inner, rows, new, batch, layout, cfg)
        else:
            out = add_cold_term(ALGORITHMS[cfg.meta.algorithm](inner, rows, batch, layout, cfg), inner, rows, new,
                                batch, layout, cfg)
    out.loss = out.loss.float()
    return out


class Fetcher:
    """Takes batches from the reader, timing how long the loop waits for them, and keeps
    each batch's reader token until that batch is trained (``trained`` commits it).

    ``pad``: under dynamic sharding with several ranks, a rank whose reader has run dry
    gets pad batches (``pad_batch``: one task, no ids, weighed 0) while other ranks still
    train; ``run_steps`` ends the epoch at the first step no rank had a real batch for."""

    def __init__(self, device: torch.device | None, pad: bool = False) -> None:
        self.device = device  # None: batches stay on the host (the pipeline copies them)
        self.pad = pad
        self.since = 0.0  # waited since the last log step
        self.total = 0.0  # waited in all
        self.first_total = 0.0  # waited for each epoch's first batch (reader workers starting)
        self.tokens: deque[object] = deque()  # per fetched batch not yet trained; None for a pad

    def new_epoch(self, reader) -> None:
        self.reader, self.batches, self.first = reader, iter(reader), True
        self.tokens.clear()

    def oldest_is_pad(self) -> bool:
        """Whether the oldest batch not yet trained (the one a step runs on) is a pad."""
        return self.tokens[0] is None

    def trained(self) -> None:
        """The oldest batch fetched and not yet trained is trained: the reader records it."""
        token = self.tokens.popleft()
        if token is not None:
            self.reader.commit(token)

    def dropped(self) -> None:
        """The oldest batch fetched was not trained (a pad step of no rank's data)."""
        self.tokens.popleft()

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
            if not self.pad:
                return None
            batch = self.reader.pad_batch()
            self.tokens.append(None)
        else:
            self.tokens.append(self.reader.take())
        return batch if self.device is None else batch.to(self.device, non_blocking=True)


class NonFiniteLossError(RuntimeError):
    """The meta-loss became NaN or infinite (train.on_nonfinite_loss=error)."""


class TrainingInterrupted(Exception):
    """Training stopped at a Ctrl-C: every rank after the same step, with a training
    checkpoint of that step (``checkpoint``), from which ``--resume auto`` goes on."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Ctrl-C (SIGINT) while training: stop every rank after the same step and checkpoint there.

    The signal only sets ``requested`` on the rank that got it; ``train_step`` folds it into
    the step's all-reduce, and ``agreed`` is then whether any rank asked (a device tensor;
    None in one process, where ``requested`` decides alone). A SIGINT that comes
    ``REPEAT_S`` or more after the first stops at once (KeyboardInterrupt, no checkpoint);
    one sooner is the same Ctrl-C delivered twice (to the process group, and forwarded by
    ``gmeta train``'s launcher). Reader workers, forked after ``install``, inherit the
    handler: a Ctrl-C does not end them under the trainer."""

    REPEAT_S = 2.0

    def __init__(self) -> None:
        self.requested = False
        self.agreed: torch.Tensor | None = None
        self._at = 0.0
        self._previous: object = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # (signal handlers live in the main thread)
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]  # what signal.signal returned
            self._installed = False

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._at = True, now
        elif now - self._at >= self.REPEAT_S:
            raise KeyboardInterrupt


@dataclass
class Agreed:
    """What the step's one all-reduce decided (see ``agree_across_ranks``)."""

    finite: torch.Tensor  # bool: the loss is finite on every rank, and some rank had data
    loss: torch.Tensor | None  # the global loss (None in one process)
    stop: torch.Tensor | None  # bool: some rank was asked to stop
    real: torch.Tensor | None  # bool: some rank had a real (not pad) batch
    counts: torch.Tensor | None  # the step's [tasks, rows] over all ranks


def agree_across_ranks(loss: torch.Tensor, terms: list[tuple[torch.Tensor, int]], stop: bool = False,
                       tasks: int = 0, rows: int = 0, pad: bool = False) -> Agreed:
    """One tiny all-reduce per step, never read back here (a host read would stall the GPU
    every step). ``terms``: what ``loss`` is the sum of, each a mean over ``count`` local
    units (``MetaOutput.terms``: tasks, rows); ``stop``: whether this rank was asked to stop;
    ``tasks``, ``rows``: this rank's batch; ``pad``: this rank's batch is a pad (its terms count 0).
    Agreed: whether the loss is finite on every rank and some rank had a real batch, a bool
    tensor on the loss's device; the sum of the terms, each times this rank's share of its
    global count, ``count * world / global count``; whether any rank was asked to stop and
    whether any had a real batch (bool device tensors), and the step's tasks and rows on all
    ranks (all None in one process). Gradients are then averaged over ranks as usual, and the step
    equals one process on the whole global batch even when ranks hold different numbers of
    rows (ERM) or tasks (dynamic sharding, adaptive batches), or none (a pad)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return Agreed(finite[0] > 0, None, None, None, None)
    world = dist.get_world_size()
    counts = [0 if pad else c for _, c in terms]
    # the counts and flags are host numbers: filled in on the device (a scalar argument of a
    # fill kernel), not copied from a Python list (a pageable copy, which synchronises the stream)
    flags = (stop, not pad, 0 if pad else tasks, 0 if pad else rows)
    both = torch.cat([finite, *(finite.new_full((1,), float(v)) for v in flags),
                      *(finite.new_full((1,), float(c)) for c in counts)])
    dist.all_reduce(both)  # [finite ranks, asked to stop, with data, tasks, rows, global count of each term]
    total = None
    for i, ((t, _), c) in enumerate(zip(terms, counts)):
        if pad:  # exactly 0, whatever the pad's loss
            t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
        part = t * (both[5 + i].clamp_min(1).reciprocal() * float(c * world))
        total = part if total is None else total + part
    real = both[2] > 0.5
    return Agreed((both[0] > world - 0.5) & real, total, both[1] > 0.5, real, both[3:5])


def _supports_skip(opt: torch.optim.Optimizer) -> bool:
    """A fused optimizer skips its step on the device when its ``found_inf`` is set."""
    return bool(opt.defaults.get("fused"))


def tables_skip_on_device(cfg: Config) -> bool:
    """Whether a zeroed lookup gradient leaves the tables and their optimizer state exactly
    as they were: true for fbgemm's SGD and (row-wise) Adagrad without weight decay. Not
    with ``optim.embedding_weight_decay`` (fbgemm adds wd x row to every looked-up row's
    gradient, zero or not) nor for Adam tables (a zero gradient still decays the moments
    and moves every looked-up row that has momentum)."""
    return not cfg.optim.embedding_weight_decay and cfg.optim.embedding_optimizer != "adam"


def train_step(model, batch, cfg: Config, grad_sync: DenseGradSync, dense_opt: torch.optim.Optimizer,
               rows: torch.Tensor | None = None, times: StepTimes | None = None,
               stop: StopRequest | None = None, pad: bool = False, clock=None) -> MetaOutput:
    """One optimizer step on one meta-batch: forward, ONE backward (dense all-reduces start
    from its gradient hooks), wait for them, step.

    A meta-loss that is not finite on some rank changes nothing on any. Where the tables
    allow it (``tables_skip_on_device``) no value is read back from the device: the gradient
    reaching the embedding lookup is zeroed on the device (the fused table update, inside
    backward, then leaves SGD and (row-wise) Adagrad tables and their state exactly as they
    were), and the fused dense optimizer is told to skip (``found_inf``). ``out.skipped`` is
    that flag, a device tensor the training loop reads on log steps. With table weight decay,
    Adam tables or a dense optimizer that is not fused the flag is read at once instead (one
    host sync per step) and backward is not run. ``stop``: this rank's Ctrl-C, agreed with
    the other ranks in the same all-reduce (``stop.agreed``). ``pad``: the batch is a pad
    (dynamic sharding, a rank with no data left): it weighs 0, and a step no rank had data
    for changes nothing (``out.real`` says so). ``clock``: a context timing the meta-step's
    local compute (``gmeta.parallel.adaptive``)."""
    inner = model.module if hasattr(model, "module") else model
    if rows is None:
        with record_function("## lookup ##"):
            rows = inner.lookup(layout_of(batch, inner.pooling, cfg.meta.size_buckets, inner.cell_widths))
    with clock if clock is not None else nullcontext():
        out = meta_step(model, batch, cfg, rows)
    agreed = agree_across_ranks(out.loss, out.terms or [(out.loss, batch.num_tasks)],
                                stop is not None and stop.requested, batch.num_tasks, batch.num_rows, pad)
    finite = agreed.finite
    if stop is not None:
        stop.agreed = agreed.stop
    if agreed.loss is not None:
        out.loss = agreed.loss
    out.skipped = ~finite
    out.real, out.global_counts = agreed.real, agreed.counts
    if not (_supports_skip(dense_opt) and tables_skip_on_device(cfg)):
        if not bool(finite):  # sync point: every rank reads the same agreed flag, none runs backward
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
    if cfg.optim.grad_clip_norm > 0:  # the same on every rank: gradients are averaged by now
        torch.nn.utils.clip_grad_norm_([p for g in dense_opt.param_groups for p in g["params"]],
                                       cfg.optim.grad_clip_norm, foreach=True)
    if _supports_skip(dense_opt):
        dense_opt.found_inf = out.skipped.to(torch.float32)  # type: ignore[attr-defined]  # read by a fused step
    dense_opt.step()
    dense_opt.zero_grad(set_to_none=True)
    return out


class AgreedStop:
    """Reads ``StopRequest.agreed`` on the host without stalling the device every step: on
    the CPU at once; on a GPU one step late, from a pinned copy whose event has completed by
    then (the host waits for the previous step at most, not for the one just queued). Every
    rank reads the same agreed values at the same steps, so all stop after the same one."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.float32, pin_memory=self.cuda)
        self.value = self.host.numpy()  # a view of the pinned copy: reading it is no device read
        self.event = torch.cuda.Event() if self.cuda else None
        self.queued = False

    def __call__(self, agreed: torch.Tensor) -> bool:
        """Take this step's agreed flag; returns whether to stop after this step."""
        if self.event is None:
            self.host.copy_(agreed)
            return bool(self.value > 0)
        stop = False
        if self.queued:
            self.event.synchronize()
            stop = bool(self.value > 0)
        self.host.copy_(agreed, non_blocking=True)
        self.event.record()
        self.queued = True
        return stop


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
              max_steps: int, pipe: SparseDistPipeline | None, times: StepTimes | None = None,
              stop: StopRequest | None = None, clock=None):
    """Train on batches from ``fetch()`` (None: no more) for at most ``max_steps`` steps,
    yielding (batch, output) after each. With ``pipe``, batch i+1 is fetched and its id
    all-to-all started before batch i computes. ``stop``, ``clock``: see ``train_step``."""
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
            if pipe:  # its ids now, so that its event (see SparseDistPipeline) is not behind the next batch's
                pipe.wait_ids(pending)
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
                rows = inner.lookup(layout_of(batch, inner.pooling, cfg.meta.size_buckets, inner.cell_widths))
        times.comm += time.perf_counter() - t0
        pad = getattr(fetch, "pad", False) and fetch.oldest_is_pad()
        out = train_step(model, batch, cfg, grad_sync, dense_opt, rows=rows, times=times, stop=stop, pad=pad,
                         clock=None if pad else clock)
        if pipe and pending is not None:  # this step is queued: collect the next batch's ids meanwhile
            pipe.wait_ids(pending)
        times.step += time.perf_counter() - t0
        # A rank out of data reads whether any rank still had some (a host read, at the
        # epoch's end only); when none had, every rank is here, the step changed nothing
        # (``train_step``) and the epoch ends on every rank alike.
        if pad and out.real is not None and not bool(out.real):
            fetch.dropped()
            return
        done += 1
        yield batch, out

