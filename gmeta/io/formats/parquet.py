"""Parquet task shards: one record per task, one row group per unit.

A record is ``task_id``, ``task_key`` and two structs, ``support`` and ``query``, each with
one list per field (rows of the task): a list per sparse feature (a list of lists when
multi-hot), ``dense`` (a list of fixed-length lists), ``label`` (a fixed-length list per
row for several labels) and, when the data has it, ``true_prob``. gmeta.io.prepare writes
them; this module reads them into TaskBlocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gmeta.io.block import ShardError, SplitArrays, TaskBlock
from gmeta.io.features import schema_labels
from gmeta.storage import source, temp_name


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _list_offsets(arr: pa.ListArray) -> np.ndarray:
    off = _np(arr.offsets).astype(np.int64)
    return off - off[0]


def _labels(col: pa.Array, schema: dict) -> np.ndarray:
    """The label column of the rows: ``[R]``, or ``[R, L]`` for the L labels the schema names."""
    names = schema_labels(schema)
    if pa.types.is_fixed_size_list(col.type) != (names is not None) or (names and col.type.list_size != len(names)):
        want = f"{len(names)} labels {names} per row" if names else "one label per row"
        raise ValueError(f"label holds {col.type}, the manifest schema says {want}")
    if names is None:
        return _np(col).astype(np.float32, copy=False)
    return _np(col.flatten()).astype(np.float32, copy=False).reshape(len(col), len(names))


def _split_from_arrow(struct: pa.StructArray, schema: dict) -> SplitArrays:
    children = {struct.type.field(i).name: c for i, c in enumerate(struct.flatten())}
    rows = _list_offsets(children["label"])
    ids, id_offsets = {}, {}
    for feat in schema["sparse"]:
        col = children[feat["name"]].flatten()  # per row
        if len(col) != rows[-1]:  # (a damaged file can decode to columns of other lengths)
            raise ValueError(f"{feat['name']} has {len(col)} rows, the labels {rows[-1]}")
        if feat["multi_hot"]:
            id_offsets[feat["name"]] = _list_offsets(col)
            col = col.flatten()
        ids[feat["name"]] = _np(col).astype(np.int64, copy=False)
    dense = _np(children["dense"].flatten().flatten()).astype(np.float32, copy=False)
    nd = len(schema["dense"])
    label = _labels(children["label"].flatten(), schema)
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


class ShardWriter:
    """One Parquet shard file, a unit per row group, written under a temporary name and
    renamed on ``close()``: a file at its final name is always complete."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.tmp = temp_name(path)
        self.writer = pq.ParquetWriter(self.tmp, schema)

    def write_unit(self, records: pa.Table) -> None:
        self.writer.write_table(records, row_group_size=records.num_rows)

    def close(self) -> None:
        self.writer.close()
        self.tmp.replace(self.path)


def read_unit(path: Path, index: int, schema: dict) -> TaskBlock:
    """Row group ``index`` of ``path`` as a TaskBlock (not yet checked)."""
    where = f"{path} (row group {index})"
    try:
        with source(path) as src:
            table = pq.ParquetFile(src).read_row_group(index)
    except FileNotFoundError:
        raise ShardError(f"{path}: task shard listed in the manifest is missing") from None
    except (OSError, pa.ArrowException, IndexError) as e:
        raise ShardError(f"{where}: cannot read task shard: {e}") from None
    return block_from_arrow(table, where, schema)


def read_task_keys(path: Path) -> list[tuple[object, int]]:
    """(task_key, task_id) of every task in the file, in order."""
    try:
        with source(path) as src:
            t = pq.read_table(src, columns=["task_key", "task_id"])
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read task keys: {e}") from None
    return list(zip(t.column("task_key").to_pylist(), t.column("task_id").to_pylist()))
