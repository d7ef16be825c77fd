"""``gmeta prepare``: raw row-level logs -> task shards + manifest.json.

One record of a task shard is one whole task::

    task_key   the raw task key (int64 or string, as in the input)
    task_id    int64, stable hash of the task key
    support    struct of lists, the task's support rows in time order
    query      struct of lists, its query rows (all later than the support rows under
               the time rule)

and ``support`` / ``query`` hold, per row, one column per field::

    <sparse feature>   list<int64>            hashed id, or list<list<int64>> if multi-hot
    dense              list<list<float32>>    [rows][num_dense]
    label              list<float32>, or list<fixed_size_list<float32>[L]> for the L columns
                       of features.labels (the manifest schema's ``labels`` names them)
    true_prob          list<float32>          only when the input has it
    timestamp          list<int64>

Shards go to ``OUT/train/`` and ``OUT/eval/`` (held-out cold-start tasks, chosen by a hash
of the task key). ``OUT/manifest.json`` records the schema, task and row counts, per-feature
cardinality, the split rule, dropped tasks by reason, the version of the id hash
(``id_hash``: ``gmeta.io.features.hash_ids``) and a sha256 of every shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gmeta.config import Config
from gmeta.io.errors import PrepareError
from gmeta.io.features import (
    ID_HASH,
    Cardinality,
    check_values,
    hash_batch,
    input_columns,
    salted_hash,
    shard_schema,
    stable_hash,
    task_uniform,
)
from gmeta.io.formats import parquet, webdataset
from gmeta.io.id_counts import DIR as ID_COUNTS
from gmeta.io.id_counts import IdCounts
from gmeta.io.manifest import FORMAT_VERSION, MANIFEST, content_hash, splits_of, write_index
from gmeta.io.partitions import TASK_IDS
from gmeta.io.sources import Batch, Source, SourceError, open_source, parse_number
from gmeta.io.split import DROP_REASONS, ROW_DROP_REASONS, chunk_tasks, split_tasks, warmup_splits
from gmeta.storage import check_bucket, is_url, location, rmtree, write_atomic

log = logging.getLogger(__name__)


class Partitions:
    """Rows bucketed by a hash of the task key: in memory when one bucket is enough, else
    spilled to one Parquet file per bucket (the external-partitioning pass)."""

    def __init__(self, count: int, tmp: Path, buffer_bytes: int) -> None:
        self.count, self.tmp, self.buffer_bytes = count, tmp, buffer_bytes
        self.mem: list[pa.Table] = []
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.pending: dict[int, list[pa.Table]] = {}
        self.pending_bytes = 0

    def add(self, table: pa.Table) -> None:
        if self.count == 1:
            self.mem.append(table)
            return
        bucket = (salted_hash(table.column("__key").to_numpy(zero_copy_only=False), "bucket")
                  % np.uint64(self.count)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.count + 1))
        for b in range(self.count):
            if bounds[b] == bounds[b + 1]:
                continue
            part = table.take(pa.array(order[bounds[b]: bounds[b + 1]]))
            self.pending.setdefault(b, []).append(part)
            self.pending_bytes += part.nbytes
        # Buffer rows per bucket up to a share of the memory cap, then write each bucket's
        # rows at once: few, large row groups instead of one tiny write per bucket and batch.
        if self.pending_bytes > self.buffer_bytes:
            self._spill()

    def _spill(self) -> None:
        for b, parts in sorted(self.pending.items()):
            part = pa.concat_tables(parts)
            if b not in self.writers:
                self.writers[b] = pq.ParquetWriter(self.path(b), part.schema)
            self.writers[b].write_table(part)
        self.pending.clear()
        self.pending_bytes = 0

    def path(self, bucket: int) -> Path:
        return self.tmp / f"bucket-{bucket:05d}.parquet"

    def files(self) -> dict[int, Path]:
        """Every non-empty bucket's file, complete (for other processes to read)."""
        if self.count == 1:
            if self.mem:
                pq.write_table(pa.concat_tables(self.mem), self.path(0))
            self.mem = []
            return {0: self.path(0)} if self.path(0).exists() else {}
        self._spill()
        for w in self.writers.values():
            w.close()
        return {b: self.path(b) for b in sorted(self.writers)}

    def buckets(self):
        for _, table in self.indexed_buckets():
            yield table

    def indexed_buckets(self):
        """(bucket index, its rows) for every non-empty bucket, in index order; a row's bucket
        is a function of its task key and the bucket count only."""
        if self.count == 1:
            if self.mem:
                yield 0, pa.concat_tables(self.mem)
            self.mem = []
            return
        for b, path in self.files().items():
            yield b, pq.read_table(path)
            pa.default_memory_pool().release_unused()


def _nested(rows: np.ndarray, lengths: np.ndarray, columns: dict[str, pa.Array]) -> pa.StructArray:
    """Gather ``rows`` of each column and nest them per task (``lengths`` rows per task)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    idx = pa.array(rows)
    children = {name: pa.ListArray.from_arrays(offsets, arr.take(idx)) for name, arr in columns.items()}
    return pa.StructArray.from_arrays(list(children.values()), names=list(children.keys()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ShardWriter:
    """Writes task records per split as they come, one *unit* (``tasks_per_row_group``
    tasks) at a time, so at most one unit per split is buffered.

    Parquet: a file takes ``tasks_per_shard // tasks_per_row_group`` units, one row group each.
    WebDataset: one tar per unit. Both formats thus have the same units in the same order,
    and a reader yields identical batches from either.
    """

    def __init__(self, out: Path, cfg: Config, schema: dict) -> None:
        self.out, self.cfg, self.schema = out, cfg, schema
        self.unit = cfg.data.tasks_per_row_group
        self.units_per_shard = max(1, cfg.data.tasks_per_shard // self.unit)
        self.splits = splits_of(cfg)
        self.pending: dict[str, list[pa.Table]] = {s: [] for s in self.splits}
        self.count = dict.fromkeys(self.splits, 0)
        self.written = dict.fromkeys(self.splits, 0)  # tasks written per split
        self.label_sum: dict[str, np.ndarray] = {s: np.zeros(len(cfg.features.label_names())) for s in self.splits}
        self.files: dict[str, list[dict]] = {s: [] for s in self.splits}
        self.open: dict[str, tuple[parquet.ShardWriter, Path, dict[str, Any]] | None] = dict.fromkeys(self.splits)
        for split in self.splits:
            d = out / split
            d.mkdir(parents=True, exist_ok=True)
            for old in [*d.glob("*.parquet"), *d.glob("*.tar"), *d.glob("*.tmp")]:
                old.unlink()

    def add(self, split: str, records: pa.Table) -> None:
        if records.num_rows == 0:
            return
        self.pending[split].append(records)
        self.count[split] += records.num_rows
        while self.count[split] >= self.unit:
            self._emit(split, self.unit)

    def _emit(self, split: str, n: int) -> None:
        table = pa.concat_tables(self.pending[split])
        unit, rest = table.slice(0, n), table.slice(n)
        self.pending[split] = [rest] if rest.num_rows else []
        self.count[split] = rest.num_rows
        u = self.written[split] // self.unit  # index of this unit in the split
        shard, within = divmod(u, self.units_per_shard)
        rows = {side: int(pc.sum(pc.list_value_length(unit.column(side).combine_chunks().field("label"))).as_py())
                for side in ("support", "query")}
        flat = [pc.list_flatten(unit.column(side).combine_chunks().field("label")) for side in ("support", "query")]
        if pa.types.is_fixed_size_list(flat[0].type):  # several labels: a sum per label
            width = len(self.label_sum[split])
            self.label_sum[split] += sum(np.asarray(f.flatten(), dtype=np.float64).reshape(-1, width).sum(axis=0)
                                         for f in flat)
        else:
            self.label_sum[split] += sum(float(pc.sum(f).as_py() or 0.0) for f in flat)
        if self.cfg.data.format == "webdataset":
            path = self.out / split / f"part-{shard:05d}-{within:04d}.tar"
            webdataset.write_tar(path, parquet.block_from_arrow(unit, str(path), self.schema),
                                 unit.column("task_key").to_pylist(), self.written[split], self.schema)
            self.files[split].append({"path": f"{split}/{path.name}", "tasks": n, "units": [n],
                                      "support_rows": rows["support"], "query_rows": rows["query"],
                                      "sha256": _sha256(path)})
        else:
            open_file = self.open[split]
            if open_file is None:
                path = self.out / split / f"part-{shard:05d}.parquet"
                entry: dict[str, Any] = {"path": f"{split}/{path.name}", "tasks": 0, "units": [], "support_rows": 0,
                                         "query_rows": 0}
                open_file = self.open[split] = (parquet.ShardWriter(path, unit.schema), path, entry)
            writer, path, entry = open_file
            writer.write_unit(unit)
            entry["tasks"] += n
            entry["units"].append(n)
            entry["support_rows"] += rows["support"]
            entry["query_rows"] += rows["query"]
            if within == self.units_per_shard - 1:
                self._close_file(split)
        self.written[split] += n

    def _close_file(self, split: str) -> None:
        open_file = self.open[split]
        if open_file is None:
            return
        writer, path, entry = open_file
        writer.close()
        entry["sha256"] = _sha256(path)
        self.files[split].append(entry)
        self.open[split] = None

    def _label_mean(self, split: str, rows: int) -> float | list[float] | None:
        """The mean label of a split's rows: one number, or one per label of ``features.labels``."""
        if not rows:
            return None
        means = (self.label_sum[split] / rows).tolist()
        return means[0] if len(means) == 1 else means

    def close(self) -> dict:
        for split in self.splits:
            if self.count[split]:
                self._emit(split, self.count[split])
            self._close_file(split)
        out = {}
        for split, files in self.files.items():
            rows = sum(f["support_rows"] + f["query_rows"] for f in files)
            out[split] = {"tasks": sum(f["tasks"] for f in files),
                          "support_rows": sum(f["support_rows"] for f in files),
                          "query_rows": sum(f["query_rows"] for f in files),
                          "label_mean": self._label_mean(split, rows), "files": files}
        return out


def _bucket_records(t: pa.Table, cfg: Config, dropped: dict[str, Any],
                    id_counts: IdCounts, tasks: TaskIndex | None = None) -> dict[str, pa.Table]:
    """All rows of some tasks -> their task records, per split, in a seeded order."""
    sp = cfg.data.split
    # rows of equal time in input order (__row): the order tie_break "input_order" keeps
    t = t.take(pc.sort_indices(t, sort_keys=[("__key", "ascending"), ("__ts", "ascending"), ("__row", "ascending")]))
    keys = t.column("__key").to_numpy(zero_copy_only=False)
    ts = t.column("__ts").to_numpy().astype(np.int64)
    task_start = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1]).astype(np.int64)
    counts = np.diff(np.concatenate([task_start, [len(keys)]]))
    task_keys = keys[task_start]
    task_hash = stable_hash(task_keys, "task")
    key_hash = task_hash  # of the task key: the task's id, unless it is chunked below
    if tasks is not None:
        tasks.add_input(key_hash)
    dropped["input_tasks"] += len(task_keys)
    # held-out tasks: a hash of the key, uniform in [0, 1): eval below eval_fraction, val
    # in the next val_fraction
    u = task_uniform(task_keys, sp.seed)
    split_of = np.where(u < sp.eval_fraction, "eval", np.where(u < sp.eval_fraction + sp.val_fraction, "val", "train"))
    if sp.rule == "warmup":  # by the id's row count: only cold ids are held out
        split_of = warmup_splits(cfg, counts, u)
    # order of tasks in the shards: a seeded hash of the key (another salt than the split's,
    # or the shards would be sorted by split), so it does not depend on how the input was
    # partitioned
    rank = salted_hash(task_keys, f"order{sp.seed}")
    if sp.long_train_tasks == "chunk":  # long training tasks -> several tasks; the chunks of one stay adjacent
        task_start, counts, new_hash, source = chunk_tasks(cfg, task_start, counts, task_hash, split_of == "train")
        pieces = np.bincount(source)
        dropped["chunked"]["tasks"] += int(np.count_nonzero(pieces > 1))
        dropped["chunked"]["into"] += int(pieces[pieces > 1].sum())
        task_keys, split_of, rank, task_hash = task_keys[source], split_of[source], rank[source], new_hash
        key_hash = key_hash[source]
    support_idx, query_idx, d = split_tasks(cfg, task_start, counts, ts, task_hash, held_out=split_of != "train")
    for kind in ("tasks", "rows"):
        for k, v in d[kind].items():
            dropped[kind][k] += v
    columns: dict[str, pa.Array] = {s.name: t.column(s.name).combine_chunks() for s in cfg.features.sparse}
    columns["dense"] = t.column("dense").combine_chunks()
    columns["label"] = t.column("__label").combine_chunks()
    if "true_prob" in t.column_names:
        columns["true_prob"] = t.column("true_prob").combine_chunks()
    columns["timestamp"] = pa.array(ts)
    out = {}
    for split in splits_of(cfg):
        sel = [i for i in np.argsort(rank, kind="stable").tolist()
               if support_idx[i] is not None and split_of[i] == split]
        if not sel:
            out[split] = pa.table({})
            continue
        s_len = np.array([len(support_idx[i]) for i in sel])
        q_len = np.array([len(query_idx[i]) for i in sel])

        out[split] = pa.table({
            "task_key": pa.array(task_keys[sel]),
            "task_id": pa.array(task_hash[sel].astype(np.int64)),
            "support": _nested(np.concatenate([support_idx[i] for i in sel]), s_len, columns),
            "query": _nested(np.concatenate([query_idx[i] for i in sel]), q_len, columns),
        })
        if tasks is not None:
            tasks.add(split, task_hash[sel], key_hash[sel])
        for side in ("support", "query"):  # occurrences of each id in the rows kept (views, no copy)
            struct = out[split].column(side).combine_chunks()
            for sf in cfg.features.sparse:
                ids = pc.list_flatten(struct.field(sf.name))
                if sf.multi_hot:
                    ids = pc.list_flatten(ids)
                id_counts.add(split, sf.name, ids.to_numpy(zero_copy_only=False))
    return out


def num_partitions(input_bytes: int, memory_mb: int) -> int:
    """Buckets so that one bucket's working set (about ``_EXPANSION`` times its decoded
    size: sort, gather, nesting) fits in the memory cap."""
    return max(1, -(-input_bytes * _EXPANSION // (memory_mb << 20)))


_EXPANSION = 20  # measured: peak Arrow + numpy bytes over decoded bucket bytes, with headroom
_BATCH_ROWS = 8192


def open_input(cfg: Config, input_path: Path) -> Source:
    """The raw input's reader (data.source.format), checked to hold every column the
    features need; errors name the input, the missing columns and the likely cause."""
    try:
        source = open_source(cfg, input_path)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    missing = [c for c in input_columns(cfg) if c not in source.names]
    if missing:
        hint = ""
        if any(parse_number(str(n)) is not None for n in source.names):
            hint = " (names that are numbers: the file seems to have no header; set data.source.column_names)"
        elif cfg.features.timestamp in missing and cfg.data.source.format in ("libsvm", "libfm"):
            hint = " (libSVM lines have no time: set features.timestamp: '' to take the line order as time order)"
        raise PrepareError(f"{input_path}: missing column(s) {missing} required by the config "
                           f"(features.*); columns present: {source.names[:40]}{hint}")
    return source


def stream_input(source: Source, columns: list[str], input_path: Path, each: Callable[[Batch, int], None]) -> int:
    """Call ``each(batch, first_row)`` on every batch of ``columns`` of the input, in input
    order (``first_row``: the batch's position in the input); returns the rows read. A read
    error, or an Arrow error in ``each``, names the file; an empty input is an error."""
    n = 0
    where = str(input_path)
    try:
        for batch in source.batches(columns):
            where = batch.where
            each(batch, n)
            n += batch.table.num_rows
    except SourceError as e:
        raise PrepareError(str(e)) from None
    except pa.ArrowException as e:
        raise PrepareError(f"{where}: cannot read: {e}") from None
    if n == 0:
        raise PrepareError(f"{input_path}: no rows")
    return n


def prepare(cfg: Config, input_path: str | Path, out_dir: str | Path, partition: str = "") -> dict:
    """Build task shards and the manifest within ``data.prepare_memory_mb``; return the manifest.
    ``partition``: write them as that partition of the partitioned data set ``out_dir``
    (:func:`prepare_partition`).

    Pass 1 streams the input in batches (checking values, hashing ids) into buckets by a
    hash of the task key, spilled to disk when the input is larger than the memory cap
    allows; pass 2 groups one bucket at a time into task records and writes the shards.
    """
    if partition:
        return prepare_partition(cfg, input_path, out_dir, partition)
    from gmeta.io import partitions as parts

    out = location(out_dir)
    if not is_url(out):
        parts.check_layout(out, None)
    return _prepare(cfg, input_path, out)


def prepare_partition(cfg: Config, input_path: str | Path, out_dir: str | Path, name: str) -> dict:
    """Write ``input_path`` as partition ``name`` of the partitioned data set ``out_dir``
    (``gmeta.io.partitions``): staged beside the other partitions and swapped in whole, so
    a failed prepare leaves the data set as it was and a re-prepared partition replaces
    only itself; then the index is rebuilt. Returns the partition's manifest."""
    from gmeta.io import partitions as parts

    parts.check_name(name)
    root = location(out_dir)
    if is_url(root):
        # (an object store has no rename: a partition could not be swapped in whole)
        raise PrepareError(f"{root}: partitions are written to a local or mounted filesystem (--out, "
                           "data.shards_dir); copy the data set to object storage after preparing it")
    parts.check_layout(root, name)
    (root / parts.DIR).mkdir(parents=True, exist_ok=True)
    parts.recover(root, name)
    staged = parts.staging_dir(root, name)
    if staged.exists():  # what a prepare of this partition that stopped left
        shutil.rmtree(staged)
    try:
        manifest = _prepare(cfg, input_path, staged, task_index=True)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    parts.install(root, name, staged)
    write_index(root)
    return manifest


class TaskIndex:
    """The tasks prepare wrote (id, split, hash of the task key) and the hash of every task
    key in its input, dropped ones included: a partition's ``task_ids.parquet``, from which
    the tasks new on a day are those whose key no earlier partition's input held."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.written: list[tuple[str, np.ndarray, np.ndarray]] = []

    def add_input(self, key_hash: np.ndarray) -> None:
        self.inputs.append(np.asarray(key_hash, dtype=np.uint64))

    def add(self, split: str, task_id: np.ndarray, key_hash: np.ndarray) -> None:
        self.written.append((split, np.asarray(task_id, dtype=np.uint64), np.asarray(key_hash, dtype=np.uint64)))

    def write(self, path: Path) -> None:
        """One row per written task (its split) and one per input key no task was written
        for (split "dropped", task_id null)."""
        ids = [w[1] for w in self.written]
        keys = [w[2] for w in self.written]
        splits = [np.full(len(w[1]), w[0]) for w in self.written]
        inputs = np.unique(np.concatenate(self.inputs)) if self.inputs else np.zeros(0, np.uint64)
        kept = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        lost = inputs[~np.isin(inputs, kept)]
        task_id = np.concatenate([*ids, np.zeros(len(lost), np.uint64)]).astype(np.int64)
        mask = np.concatenate([np.zeros(sum(len(i) for i in ids), bool), np.ones(len(lost), bool)])
        pq.write_table(pa.table({
            "task_id": pa.array(task_id, pa.int64(), mask=mask),
            "split": pa.array(np.concatenate([*splits, np.full(len(lost), "dropped")]).astype(str).tolist()
                              if len(task_id) else [], pa.string()),
            "key_hash": pa.array(np.concatenate([kept, lost]).astype(np.int64), pa.int64())}), path)


def _prepare(cfg: Config, input_path: str | Path, out: Path, task_index: bool = False) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    f = cfg.features
    input_path = location(input_path)
    check_bucket(out, "prepare --out (data.shards_dir)")
    source = open_input(cfg, input_path)
    # (dict.fromkeys: under data.split.rule warmup the task key is a sparse feature too)
    columns = list(dict.fromkeys(input_columns(cfg)))
    has_true_prob = bool(f.true_prob) and f.true_prob in source.names
    if has_true_prob:
        columns.append(f.true_prob)
    try:
        input_bytes, input_rows = source.estimate(columns)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    card = Cardinality(cfg)
    memory = (cfg.data.prepare_memory_mb << 20) - 2 * card.nbytes  # (and its temporaries)
    parts_n = num_partitions(input_bytes, max(1, memory >> 20))
    schema = shard_schema(cfg, has_true_prob)
    remote = is_url(out)
    if not remote:
        out.mkdir(parents=True, exist_ok=True)
    # what each bucket dropped and (data.split.long_train_tasks "chunk") cut, and its tasks
    dropped: dict[str, Any] = {"tasks": dict.fromkeys(DROP_REASONS, 0), "rows": dict.fromkeys(ROW_DROP_REASONS, 0),
                               "chunked": {"tasks": 0, "into": 0}, "input_tasks": 0}
    n_rows = 0
    show = sys.stderr.isatty()
    # buckets and staged shards: beside the output, or for an object store on local disk
    with tempfile.TemporaryDirectory(dir=None if remote else out, prefix=".prepare-") as tmp:
        parts = Partitions(parts_n, Path(tmp), max(1, memory) // 4)
        with tqdm(total=input_rows or None, unit="rows", desc="prepare: read", disable=not show) as bar:
            def add(batch: Batch, first_row: int) -> None:
                labels = check_values(batch.table, cfg, batch)
                parts.add(hash_batch(batch.table, cfg, card, batch.where, first_row=first_row, labels=labels,
                                      id_hash=ID_HASH))
                bar.update(batch.table.num_rows)

            n_rows = stream_input(source, columns, input_path, add)
        # shards are written beside the output and moved into place only when complete, so
        # a failed prepare leaves the shards and manifest of the last one as they were
        staging = Path(tmp) / "shards"
        writer = _ShardWriter(staging, cfg, schema)
        tasks = TaskIndex() if task_index else None
        id_counts = IdCounts([sf.name for sf in f.sparse], splits_of(cfg))
        for bucket in tqdm(parts.buckets(), total=parts_n, unit="bucket", desc="prepare: group", disable=not show):
            records = _bucket_records(bucket, cfg, dropped, id_counts, tasks)
            del bucket
            for split in records:
                writer.add(split, records[split])
        splits = writer.close()
        id_counts.write(staging)
        if tasks is not None:
            tasks.write(staging / TASK_IDS)
        input_tasks = int(dropped["input_tasks"])
        _check_splits(cfg, splits, dropped, input_tasks, input_path)
        cardinality = card.summary()
        for sf in f.sparse:  # managed: the training split's distinct ids against the slots, exact
            if sf.ids == "managed":
                train_ids = len(id_counts.counts(sf.name, "train")[0])
                cardinality[sf.name].update(train_distinct=train_ids, slots=sf.num_embeddings - 1,
                                            fits=train_ids <= sf.num_embeddings - 1)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "format": cfg.data.format,
            "input": str(input_path),
            "input_rows": int(n_rows),
            "input_tasks": input_tasks,
            "dropped_tasks": dropped["tasks"],
            # training tasks cut into several (data.split.long_train_tasks "chunk"), and into how many
            "chunked_tasks": dropped["chunked"],
            "rows": {"read": int(n_rows),
                     "written": {k: v["support_rows"] + v["query_rows"] for k, v in splits.items()},
                     "dropped": dropped["rows"]},
            "task_key": f.task_key,
            "source": cfg.data.source.format,
            "input_columns": {c: str(source.schema.field(c).type) for c in columns},  # raw types, for serving
            "schema": schema,
            "id_hash": ID_HASH,  # how the ids were hashed (features.hash_ids): serving hashes alike
            "cardinality": cardinality,
            "unseen": id_counts.unseen(),  # per feature and held-out split: shares new to the train split
            "split_rule": asdict(cfg.data.split),
            "partitions": parts_n,
            "splits": splits,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        written = sum(manifest["rows"]["written"].values()) + sum(dropped["rows"].values())
        if written != n_rows:  # every input row is written once or dropped for a reason
            raise AssertionError(f"prepare lost track of rows: read {n_rows}, written + dropped {written}")
        _install(staging, out, manifest)
    for name, c in cardinality.items():
        if c.get("ids") == "managed":
            if not c["fits"]:
                i = [s.name for s in f.sparse].index(name)
                log.warning("prepare: %s (ids: managed) has %s distinct ids in the train split for %s slots: the "
                            "eviction policy decides which hold a slot, the others share the miss row; raise "
                            "features.sparse[%d].num_embeddings (%s) to give each its own", name,
                            f"{c['train_distinct']:,}", f"{c['slots']:,}", i, name)
            continue
        if c["colliding_share"] > cfg.data.collision_warn_share:
            i = [s.name for s in f.sparse].index(name)
            log.warning("prepare: %.1f%% of the ids of %s share their table row with another id (%s distinct "
                        "raw ids in %d rows%s); raise features.sparse[%d].num_embeddings (%s), or "
                        "data.collision_warn_share to accept it", 100 * c["colliding_share"], name,
                        f"{c['distinct_raw']:,}" + ("" if c["distinct_raw_exact"] else " (estimated)"),
                        c["num_embeddings"], "" if c["colliding_share_exact"] else ", expected share", i, name)
    return manifest


def _check_splits(cfg: Config, splits: dict, dropped: dict, input_tasks: int, input_path: Path) -> None:
    """No training task is an error, an empty held-out split a warning; both say what
    emptied them (the split rule and the drop counts)."""
    sp = cfg.data.split
    rule = (f"data.split.rule {sp.rule}" + (f", tie_break {sp.tie_break}" if sp.rule in ("time", "warmup") else "")
            + (f", warmup_train_rows {sp.warmup_train_rows}, warmup_rows {sp.warmup_rows}" if sp.rule == "warmup"
               else "")
            + f", min_support {sp.min_support}, min_query {sp.min_query}"
            + (f", query_size {sp.query_size}" if sp.query_size else f", support_ratio {sp.support_ratio}")
            + (f", min_task_rows {sp.min_task_rows}" if sp.min_task_rows else "")
            + (f", max_task_rows {sp.max_task_rows}" if sp.max_task_rows else ""))
    drops = ", ".join(f"{k} {v}" for k, v in dropped["tasks"].items() if v) or "none"
    if not splits["train"]["tasks"]:
        raise PrepareError(f"{input_path}: split 'train' has 0 tasks: of {input_tasks} task(s) "
                           f"({cfg.features.task_key}), dropped {drops}; held out: "
                           + ", ".join(f"{k} {v['tasks']}" for k, v in splits.items() if k != "train")
                           + f" ({rule}). Nothing was written.")
    for name, frac in (("eval", sp.eval_fraction), ("val", sp.val_fraction)):
        if name in splits and frac > 0 and not splits[name]["tasks"]:
            log.warning("prepare: split %r has 0 tasks (data.split.%s_fraction %g of %d kept task(s); dropped %s; "
                        "%s)", name, name, frac, sum(v["tasks"] for v in splits.values()), drops, rule)


def _install(staging: Path, out: Path, manifest: dict) -> None:
    """Move the staged split directories into ``out`` (upload them to an object store) and
    write the manifest last. The old manifest goes first, so a crash in between leaves no
    manifest that names missing shards."""
    old_manifest = out / MANIFEST
    if old_manifest.exists():
        old_manifest.unlink()
    if is_url(out):
        for split in ("train", "eval", "val", ID_COUNTS):
            rmtree(out / split)
            if (staging / split).exists():
                out.fs.put(str(staging / split), (out / split).path, recursive=True)  # type: ignore[attr-defined]
        write_atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
        return
    for split in ("train", "eval", "val", ID_COUNTS, TASK_IDS):
        target = out / split
        if target.exists():
            trash = staging.parent / f"old-{split}"
            target.replace(trash)
        if (staging / split).exists():
            (staging / split).replace(target)
    tmp_manifest = out / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    tmp_manifest.replace(out / MANIFEST)


def format_report(m: dict) -> str:
    """What prepare read, wrote and dropped, as printed by ``gmeta prepare``."""
    rows, splits = m["rows"], m["splits"]
    lines = [f"prepare: read {rows['read']:,} rows of {m['input_tasks']:,} tasks from {m['input']} "
             f"({m['source']}) in {m['seconds']:.1f}s"]
    lines.append("  written: " + "; ".join(f"{k} {v['tasks']:,} tasks, {rows['written'][k]:,} rows "
                                            f"({v['support_rows']:,} support + {v['query_rows']:,} query)"
                                            for k, v in splits.items()))
    dropped = [f"{k} {rows['dropped'][k]:,} rows" + (f" / {m['dropped_tasks'][k]:,} tasks" if k in m["dropped_tasks"]
                                                        else "")
               for k in rows["dropped"] if rows["dropped"][k]]
    lines.append("  dropped: " + ("; ".join(dropped) if dropped else "none"))
    chunked = m.get("chunked_tasks", {})
    if chunked.get("tasks"):
        lines.append(f"  chunked: {chunked['tasks']:,} long training tasks cut into {chunked['into']:,} tasks "
                     "(data.split.long_train_tasks chunk)")
    lines.append("  ids (distinct raw -> table rows used / table size, rows whose id collides):")
    for name, c in m["cardinality"].items():
        raw = f"{c['distinct_raw']:,}" + ("" if c["distinct_raw_exact"] else "~")
        if c.get("ids") == "managed":
            lines.append(f"    {name}: managed, {c['train_distinct']:,} distinct ids in the train split for "
                         f"{c['slots']:,} slots + 1 miss row: "
                         + ("each its own row" if c["fits"] else "the eviction policy chooses"))
            continue
        used = f"{c['distinct_hashed']:,}" if c["distinct_hashed"] is not None else "?"
        share = f"{100 * c['colliding_share']:.2f}%" + ("" if c["colliding_share_exact"] else " (expected)")
        lines.append(f"    {name}: {raw} -> {used} / {c['num_embeddings']:,}, {share}")
    unseen = m.get("unseen", {})
    if unseen:
        lines.append("  ids new to the train split (share of distinct ids / of occurrences):")
        for name, per in unseen.items():
            lines.append(f"    {name}: " + "; ".join(f"{s} {100 * v['ids']:.1f}% / {100 * v['occurrences']:.1f}%"
                                                   for s, v in per.items()))
    lines.append(f"  manifest content hash: {content_hash(m)} (checkpoints record it; evaluate, predict and "
                 "resume compare it)")
    return "\n".join(lines)
