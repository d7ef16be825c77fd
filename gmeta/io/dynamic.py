"""Dynamic data sharding: an epoch's tasks handed out as work from a queue on the job's
c10d store, taken by each reading process as it consumes them (``data.sharding: dynamic``).

The static plan (``gmeta.io.plan``) gives every rank an equal, fixed share of the epoch:
one slow rank then sets the pace of all, and a job resumed at another world size must start
its epoch again. Here the epoch's *items* (one per unit: a Parquet row group or a tar, in the
epoch's permuted order, the last few cut to one meta-batch each so that ranks run dry
together) are one list every rank computes alike, and an item is claimed by adding 1 to a
counter in the store torch.distributed already runs (``TCPStore.add`` is atomic): the value
names the item, so every item goes to exactly one reading process, whichever asks first.
Each process keeps a shuffle buffer of the tasks of the items it has claimed and draws its
meta-batches from it at random.

What is *trained* is recorded per task (``Trained``): every rank's record goes into each
training checkpoint, merged over ranks, and a resumed job (at any world size) hands out only
the epoch's tasks no checkpointed step trained, each once: those of items claimed but not
trained when the job died come back as work.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gmeta.io.block import ShardError
from gmeta.io.plan import EpochPlan, Unit, epoch_stream
from gmeta.io.reader import FailedRead, TaskReader, Window

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 300


class Trained:
    """Which tasks of one epoch have been trained: a boolean mask per unit touched."""

    def __init__(self, units: list[Unit]) -> None:
        self.units = units
        self.masks: dict[int, np.ndarray] = {}

    def add(self, refs: np.ndarray) -> None:
        """Mark the tasks ``refs`` ([n, 2] unit, task index) trained."""
        for u in np.unique(refs[:, 0]).tolist():
            m = self.masks.get(u)
            if m is None:
                m = self.masks[u] = np.zeros(self.units[u].tasks, dtype=bool)
            m[refs[refs[:, 0] == u, 1]] = True

    def count(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def to_dict(self) -> dict:
        """JSON-able: units whose every task is trained, and the trained tasks of the others."""
        done = [u for u, m in self.masks.items() if m.all()]
        part = {str(u): np.flatnonzero(m).tolist() for u, m in self.masks.items() if not m.all() and m.any()}
        return {"done": sorted(done), "partial": part}

    def update(self, state: dict) -> None:
        """Add the tasks of a ``to_dict()`` (this epoch's, of another rank or checkpoint)."""
        for u in state.get("done", []):
            self.masks[int(u)] = np.ones(self.units[int(u)].tasks, dtype=bool)
        for u, idx in state.get("partial", {}).items():
            self.add(np.stack([np.full(len(idx), int(u)), np.asarray(idx, dtype=np.int64)], axis=1)
                     if idx else np.zeros((0, 2), dtype=np.int64))

    def has(self, refs: np.ndarray) -> np.ndarray:
        out = np.zeros(len(refs), dtype=bool)
        for u, m in self.masks.items():
            sel = refs[:, 0] == u
            out[sel] = m[refs[sel, 1]]
        return out


def epoch_items(units: list[Unit], *, seed: int, epoch: int, shuffle: bool, max_tasks: int, tasks_per_batch: int,
                slots: int, trained: Trained | None = None) -> list[np.ndarray]:
    """The epoch's work items, in hand-out order: each an [n, 2] array of (unit, task index).
    One item per unit (its tasks not trained yet), in the epoch's unit order; the last
    ``slots`` items are cut into pieces of one meta-batch, so that the ranks' last batches
    come out about together. The same on every rank: depends only on the manifest, the
    seed, the epoch and ``trained`` (the merged record of a checkpoint)."""
    stream = epoch_stream(units, seed, epoch, shuffle)
    if max_tasks:
        stream = stream[:max_tasks]
    if trained is not None and trained.masks:
        stream = stream[~trained.has(stream)]
    if not len(stream):
        return []
    cuts = np.flatnonzero(np.diff(stream[:, 0])) + 1  # where the unit changes
    items = np.split(stream, cuts)
    tail = items[-slots:] if slots else []
    items = items[:len(items) - len(tail)]
    for it in tail:
        items += np.array_split(it, max(1, math.ceil(len(it) / tasks_per_batch)))
    return items


@dataclass(frozen=True)
class ClaimQueue:
    """A counter in the job's TCPStore: ``claim()`` in any process of any rank returns the
    next item's index, or None once all ``size`` items are taken."""

    host: str
    port: int
    key: str
    size: int

    @classmethod
    def on_default_store(cls, key: str, size: int) -> tuple[ClaimQueue, object]:
        """The queue on the store of the default process group (torchrun's, or that of a
        one-process group), which reader workers reach as clients of its host and port;
        without a process group (a reader used on its own), on a store of this process.
        Returns it and what must live while it is used (the store, when made here)."""
        if not dist.is_initialized():
            own = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=STORE_TIMEOUT_S))
            return cls(own.host, own.port, key, size), own
        store = dist.distributed_c10d._get_default_store()
        while isinstance(store, dist.PrefixStore):
            store = store.underlying_store
        if not isinstance(store, dist.TCPStore):
            raise RuntimeError(f"data.sharding=dynamic needs the process group on a TCP store (torchrun, or "
                               f"init_method tcp:// or env://), not a {type(store).__name__}")
        return cls(store.host, store.port, key, size), store

    def connect(self):
        """A claim function for this process (a store client of its own: a reader worker
        must not share its parent's connection)."""
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))

        def claim() -> int | None:
            i = int(store.add(self.key, 1)) - 1
            return i if i < self.size else None

        return claim


def new_nonce() -> str:
    """A name for this start of the job's queues, the same on every rank (from rank 0)."""
    box = [uuid.uuid4().hex[:12]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


class SizeSchedule:
    """This rank's meta-batch size at each step of the epoch, decided by the trainer
    (``gmeta.parallel.adaptive``) and read by the reader's workers, in shared memory (the
    workers are forked from the rank, and a batch is made steps before it is trained).

    A size decided after step ``s`` takes effect at step ``s + lag``; a worker making the
    batch of step ``t`` first waits until the trainer has finished step ``t - lag``, so no
    decision can still change it (``lag`` is at least the batches in flight, so that in
    steady state nobody waits). The last ``lag + 2`` decisions are kept in a ring of
    (effective step, size) rows; the size is written before the step, the order a reader
    of the two reads them."""

    def __init__(self, size: int, lag: int) -> None:
        self.lag, self.current = lag, size
        self.ring = torch.full((lag + 2, 2), -1, dtype=torch.int64).share_memory_()
        self.done = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.decisions = 0
        self.reset()

    def reset(self) -> None:
        """A new epoch (before its workers start): the current size from its first step."""
        self.ring.fill_(-1)
        self.ring[0, 1] = self.current
        self.ring[0, 0] = 0
        self.decisions = 1
        self.done[0] = 0

    def decide(self, from_step: int, size: int) -> None:
        """Trainer: this rank's size from ``from_step`` (at least ``done + lag``) on."""
        row = self.ring[self.decisions % len(self.ring)]
        row[1] = size
        row[0] = from_step
        self.decisions += 1
        self.current = size

    def step_done(self, step: int) -> None:
        """Trainer: step ``step`` of the epoch (counted from 1) is trained."""
        self.done[0] = step

    def size_at(self, t: int) -> int:
        """Worker: the size of the batch of step ``t`` of the epoch (counted from 0)."""
        while t - self.lag > int(self.done[0]):  # (a worker that ran ahead; not in steady state)
            time.sleep(0.001)
        ring = self.ring.clone()
        live = (ring[:, 0] >= 0) & (ring[:, 0] <= t)
        return int(ring[live][ring[live][:, 0].argmax(), 1])


class _DynamicStream(IterableDataset):
    """One rank's reading of an epoch under dynamic sharding; each DataLoader worker claims
    items from the queue, keeps their tasks in a shuffle buffer of ``buffer_tasks`` and
    yields (worker, batch index, tasks skipped as bad, PackedBatch, refs) until the queue is
    empty and its buffer drained (its last batch possibly short)."""

    def __init__(self, window_args: tuple, items: list[np.ndarray], queue: ClaimQueue, tasks_per_batch: int,
                 buffer_tasks: int, seed: tuple, size_buckets: int, sizes: SizeSchedule | None = None) -> None:
        self.window_args, self.items, self.queue = window_args, items, queue
        self.n, self.buffer_tasks, self.seed, self.size_buckets = tasks_per_batch, buffer_tasks, seed, size_buckets
        self.sizes = sizes

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        try:
            claim = self.queue.connect()
            rng = np.random.default_rng([*self.seed, w])
            window = Window(*self.window_args)
            buf = np.zeros((0, 2), dtype=np.int64)
            exhausted, b = False, 0
            while True:
                # the DataLoader takes its workers' batches in turn: this one is step b * workers + w
                n = self.sizes.size_at(b * workers + w) if self.sizes is not None else self.n
                # the buffer holds as many of this rank's steps as an equal share's buffer would:
                # ranks with smaller shares then run dry about when the others do
                want = max(n, self.buffer_tasks * n // self.n)
                got = []
                while not exhausted and len(buf) + sum(map(len, got)) < want:
                    i = claim()
                    if i is None:
                        exhausted = True
                    else:
                        got.append(self.items[i])
                if got:
                    new = np.concatenate(got)
                    np.add.at(window.remaining, new[:, 0], 1)
                    window.load(new[:, 0])
                    buf = np.concatenate([buf, new])
                if not len(buf):
                    return
                pick = rng.choice(len(buf), size=min(n, len(buf)), replace=False)
                refs = buf[pick]
                buf = np.delete(buf, pick, axis=0)
                skipped, packed = window.batch(refs, self.size_buckets)
                yield w, b, skipped, packed, refs
                b += 1
        except ShardError as e:
            yield FailedRead(str(e))


class DynamicTaskReader(TaskReader):
    """Meta-batches of one split for one rank under dynamic sharding: the trainer's
    interface of ``TaskReader``, same arguments (less ``drop_last``: no task is left out).

    A rank's iteration ends when the queue is empty and its workers' buffers are drained;
    the trainer then pads (see ``gmeta.training.step``) until every rank is done. ``take()`` after
    each batch and ``commit(token)`` once that batch is trained keep the record of trained
    tasks that checkpoints hold (``queue_state``). ``len()`` is an estimate, the epoch's
    tasks over the global batch: how many steps a rank makes depends on how fast it takes
    work. The queue is named by ``nonce`` (``new_nonce``: one per start of the job)."""

    sharding = "dynamic"

    def __init__(self, shards_dir, split: str, tasks_per_batch: int, *, nonce: str, **kwargs) -> None:
        self.nonce = nonce
        self._round = 0
        self._last_refs: np.ndarray | None = None
        self._pad = None
        self._items_made = 0
        self._read_epoch: tuple[int, int] | None = None
        self.sizes: SizeSchedule | None = None  # per-step sizes (train.adaptive_batch), set by the trainer
        self.steps_done = 0
        super().__init__(shards_dir, split, tasks_per_batch, **kwargs)
        self.prior = Trained(self.units)  # trained before this start of the job (a checkpoint's record)
        self.mine = Trained(self.units)  # trained by this rank since
        self._items = self._make_items()

    def _make_plan(self) -> EpochPlan:
        """No fixed plan: only the step estimate (the base class checks there is one)."""
        steps = math.ceil(self.num_tasks / (self.world_size * self.tasks_per_batch)) if self.num_tasks else 0
        return EpochPlan([], [], steps, 0)

    def _make_items(self) -> list[np.ndarray]:
        self._items_made += 1
        return epoch_items(self.units, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                           max_tasks=self.max_tasks, tasks_per_batch=self.tasks_per_batch,
                           slots=self.world_size * max(1, self.num_workers), trained=self.prior)

    def __len__(self) -> int:
        return self._plan.steps

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.prior, self.mine = Trained(self.units), Trained(self.units)
            self.steps_done = 0
            self._items = self._make_items()

    # ------------------------------------------------------------- the trained record
    def take(self) -> Any:
        """The token of the batch just yielded (its tasks), for ``commit``."""
        assert self._last_refs is not None
        return self._last_refs

    def commit(self, token: Any) -> None:
        """The batch of ``token`` is trained (an optimizer step that a checkpoint keeps)."""
        self.mine.add(token)
        self.steps_done += 1

    def state_dict(self) -> dict:
        """This rank's part (``queue_state`` merges every rank's for a checkpoint)."""
        return {"sharding": "dynamic", "epoch": self.epoch, "steps_done": self.steps_done,
                "skipped_tasks": self.skipped_tasks, "trained": self.mine.to_dict(), "seed": self.seed,
                "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        raise ValueError("a dynamic reader resumes from the checkpoint's data queue (load_queue_state), "
                         "not from one rank's position")

    def queue_state(self) -> dict:
        """Collective: every task of this epoch trained on any rank (or before this start),
        the same dict on every rank; what a checkpoint keeps as the data queue's state."""
        merged = Trained(self.units)
        merged.masks = {u: m.copy() for u, m in self.prior.masks.items()}
        mine = self.mine.to_dict()
        every: list = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        for s in every:
            merged.update(s)
        return {"epoch": self.epoch, "trained_tasks": merged.count(), "epoch_tasks": self.num_tasks,
                "seed": self.seed, "max_tasks": self.max_tasks, "split": self.split, **merged.to_dict()}

    def load_queue_state(self, state: dict) -> None:
        """Go on with the epoch of a checkpoint's ``queue_state``: only its untrained tasks
        are handed out, at any world size."""
        for key in ("seed", "max_tasks", "split"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the data queue was saved with {key}={state.get(key)!r}, this reader has "
                                 f"{getattr(self, key)!r}: resuming exactly needs the same value")
        self.epoch = int(state["epoch"])
        self.prior, self.mine = Trained(self.units), Trained(self.units)
        self.prior.update(state)
        self.steps_done = 0
        self._items = self._make_items()

    # ------------------------------------------------------------- reading
    def __iter__(self):
        """This rank's batches of the epoch, until the queue is empty and its buffers drained.
        Once per epoch (its items are handed out once): again only after ``set_epoch`` or
        ``load_queue_state``."""
        if self._read_epoch == (self.epoch, self._items_made):
            raise RuntimeError(f"epoch {self.epoch} was read already: a dynamic reader hands out an epoch once")
        self._read_epoch = (self.epoch, self._items_made)
        self._round += 1
        queue, store = ClaimQueue.on_default_store(f"gmeta/data/{self.nonce}/{self.epoch}/{self._round}/next",
                                                   len(self._items))
        workers = max(1, self.num_workers)
        if self.sizes is not None:
            self.sizes.reset()
        # each worker's shuffle buffer (its share of data.shuffle_buffer), at most a quarter of
        # its share of the epoch: a worker that starts first must not claim the whole epoch
        # (for an equal share: a rank's batch size scales it, see _DynamicStream)
        fair = sum(map(len, self._items)) // (4 * self.world_size * workers)
        n = self.tasks_per_batch
        buffer_tasks = max(n, min(self.shuffle_buffer // workers, max(2 * n, fair)))
        stream = _DynamicStream((self.root, self.units, self.schema, self.format, self.on_bad_task, self._sha256),
                                self._items, queue, self.tasks_per_batch, buffer_tasks,
                                (self.seed, self.epoch, 2, self._round, self.rank), self.size_buckets, self.sizes)
        items = self._read(stream)
        try:
            for _, _, skipped, packed, refs in items:
                self.skipped_tasks += skipped
                self._last_refs = refs
                yield packed.unpack()
        finally:
            items.close()
            del store  # (the queue's, when made here: it lives while the epoch is read)

    def pad_batch(self):
        """A batch for a step this rank has no data for (see ``gmeta.training.step``): one task of
        the split, without its ids (it looks up no table row, so no table nor optimizer
        state is touched), which the step weighs 0."""
        if self._pad is None:
            window = Window(self.root, self.units, self.schema, self.format, self.on_bad_task, self._sha256)
            u = next(i for i, unit in enumerate(self.units) if unit.tasks)
            refs = np.array([[u, 0]], dtype=np.int64)
            window.remaining[u] = 1
            window.load(refs[:, 0])
            batch = window.batch(refs, self.size_buckets)[1].unpack()
            kjt = batch.sparse
            weights = kjt.weights_or_none()
            batch.sparse = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values()[:0],
                                             lengths=torch.zeros_like(kjt.lengths()),
                                             weights=None if weights is None else weights[:0])
            batch.layout = None  # built for the ids it had
            self._pad = batch
        return self._pad
