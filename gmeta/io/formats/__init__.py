"""The two on-disk shard formats, read into the same TaskBlocks: ``parquet`` (one row group
per unit) and ``webdataset`` (one tar per unit, one sample per task).

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config.
"""

from __future__ import annotations

from pathlib import Path

from gmeta.io.block import TaskBlock
from gmeta.io.formats import parquet, webdataset


def read_unit(fmt: str, path: Path, index: int, schema: dict) -> tuple[TaskBlock, str]:
    """Unit ``index`` of the shard file ``path`` and a description of where it is, for errors."""
    if fmt == "webdataset":
        return webdataset.read_tar(path, schema), str(path)
    return parquet.read_unit(path, index, schema), f"{path} (row group {index})"


def read_task_keys(fmt: str, path: Path) -> list[tuple[object, int]]:
    """(task_key, task_id) of every task of a shard file, in order."""
    if fmt == "webdataset":
        return webdataset.read_task_keys(path)
    return parquet.read_task_keys(path)
