"""Which process reads which task, in which order: pure index arithmetic on the manifest.

A *unit* is the smallest piece of a shard read at once (a Parquet row group, or a whole
WebDataset tar). Each epoch, the units are permuted, their tasks cut into equal contiguous
shares for the ``world_size * num_workers`` reading slots (rank, dataloader worker), and
every slot streams its share through a task-level shuffle buffer. All of this depends only
on the task counts in the manifest, the seed and the epoch, so every rank can compute every
slot's plan without reading data: all ranks agree on the number of steps, and a reader
resumes at any batch by skipping plan entries instead of re-reading data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Unit:
    path: str  # relative to the shard directory
    index: int  # row group inside the file (Parquet); 0 for a tar
    tasks: int


def units_from_manifest(manifest: dict, split: str) -> list[Unit]:
    units = []
    for f in manifest["splits"][split]["files"]:
        groups = f.get("units") or [f["tasks"]]
        units += [Unit(f["path"], i, int(n)) for i, n in enumerate(groups)]
    return units


def epoch_stream(units: list[Unit], seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Every task of the epoch as (unit id, task index) rows, units in the epoch's order."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(units)) if shuffle else np.arange(len(units))
    if not len(order):
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate([np.stack([np.full(units[u].tasks, u), np.arange(units[u].tasks)], axis=1)
                           for u in order.tolist()]).astype(np.int64)


def shuffle_buffer(stream: np.ndarray, buffer_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Order in which a slot emits the tasks of ``stream`` ([T, 2] rows).

    Tasks pass through a shuffle buffer of ``buffer_size`` tasks (each arriving task
    replaces a uniformly chosen one, which is emitted), as webdataset and tf.data do, so a
    worker holds only about ``buffer_size`` tasks' units in memory. ``rng=None``: stream order.
    (Run here on indices only, so a resumed reader can skip ahead without reading data.)
    """
    n = len(stream)
    if rng is None or buffer_size <= 1 or n == 0:
        return stream
    out = np.empty_like(stream)
    buf = list(range(min(buffer_size, n)))
    picks = rng.integers(0, 1 << 62, size=n)
    k = 0
    for nxt in range(len(buf), n):
        j = int(picks[k] % len(buf))
        out[k] = stream[buf[j]]
        buf[j] = nxt
        k += 1
    rest = np.array(buf, dtype=np.int64)
    out[k:] = stream[rest[rng.permutation(len(rest))]]
    return out


@dataclass
class EpochPlan:
    """Every slot's emission order and batch count for one epoch.

    orders[rank][worker]   [T, 2] (unit id, task index) in emission order
    batches[rank][worker]  meta-batches that slot yields
    steps                  meta-batches per rank this epoch: the same on every rank
    dropped_tasks          tasks of this epoch in no step (tails that fill no batch)
    """

    orders: list[list[np.ndarray]]
    batches: list[list[int]]
    steps: int
    dropped_tasks: int


def plan_epoch(units: list[Unit], *, world_size: int, num_workers: int, tasks_per_batch: int, seed: int,
               epoch: int, shuffle: bool, buffer_size: int, drop_last: bool, max_tasks: int = 0) -> EpochPlan:
    workers = max(1, num_workers)
    stream = epoch_stream(units, seed, epoch, shuffle)
    if max_tasks:
        stream = stream[:max_tasks]
    # Contiguous, equal shares of the epoch's task stream: a unit on a boundary is read by
    # two slots, each taking only its own tasks, so shares differ by at most one task.
    shares = np.array_split(stream, world_size * workers)
    orders: list[list[np.ndarray]] = []
    batches: list[list[int]] = []
    for r in range(world_size):
        orders.append([])
        batches.append([])
        for w in range(workers):
            s = r * workers + w
            rng = np.random.default_rng([seed, epoch, 1, s]) if shuffle else None
            order = shuffle_buffer(shares[s], buffer_size, rng)
            orders[r].append(order)
            n = len(order)
            batches[r].append(n // tasks_per_batch if drop_last else -(-n // tasks_per_batch))
    per_rank = [sum(b) for b in batches]
    steps = min(per_rank) if drop_last else max(per_rank)
    total = len(stream)
    used = steps * world_size * tasks_per_batch if drop_last else total
    return EpochPlan(orders, batches, steps, total - min(used, total))
