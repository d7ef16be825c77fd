"""Meta-batches from data already in memory: a DataFrame, or plain arrays or tensors.

``task_batch`` lays rows out as the reader does (support rows of every task first, then
query rows, task by task; ``gmeta.types.TaskBatch``) and computes the batch's
``BatchLayout``, so the result goes straight into ``gmeta.MetaLearner`` or the functions of
``gmeta.meta.maml``::

    batch = task_batch(df, task="user", query="is_query", label="click",
                       sparse=learner.sparse_names, dense=["price"], features=learner.features)

A sparse column holds one raw id (an integer or a string) per row, or a list of them
(multi-hot). Raw ids are hashed into their tables by ``gmeta.hash_ids``, the function
``gmeta prepare`` and serving hash them with, under the model's id hash (carried by
``MetaLearner.features``), so a row scores as it would through ``gmeta predict --input``.
``ids="rows"`` takes ids that are table rows already (as in task shards).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from gmeta.io.collate import gather_ranges, pack_batch
from gmeta.io.features import ID_HASHES, hash_ids, stable_hash
from gmeta.layout import cell_widths
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


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _raw(values: np.ndarray, name: str) -> np.ndarray:
    """Raw ids as ``gmeta prepare`` reads a column of them: int64 for integers, an object
    array of str for text (which hash differently: ``hash_ids``)."""
    kind = values.dtype.kind
    if kind in "iu":
        return values.astype(np.int64)
    if kind == "U":
        return values.astype(object)
    if kind == "O" and all(isinstance(v, str) for v in values):
        return values
    if kind == "O" and all(_is_int(v) for v in values):
        return values.astype(np.int64)
    if kind == "O":
        bad = next((v for v in values if not (isinstance(v, str) or _is_int(v))), None)
        if bad is None:  # both: prepare reads a column as one type, which decides how its ids hash
            raise BatchError(f"sparse column {name!r}: raw ids must be all integers or all strings, got both "
                             f"({next(v for v in values if _is_int(v))!r}, "
                             f"{next(v for v in values if isinstance(v, str))!r})")
        raise BatchError(f"sparse column {name!r}: raw ids must be integers or strings, got "
                         f"{type(bad).__name__} {bad!r}")
    hint = " (pandas reads an integer column with a gap as floats: fill it and cast it to int64)" if kind == "f" \
        else ""
    raise BatchError(f"sparse column {name!r}: raw ids must be integers or strings, got {values.dtype}{hint}")


def _ids(col, name: str, num_rows: int, num_embeddings: int | None,
         id_hash: int | None, mode: str = "hash", hash_as: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """(table rows, lengths per row or None for single-valued) of a sparse column: raw ids
    hashed under ``id_hash`` into ``num_embeddings`` rows, or (``id_hash`` None) ids that
    are table rows already. ``mode``: the feature's ``ids``; managed ids are 63-bit hashes
    (``hash_ids``) that the model maps to its slots. ``hash_as``: the feature whose table
    this one shares (its ``table``), whose name keys the hash."""
    arr = np.asarray(col) if not isinstance(col, list) else None
    lengths = None
    if arr is not None and arr.dtype != object and arr.ndim == 1:
        values = arr
    else:
        items = list(col)
        listed = [isinstance(v, (list, tuple, np.ndarray)) for v in items]
        if any(listed) and not all(listed):
            i = listed.index(not listed[0])
            raise BatchError(f"sparse column {name!r}: row {i} holds {items[i]!r}, row 0 {items[0]!r}: a list of ids "
                             "in every row (multi-hot) or one id in every row")
        if items and all(listed):  # a list per row, as objects: integers are not cast to text across rows
            lengths = np.array([len(v) for v in items], np.int64)
            parts = [np.asarray(v, dtype=object).reshape(-1) for v in items]
            values = np.concatenate([p for p in parts if p.size] or [np.zeros(0, np.int64)])
        else:  # one id per row (strings, or a Python list)
            values = np.empty(len(items), dtype=object)
            values[:] = items
    if (lengths is None and len(values) != num_rows) or (lengths is not None and len(lengths) != num_rows):
        raise BatchError(f"sparse column {name!r}: {len(values if lengths is None else lengths)} rows, "
                         f"expected {num_rows}")
    if id_hash is not None:
        assert num_embeddings is not None  # task_batch needs the features to hash
        raw = _raw(np.asarray(values), name) if len(values) else np.zeros(0, np.int64)
        return hash_ids(raw, hash_as or name, num_embeddings, id_hash, mode), lengths
    if len(values) and values.dtype == object and all(_is_int(v) for v in values):
        values = values.astype(np.int64)
    if len(values) and not np.issubdtype(np.asarray(values).dtype, np.integer):
        raise BatchError(f"sparse column {name!r}: with ids='rows' ids are table rows and must be integers, got "
                         f"{np.asarray(values).dtype}")
    values = np.asarray(values, np.int64)
    if len(values) and values.min() < 0:
        raise BatchError(f"sparse column {name!r}: id {int(values.min())} is negative")
    if num_embeddings is not None and mode == "hash" and len(values) and values.max() >= num_embeddings:
        raise BatchError(f"sparse column {name!r}: id {int(values.max())} is outside its table of "
                         f"{num_embeddings} rows")
    return values, lengths


def _id_hash(features: Sequence[dict] | None, id_hash: int | None) -> int:
    """The id hash raw ids go through: ``id_hash``, else the one the features carry."""
    if features is None:
        raise BatchError("ids='raw': raw ids are hashed into the model's tables, which needs features= "
                         "(MetaLearner.features: table sizes and id hash); ids='rows' takes ids that are table rows")
    if id_hash is None:
        carried = {f.get("id_hash") for f in features}
        if None in carried or len(carried) > 1:
            raise BatchError("ids='raw': the features do not carry one id_hash (MetaLearner.features do); pass "
                             "id_hash= (MetaLearner.id_hash, the checkpoint's meta.json id_hash), or ids='rows' "
                             "for ids that are table rows")
        id_hash = carried.pop()
    if type(id_hash) is not int or id_hash not in ID_HASHES:
        raise BatchError(f"id_hash {id_hash!r}: must be one of {list(ID_HASHES)}")
    return id_hash


def task_batch(data: Mapping, *, task: str, query: str, label: str, sparse: Sequence[str],
               dense: Sequence[str] = (), features: Sequence[dict] | None = None,
               size_buckets: int = 1, ids: str = "raw", id_hash: int | None = None) -> TaskBatch:
    """One meta-batch of every task in ``data`` (a DataFrame or a mapping of column -> array
    or tensor).

    task   column of task keys (any hashable values); tasks keep their first-seen order
    query  column of booleans: True for query rows, False for support rows
    label  column of labels (0/1 for a binary objective)
    sparse the sparse columns, in the model's feature order: raw ids (integers or
           strings; a list of them per row for a multi-hot feature)
    dense  the dense columns, in the model's order, as the model takes them
           (``features.dense_transform`` is not applied)
    features  the model's features (``MetaLearner.features``): the table sizes and the id
           hash raw ids are hashed with, and each feature's pooling; a sequence
           (``max_length``) is cut to its first max_length ids and takes that many
           cells, a feature naming another's ``table`` hashes as that one. With ``ids="rows"``
           ``MetaDLRM.features`` will do (ids checked against the table sizes), or none
           (ids not checked, every multi-hot feature summed)
    size_buckets  the size buckets of the layout (``meta.size_buckets``)
    ids    "raw" (default): raw ids, hashed as ``gmeta prepare`` hashes them (``gmeta.hash_ids``);
           "rows": ids that are table rows already (as in task shards), used as they are
    id_hash  the id hash of the model's tables (``MetaLearner.id_hash``), for features
           that do not carry it

    Every task needs at least one support and one query row.
    """
    if ids not in ("raw", "rows"):
        raise BatchError(f"ids={ids!r}: 'raw' (ids to hash into the tables) or 'rows' (table rows already)")
    if ids == "raw":
        id_hash = _id_hash(features, id_hash)
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
        mode = features[i].get("ids", "hash") if features is not None else "hash"
        v, ln = _ids(_column(data, name), name, num_rows, table, id_hash if ids == "raw" else None, mode,
                     features[i].get("table", "") if features is not None else "")
        cut = features[i].get("max_length", 0) if features is not None else 0
        if ln is not None and cut and ln.max(initial=0) > cut:  # a sequence: its first max_length ids
            keep = np.minimum(ln, cut)
            starts = np.cumsum(ln) - ln
            v, ln = v[np.repeat(starts - (np.cumsum(keep) - keep), keep) + np.arange(int(keep.sum()))], keep
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
    widths = cell_widths(features) if features is not None else None
    return pack_batch(arrays, list(sparse), pooling, size_buckets, widths).unpack()
