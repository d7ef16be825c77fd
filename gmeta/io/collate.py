"""Tasks of loaded blocks -> one meta-batch, packed in one buffer for the trip from a
DataLoader worker to the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gmeta.io.block import SplitArrays, TaskBlock
from gmeta.layout import BatchLayout, build_arrays, cell_widths
from gmeta.types import TaskBatch


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
    sides: dict[str, dict[str, Any]] = {}
    for side_name in ("support", "query"):
        parts: dict[str, Any] = {"ids": {}, "len": {}, "dense": [], "label": [], "true_prob": [], "counts": []}
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
    return pack_batch(arrays, keys, [f.get("pooling", "sum") for f in schema["sparse"]], size_buckets,
                      cell_widths(schema["sparse"]))


def pack_batch(arrays: dict[str, np.ndarray], keys: list[str], pooling: list[str], size_buckets: int,
               widths: list[int] | None = None) -> PackedBatch:
    """A collated batch's arrays plus its ``BatchLayout`` for ``size_buckets``, in one buffer
    (``widths``: cells per row of each feature, ``build_arrays``)."""
    lay = build_arrays(arrays["values"], arrays["lengths"], arrays["support_offsets"], arrays["query_offsets"],
                       pooling, size_buckets, widths)
    return _pack({**arrays, **{_LAYOUT + k: v for k, v in lay.items()}}, keys)
