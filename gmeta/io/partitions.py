"""Daily partitions of a task data set: ``gmeta prepare --partition NAME``.

Ads logs arrive as daily partitions. A *partitioned* data set holds one complete set of
task shards per partition, each written by ``gmeta prepare`` as it writes an unpartitioned
one, and an index over them::

    OUT/partitions.json                 the index (below), rewritten after each partition
    OUT/partitions/<NAME>/manifest.json one partition's manifest, shards, id counts and
    OUT/partitions/<NAME>/train/ ...    task ids (task_ids.parquet: task_id, split)

Partition names sort in time order (ISO dates: ``2026-12-01``). A partition is staged beside
the others and swapped in by two renames, so it is written whole or not at all, and
re-preparing one replaces only its own directory: the others' files, and so their
checksums and the content hash of any selection without it, do not change.

A training config names the partitions it reads with ``data.partitions`` (see
:func:`select`). ``gmeta.io.manifest.load_manifest(OUT, partitions)`` then returns one
manifest merging the selected partitions (``manifest.merged_manifest``): their files
(paths relative to ``OUT``), counts summed, the ids new to the train split recomputed from
the merged id counts, and ``selected_partitions`` (each name with its own content hash), so
the content hash a checkpoint records names exactly the partitions, and their contents, it
was trained on.

The index (``manifest.write_index``) lists, per partition in order: its tasks and rows per
split, its content hash, the tasks whose campaign (task key) no earlier partition's input
holds (``new_tasks``) and, per sparse feature, its distinct ids and those no earlier
partition holds (``ids``: what is new on each day). This module reads and writes the
partitions' files only; it imports no other part of gmeta.io but its errors.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gmeta.config import PARTITION_NAME as _NAME
from gmeta.config import check_partitions as check_spec
from gmeta.io.errors import PrepareError

log = logging.getLogger(__name__)

INDEX = "partitions.json"
DIR = "partitions"
TASK_IDS = "task_ids.parquet"
# Fields every partition of a data set must share: what a model reads and how tasks were formed.
SHARED_FIELDS = ("format_version", "format", "schema", "id_hash", "task_key", "source", "split_rule")


def check_name(name: str, key: str = "--partition") -> str:
    if not _NAME.match(name) or ".." in name:
        raise PrepareError(f"{key} {name!r}: a partition name is letters, digits and . _ = - (e.g. 2026-12-01), "
                           "and names sort in time order")
    return name


def is_partitioned(root: Path) -> bool:
    """``root`` holds a partitioned data set (its index, or a partition whose index a
    stopped prepare did not write yet)."""
    try:
        return (root / INDEX).is_file() or (root / DIR).is_dir()
    except OSError:
        return False


def partition_dir(root: Path, name: str) -> Path:
    return root / DIR / name


def names(root: Path) -> list[str]:
    """Every partition of ``root`` in order (those with a manifest: a partition being staged
    or swapped has none under its name)."""
    d = root / DIR
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if _NAME.match(p.name) and (p / "manifest.json").is_file())


def select(root: Path, spec: str, key: str = "data.partitions") -> list[str]:
    """The partitions of ``root`` that ``spec`` names, in order: ``all`` (or empty), ``last:N``,
    ``A..B`` (both included; ``..B``: up to B, ``A..``: from A) or ``A,B,C``. A named
    partition that does not exist, or a selection of none, is an error listing what exists."""
    check_spec(spec, key)
    have = names(root)
    where = f"{root / INDEX}"
    if not have:
        raise PrepareError(f"{where}: the data set has no partition; prepare one with gmeta prepare --partition NAME")
    shown = f"{have[0]} .. {have[-1]} ({len(have)})" if len(have) > 4 else ", ".join(have)
    if spec in ("", "all"):
        return have
    if spec.startswith("last:"):
        n = int(spec[5:])
        if n > len(have):
            raise PrepareError(f"{key}: {spec!r} asks for {n} partitions; {where} has {len(have)}: {shown}")
        return have[-n:]
    if ".." in spec:
        lo, _, hi = spec.partition("..")
        for end in (lo, hi):
            if end and end not in have:
                raise PrepareError(f"{key}: {spec!r}: no partition {end!r} in {where}; it has {shown}")
        return [n for n in have if (not lo or n >= lo) and (not hi or n <= hi)]
    chosen = [s.strip() for s in spec.split(",")]
    missing = [n for n in chosen if n not in have]
    if missing:
        raise PrepareError(f"{key}: {spec!r}: no partition {missing} in {where}; it has {shown}")
    return sorted(set(chosen))


def previous(root: Path, name: str) -> list[str]:
    """The partitions before ``name``, in order."""
    return [n for n in names(root) if n < name]


def next_after(root: Path, name: str) -> str | None:
    """The first partition after ``name``, or None."""
    return next((n for n in names(root) if n > name), None)


def _tasks(root: Path, name: str) -> pa.Table:
    path = partition_dir(root, name) / TASK_IDS
    if not path.is_file():
        raise PrepareError(f"{path}: not found; prepare partition {name} again with this version of gmeta")
    return pq.read_table(path)


def _written(root: Path, name: str, splits: tuple[str, ...] | None) -> pa.Table:
    """The rows of the written tasks (of ``splits``, when given) of ``task_ids.parquet``."""
    t = _tasks(root, name)
    split = t.column("split")
    keep = pc.not_equal(split, "dropped") if splits is None else pc.is_in(split, pa.array(list(splits)))
    return t.filter(keep)  # (no null task_id left: to_numpy keeps int64)


def task_ids(root: Path, name: str, splits: tuple[str, ...] | None = None) -> np.ndarray:
    """The ids of the tasks written to partition ``name`` (of ``splits`` only, when given), sorted."""
    return np.unique(_written(root, name, splits).column("task_id").to_numpy())


def input_keys(root: Path, name: str) -> np.ndarray:
    """The hash of every task key in partition ``name``'s input (tasks dropped by prepare
    included: too few rows make no task, but the campaign was running), sorted."""
    return np.unique(_tasks(root, name).column("key_hash").to_numpy())


def new_task_ids(root: Path, name: str, splits: tuple[str, ...] | None = None,
                 before: np.ndarray | None = None) -> np.ndarray:
    """The ids of the tasks of partition ``name`` (of ``splits``) whose task key occurs in
    no earlier partition's input: the tasks that are new on that day (a chunk of a long
    task is new when its task's key is). ``before``: the earlier partitions' input keys,
    sorted, when the caller holds them already (else read here)."""
    t = _written(root, name, splits)
    ids, keys = t.column("task_id").to_numpy(), t.column("key_hash").to_numpy()
    if before is None:
        earlier = [input_keys(root, p) for p in previous(root, name)]
        before = np.unique(np.concatenate(earlier)) if earlier else np.zeros(0, np.int64)
    return np.unique(ids[~np.isin(keys, before)])


def staging_dir(root: Path, name: str) -> Path:
    return root / DIR / f".staging-{name}"


def _old_dir(root: Path, name: str) -> Path:
    return root / DIR / f".old-{name}"


def recover(root: Path, name: str) -> None:
    """Undo a swap that stopped between its two renames: the partition's old directory
    goes back in place (the new one had not replaced it)."""
    old, target = _old_dir(root, name), partition_dir(root, name)
    if old.is_dir() and not target.exists():
        old.replace(target)
        log.warning("prepare: restored partition %s of %s (a replacement stopped half way)", name, root)
    if old.is_dir():
        shutil.rmtree(old)


def install(root: Path, name: str, staged: Path) -> None:
    """Swap the fully written ``staged`` partition in place of ``name`` (two renames: the
    old one aside, the new one in), then drop the old one."""
    target, old = partition_dir(root, name), _old_dir(root, name)
    if target.exists():
        target.replace(old)
    staged.replace(target)
    if old.exists():
        shutil.rmtree(old)


def check_layout(root: Path, partition: str | None) -> None:
    """A partitioned data set takes only partitions, an unpartitioned one none."""
    plain = (root / "manifest.json").is_file()
    if partition and plain:
        raise PrepareError(f"{root}: holds an unpartitioned data set (manifest.json); write partitions "
                           "(--partition) to another directory")
    if not partition and is_partitioned(root):
        raise PrepareError(f"{root}: holds a partitioned data set ({INDEX}); prepare into it with --partition NAME, "
                           "or write an unpartitioned data set to another directory")


def format_index(index: dict) -> str:
    """One line per partition: tasks, rows, new tasks and new ids."""
    lines = ["partitions (tasks train/eval, rows, new tasks, new ids per feature):"]
    for e in index["partitions"]:
        t = e["tasks"]
        ids = ", ".join(f"{f} {v['new']:,}/{v['distinct']:,}" for f, v in e["ids"].items())
        lines.append(f"  {e['name']}: {t.get('train', 0):,}/{t.get('eval', 0):,} tasks, "
                     f"{sum(e['rows'].values()):,} rows, {e['new_tasks']:,} new tasks; new ids {ids}")
    return "\n".join(lines)
