"""Tasks in memory, checked, and collated into meta-batches.

A ``TaskBlock`` holds the tasks of one unit (a Parquet row group or a WebDataset tar) as
flat numpy arrays with offsets, the same whatever the file format, so both formats collate
into identical ``TaskBatch``es. Every block is checked when it is loaded (ids inside their
tables, finite dense values, 0/1 labels, consistent lengths); a bad task is an error naming
the file and row group or sample, or is skipped and counted when ``on_bad_task`` is "skip".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gmeta.io.errors import PrepareError
from gmeta.meta.layout import BatchLayout, build_arrays
from gmeta.types import TaskBatch


class ShardError(PrepareError):
    """A task shard is unreadable, corrupt or does not match the manifest. Names the file."""


@dataclass
class SplitArrays:
    """Rows of one side (support or query) of several tasks.

    rows       int64 [T+1]   task t owns rows rows[t]:rows[t+1]
    ids        name -> int64 [R] (single-valued) or [nnz] (multi-hot) hashed ids
    id_offsets name -> int64 [R+1], multi-hot features only: row r owns ids[off[r]:off[r+1]]
    dense      float32 [R, num_dense]
    label      float32 [R]
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


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _list_offsets(arr: pa.ListArray) -> np.ndarray:
    off = _np(arr.offsets).astype(np.int64)
    return off - off[0]


def _split_from_arrow(struct: pa.StructArray, schema: dict) -> SplitArrays:
    children = {struct.type.field(i).name: c for i, c in enumerate(struct.flatten())}
    rows = _list_offsets(children["label"])
    ids, id_offsets = {}, {}
    for feat in schema["sparse"]:
        col = children[feat["name"]].flatten()  # per row
        if feat["multi_hot"]:
            id_offsets[feat["name"]] = _list_offsets(col)
            col = col.flatten()
        ids[feat["name"]] = _np(col).astype(np.int64, copy=False)
    dense = _np(children["dense"].flatten().flatten()).astype(np.float32, copy=False)
    nd = len(schema["dense"])
    label = _np(children["label"].flatten()).astype(np.float32, copy=False)
    true_prob = None
    if schema["has_true_prob"]:
        true_prob = _np(children["true_prob"].flatten()).astype(np.float32, copy=False)
    if dense.size != len(label) * nd:
        raise ValueError(f"dense has {dense.size} values for {len(label)} rows x {nd} features")
    return SplitArrays(rows, ids, id_offsets, dense.reshape(len(label), nd), label, true_prob)


def block_from_arrow(table: pa.Table, source: str, schema: dict) -> TaskBlock:
    """A table of task records (see gmeta.io.prepare) -> TaskBlock."""
    try:
        return TaskBlock(
            source=source,
            task_id=_np(table.column("task_id")).astype(np.int64, copy=False),
            support=_split_from_arrow(table.column("support").combine_chunks(), schema),
            query=_split_from_arrow(table.column("query").combine_chunks(), schema),
        )
    except (KeyError, ValueError, pa.ArrowException) as e:
        raise ShardError(f"{source}: records do not match the manifest schema: {e}") from None


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
            out = (ids < 0) | (ids >= feat["num_embeddings"])
            if out.any():
                if feat["multi_hot"]:
                    row_of_id = _task_of_rows(side.id_offsets[name])
                    tasks = row_task[row_of_id[out]]
                else:
                    tasks = row_task[out]
                for t in np.unique(tasks):
                    bad.setdefault(int(t), f"{side_name}.{name}: id outside [0, {feat['num_embeddings']})")
        nonfinite = ~np.isfinite(side.dense).all(axis=1)
        for t in np.unique(row_task[nonfinite]):
            bad.setdefault(int(t), f"{side_name}.dense: NaN or inf")
        binary = schema.get("objective", "binary") == "binary"  # shards older than the key: binary
        badlab = ~np.isin(side.label, (0.0, 1.0)) if binary else ~np.isfinite(side.label)
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


def gather_ranges(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ranges offsets[i]:offsets[i+1] for i in idx, concatenated; and lengths."""
    starts = offsets[idx]
    lens = offsets[idx + 1] - starts
    out_starts = np.cumsum(lens) - lens
    return np.repeat(starts - out_starts, lens) + np.arange(int(lens.sum())), lens


_TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32, "bool": torch.bool}
_ITEMSIZE = {"int64": 8, "float32": 4, "bool": 1}
_LAYOUT = "layout."  # prefix of the BatchLayout's arrays in the packed buffer


@dataclass
class PackedBatch:
    """A collated meta-batch in one contiguous byte buffer plus its layout.

    A DataLoader worker hands each tensor to the main process through a new shared-memory
    segment, which costs more than collating the batch; a numpy buffer instead travels
    pickled through the worker's pipe in one copy. ``unpack()`` returns tensor views of it.
    """

    buf: np.ndarray | torch.Tensor  # uint8 [bytes]; a tensor once pinned
    layout: list[tuple[str, str, tuple, int]]  # (field, dtype, shape, byte offset)
    keys: list[str]

    def pin_memory(self) -> PackedBatch:  # called by the DataLoader's pinning thread
        return PackedBatch(torch.as_tensor(self.buf).pin_memory(), self.layout, self.keys)

    def unpack(self) -> TaskBatch:
        buf = torch.as_tensor(self.buf)
        f = {}
        for name, dtype, shape, off in self.layout:
            n = int(np.prod(shape)) * _ITEMSIZE[dtype]
            f[name] = buf[off: off + n].view(_TORCH_DTYPES[dtype]).reshape(shape)
        lay = {k[len(_LAYOUT):]: v for k, v in f.items() if k.startswith(_LAYOUT)}
        return TaskBatch(
            sparse=KeyedJaggedTensor(keys=self.keys, values=f["values"], lengths=f["lengths"]),
            dense=f["dense"], labels=f["labels"], support_offsets=f["support_offsets"],
            query_offsets=f["query_offsets"], task_ids=f["task_ids"], true_prob=f.get("true_prob"),
            layout=BatchLayout.from_arrays(lay) if lay else None)


def _pack(arrays: dict[str, np.ndarray], keys: list[str]) -> PackedBatch:
    layout, off = [], 0
    for name, a in arrays.items():
        layout.append((name, str(a.dtype), tuple(a.shape), off))
        off += -(-a.nbytes // 8) * 8  # keep every field 8-byte aligned for the views
    buf = np.empty(off, dtype=np.uint8)
    for (_, _, _, o), a in zip(layout, arrays.values()):
        buf[o: o + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    return PackedBatch(buf, layout, keys)


def collate_packed(picks: list[tuple[TaskBlock, np.ndarray]], schema: dict, size_buckets: int | None = None
                   ) -> PackedBatch:
    """Tasks ``idx`` of each block, in that order, -> one meta-batch packed in one buffer
    (``.unpack()`` gives the TaskBatch; layout in its docstring). With ``size_buckets``,
    the batch's ``BatchLayout`` for that many buckets is computed here too."""
    sides = {}
    for side_name in ("support", "query"):
        parts = {"ids": {}, "len": {}, "dense": [], "label": [], "true_prob": [], "counts": []}
        for block, idx in picks:
            side: SplitArrays = getattr(block, side_name)
            rows, counts = gather_ranges(side.rows, idx)
            parts["counts"].append(counts)
            parts["dense"].append(side.dense[rows])
            parts["label"].append(side.label[rows])
            if side.true_prob is not None:
                parts["true_prob"].append(side.true_prob[rows])
            for feat in schema["sparse"]:
                name = feat["name"]
                if feat["multi_hot"]:
                    pos, lens = gather_ranges(side.id_offsets[name], rows)
                    parts["ids"].setdefault(name, []).append(side.ids[name][pos])
                    parts["len"].setdefault(name, []).append(lens)
                else:
                    parts["ids"].setdefault(name, []).append(side.ids[name][rows])
        sides[side_name] = parts
    s, q = sides["support"], sides["query"]
    s_counts, q_counts = np.concatenate(s["counts"]), np.concatenate(q["counts"])
    n_rows = int(s_counts.sum() + q_counts.sum())
    values, lengths = [], []
    for feat in schema["sparse"]:
        name = feat["name"]
        values += s["ids"][name] + q["ids"][name]
        if feat["multi_hot"]:
            lengths += s["len"][name] + q["len"][name]
        else:
            lengths.append(np.ones(n_rows, dtype=np.int64))
    arrays: dict[str, Any] = {
        "values": np.concatenate(values).astype(np.int64, copy=False),
        "lengths": np.concatenate(lengths).astype(np.int64, copy=False),
        "dense": np.concatenate(s["dense"] + q["dense"]).astype(np.float32, copy=False),
        "labels": np.concatenate(s["label"] + q["label"]).astype(np.float32, copy=False),
        "support_offsets": np.concatenate([[0], np.cumsum(s_counts)]).astype(np.int64),
        "query_offsets": np.concatenate([[0], np.cumsum(q_counts)]).astype(np.int64),
        "task_ids": np.concatenate([b.task_id[i] for b, i in picks]).astype(np.int64, copy=False),
    }
    if schema["has_true_prob"]:
        arrays["true_prob"] = np.concatenate(s["true_prob"] + q["true_prob"]).astype(np.float32, copy=False)
    keys = [f["name"] for f in schema["sparse"]]
    if size_buckets is None:
        return _pack(arrays, keys)
    return pack_batch(arrays, keys, [f.get("pooling", "sum") for f in schema["sparse"]], size_buckets)


def pack_batch(arrays: dict[str, np.ndarray], keys: list[str], pooling: list[str], size_buckets: int) -> PackedBatch:
    """A collated batch's arrays plus its ``BatchLayout`` for ``size_buckets``, in one buffer."""
    lay = build_arrays(arrays["values"], arrays["lengths"], arrays["support_offsets"], arrays["query_offsets"],
                       pooling, size_buckets)
    return _pack({**arrays, **{_LAYOUT + k: v for k, v in lay.items()}}, keys)
