"""Tasks in memory, and their checks.

A ``TaskBlock`` holds the tasks of one unit (a Parquet row group or a WebDataset tar) as
flat numpy arrays with offsets, the same whatever the file format (gmeta.io.formats reads
both into it), so both formats collate into identical ``TaskBatch``es (gmeta.io.collate).
Every block is checked when it is loaded (ids inside their tables, finite dense values, 0/1
labels, consistent lengths); a bad task is an error naming the file and row group or
sample, or is skipped and counted when ``on_bad_task`` is "skip".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gmeta.io.errors import PrepareError
from gmeta.io.features import id_bound


class ShardError(PrepareError):
    """A task shard is unreadable, corrupt or does not match the manifest. Names the file."""


@dataclass
class SplitArrays:
    """Rows of one side (support or query) of several tasks.

    rows       int64 [T+1]   task t owns rows rows[t]:rows[t+1]
    ids        name -> int64 [R] (single-valued) or [nnz] (multi-hot) hashed ids
    id_offsets name -> int64 [R+1], multi-hot features only: row r owns ids[off[r]:off[r+1]]
    dense      float32 [R, num_dense]
    label      float32 [R], or [R, L] for several labels (the manifest schema's ``labels``)
    true_prob  float32 [R] or None
    """

    rows: np.ndarray
    ids: dict[str, np.ndarray]
    id_offsets: dict[str, np.ndarray]
    dense: np.ndarray
    label: np.ndarray
    true_prob: np.ndarray | None = None


@dataclass
class TaskBlock:
    source: str  # where the block came from, for error messages
    task_id: np.ndarray  # int64 [T]
    support: SplitArrays
    query: SplitArrays
    bad: list[tuple[int, str]] = field(default_factory=list)  # (task index, reason), when skipping

    @property
    def num_tasks(self) -> int:
        return len(self.task_id)


def _concat_offsets(parts: list[np.ndarray]) -> np.ndarray:
    shifts = np.cumsum([0] + [int(p[-1]) for p in parts[:-1]])
    return np.concatenate([parts[0][:1]] + [p[1:] + s for p, s in zip(parts, shifts)])


def _concat_sides(sides: list[SplitArrays]) -> SplitArrays:
    first = sides[0]
    return SplitArrays(
        rows=_concat_offsets([s.rows for s in sides]),
        ids={k: np.concatenate([s.ids[k] for s in sides]) for k in first.ids},
        id_offsets={k: _concat_offsets([s.id_offsets[k] for s in sides]) for k in first.id_offsets},
        dense=np.concatenate([s.dense for s in sides]),
        label=np.concatenate([s.label for s in sides]),
        true_prob=None if first.true_prob is None else np.concatenate([s.true_prob for s in sides]),
    )


def concat_blocks(blocks: list[TaskBlock]) -> TaskBlock:
    """One block holding the tasks of ``blocks`` in order (task t of blocks[i] becomes task
    sum(len(blocks[:i])) + t)."""
    if len(blocks) == 1:
        return blocks[0]
    shifts = np.cumsum([0] + [b.num_tasks for b in blocks[:-1]])
    return TaskBlock(
        source=", ".join(b.source for b in blocks),
        task_id=np.concatenate([b.task_id for b in blocks]),
        support=_concat_sides([b.support for b in blocks]),
        query=_concat_sides([b.query for b in blocks]),
        bad=[(t + int(s), r) for b, s in zip(blocks, shifts) for t, r in b.bad],
    )


def _task_of_rows(rows: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(rows) - 1), np.diff(rows))


def find_bad_tasks(block: TaskBlock, schema: dict) -> list[tuple[int, str]]:
    """(task index, reason) for every task with invalid values; empty when all are good."""
    bad: dict[int, str] = {}
    for side_name, side in (("support", block.support), ("query", block.query)):
        row_task = _task_of_rows(side.rows)
        counts = np.diff(side.rows)
        for t in np.flatnonzero(counts == 0):
            bad.setdefault(int(t), f"empty {side_name} set")
        for feat in schema["sparse"]:
            name = feat["name"]
            ids = side.ids[name]
            bound = id_bound(feat)
            out = (ids < 0) | (ids >= bound)
            if out.any():
                if feat["multi_hot"]:
                    row_of_id = _task_of_rows(side.id_offsets[name])
                    tasks = row_task[row_of_id[out]]
                else:
                    tasks = row_task[out]
                for t in np.unique(tasks):
                    bad.setdefault(int(t), f"{side_name}.{name}: id outside [0, {bound})")
        nonfinite = ~np.isfinite(side.dense).all(axis=1)
        for t in np.unique(row_task[nonfinite]):
            bad.setdefault(int(t), f"{side_name}.dense: NaN or inf")
        binary = schema.get("objective", "binary") == "binary"  # shards older than the key: binary
        badlab = ~np.isin(side.label, (0.0, 1.0)) if binary else ~np.isfinite(side.label)
        if badlab.ndim == 2:  # several labels: a row is bad if any of its labels is
            badlab = badlab.any(axis=1)
        for t in np.unique(row_task[badlab]):
            bad.setdefault(int(t), f"{side_name}.label: {'not 0/1' if binary else 'NaN or inf'}")
    return sorted(bad.items())


def check_block(block: TaskBlock, schema: dict, on_bad_task: str) -> TaskBlock:
    """Raise on the first bad task (naming file, unit and task id), or record the bad ones."""
    bad = find_bad_tasks(block, schema)
    if bad and on_bad_task == "error":
        t, reason = bad[0]
        raise ShardError(f"{block.source}: task {t} (task_id {int(block.task_id[t])}): {reason} "
                         f"({len(bad)} bad task(s) in this unit; data.on_bad_task=skip skips them)")
    block.bad = bad
    return block
