"""Meta-batches from data already in memory: a DataFrame, or plain arrays or tensors.

``task_batch`` lays rows out as the reader does (support rows of every task first, then
query rows, task by task; ``gmeta.types.TaskBatch``) and computes the batch's
``BatchLayout``, so the result goes straight into ``gmeta.MetaLearner`` or the functions of
``gmeta.meta.maml``::

    batch = task_batch(df, task="user", query="is_query", label="click",
                       sparse=["user", "item", "tags"], dense=["price"])

A sparse column holds one table row (an integer id) per row, or a list of them (multi-hot);
ids are used as table rows as they are (hash or map them first: ``gmeta prepare`` does).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from gmeta.io.collate import gather_ranges, pack_batch
from gmeta.io.features import stable_hash
from gmeta.types import TaskBatch


class BatchError(ValueError):
    """A column given to ``task_batch`` is missing or holds values it cannot use; names it."""


def _column(data, name: str) -> np.ndarray | list:
    try:
        col = data[name]
    except (KeyError, IndexError):
        raise BatchError(f"no column {name!r} in the data (has: {list(data.keys())})") from None
    if hasattr(col, "to_numpy"):
        col = col.to_numpy()
    if torch.is_tensor(col):
        col = col.detach().cpu().numpy()
    return col


def _ids(col, name: str, num_rows: int, num_embeddings: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, lengths per row or None for single-valued) of a sparse column."""
    arr = np.asarray(col) if not isinstance(col, list) else None
    if arr is not None and arr.dtype != object and arr.ndim == 1:
        values, lengths = arr, None
    else:  # a list per row
        items = list(col)
        lengths = np.array([len(v) for v in items], np.int64)
        parts = [np.asarray(v).reshape(-1) for v in items]
        values = np.concatenate([p for p in parts if p.size] or [np.zeros(0, np.int64)])
    if len(values) and not np.issubdtype(np.asarray(values).dtype, np.integer):
        raise BatchError(f"sparse column {name!r}: ids must be integers, got {np.asarray(values).dtype}")
    values = np.asarray(values, np.int64)
    if (lengths is None and len(values) != num_rows) or (lengths is not None and len(lengths) != num_rows):
        raise BatchError(f"sparse column {name!r}: {len(values if lengths is None else lengths)} rows, "
                         f"expected {num_rows}")
    if len(values) and values.min() < 0:
        raise BatchError(f"sparse column {name!r}: id {int(values.min())} is negative")
    if num_embeddings is not None and len(values) and values.max() >= num_embeddings:
        raise BatchError(f"sparse column {name!r}: id {int(values.max())} is outside its table of "
                         f"{num_embeddings} rows")
    return values, lengths


def task_batch(data: Mapping, *, task: str, query: str, label: str, sparse: Sequence[str],
               dense: Sequence[str] = (), features: Sequence[dict] | None = None,
               size_buckets: int = 1) -> TaskBatch:
    """One meta-batch of every task in ``data`` (a DataFrame or a mapping of column -> array
    or tensor).

    task   column of task keys (any hashable values); tasks keep their first-seen order
    query  column of booleans: True for query rows, False for support rows
    label  column of labels (0/1 for a binary objective)
    sparse the sparse columns, in the model's feature order
    dense  the dense columns, in the model's order
    features  the model's features (``MetaDLRM.features``), to check ids against the
           table sizes and to take each feature's pooling; else ids are not checked and
           every multi-hot feature is summed
    size_buckets  the size buckets of the layout (``meta.size_buckets``)

    Every task needs at least one support and one query row.
    """
    keys = _column(data, task)
    is_query = np.asarray(_column(data, query))
    if is_query.dtype != bool:
        raise BatchError(f"column {query!r}: must be booleans (True: query row), got {is_query.dtype}")
    num_rows = len(is_query)
    if features is not None and [f["name"] for f in features] != list(sparse):
        raise BatchError(f"sparse columns {list(sparse)} differ from the model's features "
                         f"{[f['name'] for f in features]} (names and order)")
    codes: dict[Hashable, int] = {}
    first: list[Hashable] = []
    task_code = np.empty(num_rows, np.int64)
    for i, k in enumerate(np.asarray(keys).tolist()):
        c = codes.setdefault(k, len(codes))
        if c == len(first):
            first.append(k)
        task_code[i] = c
    n = len(codes)
    s_count = np.bincount(task_code[~is_query], minlength=n)
    q_count = np.bincount(task_code[is_query], minlength=n)
    for counts, side in ((s_count, "support"), (q_count, "query")):
        if n and counts.min() == 0:
            bad = first[int(np.argmin(counts))]
            raise BatchError(f"task {bad!r} (column {task!r}) has no {side} rows (column {query!r})")
    order = np.lexsort((task_code, is_query))  # support first, then task by task; stable
    labels = np.asarray(_column(data, label), np.float32)[order]
    if dense:
        dense_arr = np.stack([np.asarray(_column(data, c), np.float32) for c in dense], axis=1)[order]
    else:
        dense_arr = np.zeros((num_rows, 0), np.float32)
    if not np.isfinite(dense_arr).all():
        col = dense[int(np.flatnonzero(~np.isfinite(dense_arr).all(axis=0))[0])]
        raise BatchError(f"dense column {col!r}: values must be finite")
    values, lengths = [], []
    for i, name in enumerate(sparse):
        table = features[i]["num_embeddings"] if features is not None else None
        v, ln = _ids(_column(data, name), name, num_rows, table)
        if ln is None:
            values.append(v[order])
            lengths.append(np.ones(num_rows, np.int64))
        else:
            pos, ln = gather_ranges(np.concatenate([[0], np.cumsum(ln)]), order)
            values.append(v[pos])
            lengths.append(ln)
    key_arr = np.empty(len(first), dtype=object)
    key_arr[:] = first
    key_hash = stable_hash(key_arr, "task").astype(np.int64)  # as gmeta prepare writes task_id
    arrays = {
        "values": np.concatenate(values) if values else np.zeros(0, np.int64),
        "lengths": np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
        "dense": dense_arr, "labels": labels,
        "support_offsets": np.concatenate([[0], np.cumsum(s_count)]).astype(np.int64),
        "query_offsets": np.concatenate([[0], np.cumsum(q_count)]).astype(np.int64),
        "task_ids": key_hash,
    }
    pooling = [f.get("pooling", "sum") for f in features] if features is not None else ["sum"] * len(sparse)
    return pack_batch(arrays, list(sparse), pooling, size_buckets).unpack()
