"""Streaming task shards into meta-batches, in background workers, resumable.

``TaskReader`` is the iterator the trainer uses. Each epoch it plans (``gmeta.io.plan``)
which (rank, worker) slot reads which units and in what order, starts a torch DataLoader
whose workers each stream their units (Parquet row groups or WebDataset tars), check them,
and collate meta-batches in the background, and yields exactly ``len(reader)`` batches on
every rank. ``state_dict()`` records how many batches of each worker the trainer consumed;
after ``load_state_dict()`` the next iteration yields exactly the tasks not yet consumed,
each once.

Before the first epoch, each rank checks the sha256 of its share of the split's local shard
files (every ``world_size``-th file) against the manifest; a remote file is hashed only when
reading it fails. A file that cannot be read is one error line naming the file, the row
group and what to do, also from inside a DataLoader worker.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gmeta.io import formats
from gmeta.io.block import ShardError, TaskBlock, check_block, concat_blocks
from gmeta.io.collate import collate_packed
from gmeta.io.manifest import load_manifest
from gmeta.io.plan import EpochPlan, Unit, plan_epoch, units_from_manifest
from gmeta.storage import is_url, location

log = logging.getLogger(__name__)

__all__ = ["ShardError", "TaskReader"]


_PREPARE_AGAIN = "run `gmeta prepare` again to rewrite the shards (data.shards_dir)"


def load_unit(root: Path, unit: Unit, schema: dict, fmt: str, on_bad_task: str, sha256: str | None = None) -> TaskBlock:
    """Read one unit from disk into a checked TaskBlock. Errors name the file and unit; a file
    that cannot be read is checked against its manifest ``sha256``, to tell a damaged or
    replaced file from one gmeta cannot read."""
    try:
        block, where = formats.read_unit(fmt, root / unit.path, unit.index, schema)
    except ShardError as e:
        msg = " ".join(str(e).split())  # one line, whatever the library's message held
        changed = _sha256_mismatch(root / unit.path, sha256) if sha256 else None
        if changed:
            raise ShardError(f"{msg}; {changed}: the file was damaged or replaced after `gmeta prepare`; "
                             f"{_PREPARE_AGAIN}") from None
        raise ShardError(f"{msg}; {_PREPARE_AGAIN}") from None
    if block.num_tasks != unit.tasks:
        raise ShardError(f"{where}: {block.num_tasks} tasks, manifest says {unit.tasks}")
    return check_block(block, schema, on_bad_task)


def file_sha256(path) -> str:
    """sha256 of a shard file (local or remote), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with location(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# files this process has found to match the manifest, by (path, size, mtime): evaluation
# builds a reader at every validation, and an unchanged file need not be hashed again
_VERIFIED: set[tuple[str, int, int]] = set()


def _sha256_mismatch(path, want: str) -> str | None:
    """None when the file's sha256 is ``want``, else what differs (for an error message)."""
    try:
        got = file_sha256(path)
    except FileNotFoundError:
        return None  # the read error already says it is missing
    except OSError as e:
        return f"{path}: cannot be hashed ({e})"
    if got != want:
        return f"{path}: sha256 {got} differs from the manifest's {want}"
    return None


def verify_shards(root: Path, files: list[dict], rank: int = 0, world_size: int = 1) -> None:
    """Check the sha256 of this rank's share (every ``world_size``-th) of the local shard
    ``files`` (manifest entries) against the manifest; raise ShardError naming the first that
    differs. Files are hashed in threads (hashlib releases the GIL): about one read of the
    share at disk or page-cache speed. Remote files are skipped here (hashing one means
    downloading it whole): they are checked when reading them fails."""
    todo = []
    for f in files[rank::world_size]:
        path = root / f["path"]
        if not f.get("sha256") or is_url(path):
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ShardError(f"{path}: task shard listed in the manifest is missing; {_PREPARE_AGAIN}") from None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            todo.append((path, f["sha256"], key))
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1, 8)) as pool:
        found = list(pool.map(lambda t: _sha256_mismatch(t[0], t[1]), todo))
    for (_, _, key), changed in zip(todo, found):
        if changed:
            raise ShardError(f"{changed}: the file was damaged or replaced after `gmeta prepare`; {_PREPARE_AGAIN}")
        _VERIFIED.add(key)


def task_keys(shards_dir: str | Path, split: str, partitions: str = "") -> dict[int, object]:
    """task_id -> task_key of every task of a split (batches carry only the ids)."""
    root = location(shards_dir)
    manifest = load_manifest(root, partitions)
    if split not in manifest["splits"]:
        raise ShardError(f"{root / 'manifest.json'}: no split {split!r}")
    out: dict[int, object] = {}
    for f in manifest["splits"][split]["files"]:
        pairs = formats.read_task_keys(manifest.get("format", "parquet"), root / f["path"])
        out.update((int(i), k) for k, i in pairs)
    return out


_LOOKAHEAD_BATCHES = 32


@dataclass(frozen=True)
class FailedRead:
    """A worker's ShardError, passed to the main process as an item: raised in a worker, it
    would reach the trainer wrapped in the DataLoader's text of the worker's traceback."""

    message: str


class _EpochStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker streams its own slot of the plan.

    Yields (worker, batch index in that worker, tasks skipped as bad, PackedBatch).
    """

    def __init__(self, root: Path, units: list[Unit], schema: dict, fmt: str, plan: EpochPlan, rank: int,
                 tasks_per_batch: int, start: list[int], on_bad_task: str, rotate: int, size_buckets: int,
                 sha256: dict[str, str] | None = None) -> None:
        self.root, self.units, self.schema, self.fmt = root, units, schema, fmt
        self.sha256 = sha256 or {}
        self.size_buckets = size_buckets
        self.plan, self.rank, self.n = plan, rank, tasks_per_batch
        self.start, self.on_bad_task, self.rotate = start, on_bad_task, rotate

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        workers = len(self.plan.orders[self.rank])
        # The DataLoader asks its workers in turn, starting with worker 0; after a resume the
        # slot that was next in turn is given to worker 0 so batches keep their order.
        slots = [(w + self.rotate) % workers] if info is not None else list(range(workers))
        try:
            for slot in slots:  # without worker processes, one process reads every slot in turn
                yield from self._slot(slot)
        except ShardError as e:
            yield FailedRead(str(e))

    def _slot(self, w: int):
        order = self.plan.orders[self.rank][w]
        nb = self.plan.batches[self.rank][w]
        first = self.start[w]
        if first >= nb:
            return
        window = Window(self.root, self.units, self.schema, self.fmt, self.on_bad_task, self.sha256)
        window.remaining[:] = np.bincount(order[first * self.n: nb * self.n, 0], minlength=len(self.units))
        for b in range(first, nb):
            refs = order[b * self.n: (b + 1) * self.n]
            if not window.holds(refs):
                # also load what the next few batches need: fewer window rebuilds
                window.load(order[b * self.n: min(b + _LOOKAHEAD_BATCHES, nb) * self.n, 0])
            skipped, packed = window.batch(refs, self.size_buckets)
            yield w, b, skipped, packed


class Window:
    """The units one reading process holds for tasks still to come, kept concatenated in
    one block (rebuilt only when a unit is added), so that a batch is one gather per field
    however many units its tasks come from. ``remaining[u]``: tasks of unit ``u`` this
    process is still to emit; a unit with none left is dropped at the next load (memory is
    bounded by the shuffle buffer)."""

    def __init__(self, root: Path, units: list[Unit], schema: dict, fmt: str, on_bad_task: str,
                 sha256: dict[str, str]) -> None:
        self.root, self.units, self.schema, self.fmt = root, units, schema, fmt
        self.on_bad_task, self.sha256 = on_bad_task, sha256
        self.remaining = np.zeros(len(units), dtype=np.int64)
        self.loaded: dict[int, TaskBlock] = {}
        self.block: TaskBlock | None = None
        self.base = np.full(len(units), -1, dtype=np.int64)  # first task of each unit in the block

    def holds(self, refs: np.ndarray) -> bool:
        return all(u in self.loaded for u in refs[:, 0].tolist())

    def load(self, unit_ids) -> None:
        """Load the units of ``unit_ids`` not loaded yet (dropping those with no task left)."""
        new = [u for u in dict.fromkeys(np.asarray(unit_ids).tolist()) if u not in self.loaded]
        if not new:
            return
        for u in [u for u in self.loaded if self.remaining[u] == 0]:
            del self.loaded[u]
        for u in new:
            unit = self.units[u]
            self.loaded[u] = load_unit(self.root, unit, self.schema, self.fmt, self.on_bad_task,
                                       self.sha256.get(unit.path))
        self.block = concat_blocks(list(self.loaded.values()))
        self.base[:] = -1
        self.base[list(self.loaded)] = np.cumsum([0] + [blk.num_tasks for blk in self.loaded.values()])[:-1]

    def batch(self, refs: np.ndarray, size_buckets: int):
        """(tasks skipped as bad, PackedBatch) of the tasks ``refs`` ([n, 2] unit, task index),
        all of loaded units."""
        assert self.block is not None  # loaded before the first batch
        idx = self.base[refs[:, 0]] + refs[:, 1]
        np.subtract.at(self.remaining, refs[:, 0], 1)
        skipped = 0
        if self.block.bad:
            keep = ~np.isin(idx, np.array([t for t, _ in self.block.bad]))
            skipped = int((~keep).sum())
            idx = idx[keep]
        if not len(idx):
            raise ShardError(f"{self.root}: every task of a meta-batch was bad (data.on_bad_task=skip)")
        return skipped, collate_packed([(self.block, idx)], self.schema, size_buckets)


class TaskReader:
    """Meta-batches of one split of a shard directory, for one rank.

    Args:
        shards_dir: output of ``gmeta prepare`` (holds manifest.json).
        split: "train" or "eval".
        tasks_per_batch: N tasks per meta-batch.
        rank, world_size: this process and how many read the split together.
        num_workers: DataLoader worker processes per rank (0: read in this process).
        seed: base of the per-epoch unit permutation and shuffle buffers.
        shuffle: shuffle units and tasks (False: manifest order, for evaluation).
        shuffle_buffer: tasks in each worker's shuffle buffer.
        drop_last: every rank yields the same number of full batches (training); False
            yields every task, the last batch of each worker possibly short (evaluation).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: pin batches (when training on GPU).
        on_bad_task: "error" (default) or "skip" (skipped tasks are counted).
        max_tasks: read only the first max_tasks tasks of each epoch's order (0: all).
        size_buckets: the size buckets of each batch's ``BatchLayout`` (meta.size_buckets),
            computed in the workers with the rest of the batch.
        verify: check the sha256 of this rank's share of the local shard files against the
            manifest before reading (see :func:`verify_shards`).
        partitions: the partitions of a partitioned data set to read (``data.partitions``).
    """

    def __init__(self, shards_dir: str | Path, split: str, tasks_per_batch: int, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1024, drop_last: bool = True, prefetch_factor: int = 4,
                 pin_memory: bool = False, on_bad_task: str = "error", max_tasks: int = 0,
                 size_buckets: int = 1, verify: bool = True, partitions: str = "") -> None:
        self.root = location(shards_dir)
        self.manifest = load_manifest(self.root, partitions)
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.root / 'manifest.json'}: no split {split!r}")
        self.schema = self.manifest["schema"]
        self.format = self.manifest.get("format", "parquet")
        self.units = units_from_manifest(self.manifest, split)
        self.max_tasks = max_tasks
        self.split = split
        self.tasks_per_batch = tasks_per_batch
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.drop_last, self.prefetch_factor, self.pin_memory = drop_last, prefetch_factor, pin_memory
        self.on_bad_task = on_bad_task
        self.size_buckets = size_buckets
        files = self.manifest["splits"][split]["files"]
        self._sha256 = {f["path"]: f["sha256"] for f in files if f.get("sha256")}
        if verify:
            verify_shards(self.root, files, rank, world_size)
        total = sum(u.tasks for u in self.units)
        self.num_tasks = min(total, max_tasks) if max_tasks else total
        self.epoch = 0
        self._consumed = [0] * max(1, num_workers)  # batches of each worker the trainer has taken
        self._steps_done = 0
        self.skipped_tasks = 0
        self.dropped_tasks_total = 0  # over the epochs this reader has started
        self._logged_epoch = -1
        self._plan = self._make_plan()
        self.committed = TaskReader.state_dict(self)  # (the static position: a subclass keeps its own)
        if self._plan.steps == 0:
            raise ShardError(
                f"{self.root}: split {split!r} has {self.num_tasks} tasks, too few for {world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s) x {tasks_per_batch} tasks per batch (meta.tasks_per_batch)")

    def _make_plan(self) -> EpochPlan:
        return plan_epoch(self.units, world_size=self.world_size, num_workers=self.num_workers,
                          tasks_per_batch=self.tasks_per_batch, seed=self.seed, epoch=self.epoch,
                          shuffle=self.shuffle, buffer_size=self.shuffle_buffer, drop_last=self.drop_last,
                          max_tasks=self.max_tasks)

    def __len__(self) -> int:
        """Meta-batches per epoch on this rank (the same on every rank when drop_last)."""
        return self._plan.steps if self.drop_last else sum(self._plan.batches[self.rank])

    @property
    def dropped_tasks(self) -> int:
        """Tasks of this epoch in no batch (tails too short for a batch on every rank)."""
        return self._plan.dropped_tasks

    def _log_dropped(self) -> None:
        """Once per epoch: how many tasks fill no meta-batch. Each of the world_size x
        num_workers slots reads an equal share and yields only full batches, and every rank
        the same number of them, so up to world_size x workers x (N-1) tasks (and more when
        shares differ between ranks) are left out. Logged by rank 0, for all ranks."""
        if self._logged_epoch == self.epoch:
            return
        self._logged_epoch = self.epoch
        dropped = self.dropped_tasks
        self.dropped_tasks_total += dropped
        if self.rank == 0 and self.drop_last:
            log.info("epoch %d: %d of %d tasks of split %r fill no meta-batch and are left out (%d rank(s) x %d "
                     "reader worker(s), %d tasks per batch)", self.epoch, dropped, self.num_tasks, self.split,
                     self.world_size, max(1, self.num_workers), self.tasks_per_batch)

    sharding = "static"

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._plan = self._make_plan()
            self._consumed = [0] * max(1, self.num_workers)
            self._steps_done = 0
            self.committed = self.state_dict()

    def take(self) -> Any:
        """The token of the batch just yielded, for ``commit``: the position after it."""
        return self.state_dict()

    def commit(self, token: Any) -> None:
        """The batch of ``token`` is trained: ``committed`` (what a checkpoint keeps) is the
        position after it. (With the pipeline the batch fetched ahead is not counted.)"""
        self.committed = token

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": list(self._consumed), "steps_done": self._steps_done,
                "skipped_tasks": self.skipped_tasks, "seed": self.seed, "world_size": self.world_size,
                "num_workers": self.num_workers, "tasks_per_batch": self.tasks_per_batch, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "num_workers", "tasks_per_batch", "split"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"reader state was saved with {key}={state.get(key)!r}, this reader has "
                                 f"{getattr(self, key)!r}: resuming exactly needs the same value")
        self.set_epoch(int(state["epoch"]))
        self._consumed = [int(c) for c in state["consumed"]]
        self._steps_done = int(state["steps_done"])
        self.skipped_tasks = int(state.get("skipped_tasks", 0))
        self.committed = self.state_dict()

    def __iter__(self):
        """Yield the rest of the current epoch; the next call starts the next epoch's
        position only after ``set_epoch``."""
        total = len(self)
        if self._steps_done >= total:
            return
        self._log_dropped()
        c = self._consumed
        rotate = next((w for w in range(len(c)) if c[w] < c[0]), 0)  # next slot in round-robin turn
        stream = _EpochStream(self.root, self.units, self.schema, self.format, self._plan, self.rank,
                              self.tasks_per_batch, list(c), self.on_bad_task, rotate, self.size_buckets,
                              self._sha256)
        items = self._read(stream)
        try:
            while self._steps_done < total:
                w, b, skipped, packed = next(items)
                batch = packed.unpack()
                self._consumed[w] = b + 1
                self._steps_done += 1
                self.skipped_tasks += skipped
                yield batch
        finally:
            items.close()

    def _read(self, stream: IterableDataset):
        """The items of ``stream``, read in this reader's DataLoader workers; a worker's
        ShardError (a ``FailedRead`` item) is raised here."""
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            pin_memory=self.pin_memory and torch.cuda.is_available(),
                            collate_fn=_identity, persistent_workers=False, worker_init_fn=_worker_init)
        if self.num_workers:
            # The workers are forked: garbage of this process left for a later collection
            # (a cycle holding a destroyed gloo process group, from a model trained earlier in
            # the same process) would be collected in a worker, whose copy has none of the
            # threads its destructor waits for. A worker hung so, and the reader with it, in a
            # warm-up table's evaluation. Collect it here, where its destructors can run.
            gc.collect()
        it = iter(loader)
        try:
            for item in it:
                if isinstance(item, FailedRead):
                    raise ShardError(item.message)
                yield item
        finally:
            del it  # stops the workers when the trainer leaves the epoch early


def _identity(x):
    return x


def _worker_init(worker_id: int) -> None:
    """A reader worker: ends with its parent (``_die_with_parent``) and never collects the
    objects it inherited from it (``gc.freeze``): their destructors belong to the parent."""
    gc.freeze()
    _die_with_parent(worker_id)


def _die_with_parent(worker_id: int) -> None:
    """Reader workers end when their training process dies, however it dies.

    A DataLoader worker whose parent is SIGKILLed notices it, but then blocks forever at
    exit flushing its result queue into a pipe nobody reads: an orphan per worker after
    every killed rank. On Linux the kernel's parent-death signal ends it instead."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the signal was armed
        os._exit(0)

