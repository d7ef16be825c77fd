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
    label              list<float32>
    true_prob          list<float32>          only when the input has it
    timestamp          list<int64>

Shards go to ``OUT/train/`` and ``OUT/eval/`` (held-out cold-start tasks, chosen by a hash
of the task key). ``OUT/manifest.json`` records the schema, task and row counts, per-feature
cardinality, the split rule, dropped tasks by reason and a sha256 of every shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gmeta.config import Config
from gmeta.io.sources import SourceError, open_source, split_field

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-file "units" (row groups / tars) for the streaming reader
SPLITS = ("train", "eval")


class PrepareError(ValueError):
    """The raw input cannot be turned into task shards. The message names file and column."""


def stable_hash(values: np.ndarray, salt: str) -> np.ndarray:
    """Deterministic uint64 hash of ids or strings (pandas' SipHash-based ``hash_array``;
    Python's ``hash`` is salted per process and numpy has none)."""
    key = (salt + "0" * 16)[:16]
    return pd.util.hash_array(np.asarray(values), hash_key=key, categorize=False)


def hash_ids(values: np.ndarray, feature: str, num_embeddings: int) -> np.ndarray:
    return (stable_hash(values, feature) % np.uint64(num_embeddings)).astype(np.int64)


def shard_schema(cfg: Config, has_true_prob: bool) -> dict:
    """The schema of task records (in the manifest; what the reader and collation expect)."""
    return {"sparse": [asdict(s) for s in cfg.features.sparse], "dense": list(cfg.features.dense),
            "has_true_prob": has_true_prob, "objective": cfg.model.objective}


def input_columns(cfg: Config) -> list[str]:
    """The raw columns the config reads (task key, timestamp if any, label, features)."""
    f = cfg.features
    return [f.task_key] + ([f.timestamp] if f.timestamp else []) + [f.label] + [s.name for s in f.sparse] \
        + list(f.dense)


def _check_values(table: pa.Table, cfg: Config, where: str) -> None:
    """Nulls, non-numeric or non-finite values, labels other than 0/1 (binary objective):
    an error naming the file and column (and the first bad row of the file's batch)."""
    f = cfg.features
    fill = cfg.data.source.fill_missing
    must = [f.task_key, f.label] + ([f.timestamp] if f.timestamp else [])
    for name in must + ([] if fill else [s.name for s in f.sparse]):
        nulls = table.column(name).null_count
        if nulls:
            hint = "" if name in must else " (data.source.fill_missing: true maps them to a 'missing' id)"
            raise PrepareError(f"{where}: column {name!r} has {nulls} null value(s){hint}")
    for name in [f.label] + list(f.dense) + ([f.true_prob] if f.true_prob in table.column_names else []):
        col = table.column(name)
        if not pa.types.is_integer(col.type) and not pa.types.is_floating(col.type) and not pa.types.is_null(col.type):
            raise PrepareError(f"{where}: column {name!r} must be numeric, got {col.type}")
        if fill and name in f.dense:
            col = _zero_filled(col)
        elif col.null_count:
            hint = " (data.source.fill_missing: true reads them as 0)" if name in f.dense else ""
            raise PrepareError(f"{where}: column {name!r} has {col.null_count} null value(s){hint}")
        arr = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = ~np.isfinite(arr)
        if bad.any():
            raise PrepareError(f"{where}: column {name!r} has {int(bad.sum())} NaN/inf value(s)"
                               f" (first at row {int(np.argmax(bad))} of the batch)")
    if cfg.model.objective == "binary":
        lab = table.column(f.label).to_numpy().astype(np.float64)
        if not np.isin(lab, (0.0, 1.0)).all():
            bad = np.flatnonzero(~np.isin(lab, (0.0, 1.0)))[0]
            raise PrepareError(f"{where}: column {f.label!r} (features.label) must be 0 or 1 for "
                               f"model.objective binary, got {lab[bad]:g} at row {bad} of the batch "
                               "(set model.objective: regression to predict the value itself)")
    if f.timestamp:
        ts_type = table.column(f.timestamp).type
        if not (pa.types.is_integer(ts_type) or pa.types.is_timestamp(ts_type)):
            raise PrepareError(f"{where}: column {f.timestamp!r} (features.timestamp) must be an integer or "
                               f"timestamp, got {ts_type}")


class _Cardinality:
    """Distinct ids per feature: exact after hashing (a bitmap of the table), and before
    hashing exact up to 4096 distinct values, a k-minimum-values estimate beyond (so memory
    stays bounded however many distinct raw ids the input has)."""

    K = 4096

    def __init__(self, cfg: Config) -> None:
        self.features = cfg.features.sparse
        self.seen = {s.name: np.zeros(s.num_embeddings, dtype=bool) if s.num_embeddings <= (1 << 28) else None
                     for s in self.features}
        self.kmv = {s.name: np.zeros(0, dtype=np.uint64) for s in self.features}

    def add(self, name: str, raw: np.ndarray, hashed: np.ndarray) -> None:
        if self.seen[name] is not None:
            self.seen[name][hashed] = True
        h = np.unique(np.concatenate([self.kmv[name], stable_hash(raw, "kmv")]))
        self.kmv[name] = h[: self.K]

    def summary(self) -> dict[str, dict]:
        out = {}
        for s in self.features:
            h = self.kmv[s.name]
            if len(h) < self.K:
                raw, exact = len(h), True
            else:  # (k - 1) / (k-th smallest hash as a fraction of the hash space)
                raw, exact = int(round((self.K - 1) / (float(h[-1]) / 2.0**64))), False
            seen = self.seen[s.name]
            out[s.name] = {"num_embeddings": s.num_embeddings, "distinct_raw": raw, "distinct_raw_exact": exact,
                           "distinct_hashed": int(seen.sum()) if seen is not None else None,
                           "multi_hot": s.multi_hot, "pooling": s.pooling}
        return out


_MISSING = "\x00missing"  # the raw value a missing id hashes as (data.source.fill_missing)


def row_times(table: pa.Table, cfg: Config, first_row: int = 0) -> pa.Array:
    """Time of each row as int64: features.timestamp, or (no timestamp column) the row's
    position in the input, ``first_row`` being the position of the table's first row."""
    if cfg.features.timestamp:
        return table.column(cfg.features.timestamp).combine_chunks().cast(pa.int64())
    return pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))


def _zero_filled(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A dense column with its missing values as 0 (data.source.fill_missing)."""
    if not col.null_count:
        return col
    return pa.array(np.zeros(len(col))) if pa.types.is_null(col.type) else pc.fill_null(col, 0)


def _dense_matrix(table: pa.Table, cfg: Config) -> np.ndarray:
    # nulls only with data.source.fill_missing: _check_values refuses them otherwise
    cols = [np.asarray(_zero_filled(table.column(c)).to_numpy(zero_copy_only=False), dtype=np.float32)
            for c in cfg.features.dense]
    dense = np.stack(cols, axis=1)
    if cfg.features.dense_transform == "log1p":
        dense = np.sign(dense) * np.log1p(np.abs(dense))
    return dense


_INTEGER = r"^-?[0-9]{1,18}$"  # a text token that is an int64


def _hash_ids(col: pa.Array, name: str, num_embeddings: int, tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(raw ids, hashed ids) of a flat id column. A null (data.source.fill_missing) and an
    empty string get the id of the 'missing' value. ``tokens``: ids split out of a text
    field, where a token that is an integer hashes as that integer (as the same id does
    from a list<int64> column), decided token by token so that it does not depend on which
    other rows were read together."""
    if pa.types.is_large_string(col.type):
        col = col.cast(pa.string())
    text = pa.types.is_string(col.type)
    valid = None  # None: every id present (the common case, no mask built)
    if col.null_count or (text and pc.any(pc.equal(col, "")).as_py()):
        valid = col.is_valid()
        if text:
            valid = pc.fill_null(pc.and_kleene(valid, pc.not_equal(col, "")), False)
        valid = np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool)
        col = col.filter(pa.array(valid))
    raw = col.to_numpy(zero_copy_only=False)
    numeric = None
    if tokens and text:
        numeric = np.asarray(pc.match_substring_regex(col, _INTEGER).to_numpy(zero_copy_only=False), dtype=bool)
    if numeric is None or not numeric.any():
        hashed = hash_ids(raw, name, num_embeddings)
    else:
        hashed = np.empty(len(raw), dtype=np.int64)
        hashed[numeric] = hash_ids(raw[numeric].astype(np.int64), name, num_embeddings)
        hashed[~numeric] = hash_ids(raw[~numeric], name, num_embeddings)
    if valid is None:
        return raw, hashed
    out = np.full(len(valid), hash_ids(np.array([_MISSING], dtype=object), name, num_embeddings)[0])
    out[valid] = hashed
    return raw, out


def _hash_batch(table: pa.Table, cfg: Config, card: _Cardinality | None, where: str,
                first_row: int = 0) -> pa.Table:
    """Raw batch -> the columns prepare keeps, sparse ids hashed into their tables
    (``first_row``: the batch's position in the input, the time of rows without a timestamp)."""
    f = cfg.features
    cols: dict[str, pa.Array] = {
        "__key": table.column(f.task_key).combine_chunks(),
        "__ts": row_times(table, cfg, first_row),
        "__label": pa.array(table.column(f.label).to_numpy().astype(np.float32)),
    }
    sep = cfg.data.source.multi_hot_separator
    for s in f.sparse:
        col = table.column(s.name).combine_chunks()
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        if s.multi_hot and text:  # CSV: ids joined by a separator
            col = split_field(col.cast(pa.string()), sep)
        is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
        if s.multi_hot != is_list:
            kind = "a list column (or '|'-separated ids in CSV)" if s.multi_hot else "a scalar column"
            raise PrepareError(f"{where}: column {s.name!r} must be {kind} "
                               f"(features.sparse multi_hot={s.multi_hot}), got {col.type}")
        if s.multi_hot:
            if col.null_count:  # a missing list: no ids (pooled to zeros)
                if not cfg.data.source.fill_missing:
                    raise PrepareError(f"{where}: column {s.name!r} has {col.null_count} null value(s) "
                                       "(data.source.fill_missing: true reads them as empty lists)")
                col = pc.fill_null(col, pa.scalar([], col.type))
            items = col.flatten()
            if items.null_count and not cfg.data.source.fill_missing:
                raise PrepareError(f"{where}: column {s.name!r} has null ids inside its lists")
            raw, hashed = _hash_ids(items, s.name, s.num_embeddings, tokens=text)
            off = col.offsets.to_numpy().astype(np.int64)
            cols[s.name] = pa.ListArray.from_arrays(pa.array((off - off[0]).astype(np.int32)), pa.array(hashed))
        else:
            raw, hashed = _hash_ids(col, s.name, s.num_embeddings)
            cols[s.name] = pa.array(hashed)
        if card is not None:
            card.add(s.name, raw, hashed)
    dense = _dense_matrix(table, cfg)
    cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), len(f.dense))
    if f.true_prob and f.true_prob in table.column_names:
        cols["true_prob"] = pa.array(table.column(f.true_prob).to_numpy().astype(np.float32))
    return pa.table(cols)


class _Partitions:
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
        bucket = (stable_hash(table.column("__key").to_numpy(zero_copy_only=False), "bucket")
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
                self.writers[b] = pq.ParquetWriter(self.tmp / f"bucket-{b:05d}.parquet", part.schema)
            self.writers[b].write_table(part)
        self.pending.clear()
        self.pending_bytes = 0

    def buckets(self):
        if self.count == 1:
            if self.mem:
                yield pa.concat_tables(self.mem)
            self.mem = []
            return
        self._spill()
        for w in self.writers.values():
            w.close()
        for b in sorted(self.writers):
            yield pq.read_table(self.tmp / f"bucket-{b:05d}.parquet")
            pa.default_memory_pool().release_unused()


def _split_tasks(cfg: Config, task_start: np.ndarray, counts: np.ndarray, ts: np.ndarray,
                 task_hash: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Per task, support and query row indices (into the task-sorted table); None for a
    dropped task. The ratio rule draws each task's split from (seed, task), so the result
    does not depend on which other tasks were prepared together."""
    sp = cfg.data.split
    support_idx, query_idx = [], []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for start, n, th in zip(task_start.tolist(), counts.tolist(), task_hash.tolist()):
        too = "too_few_rows" if n < sp.min_task_rows else "too_many_rows" if 0 < sp.max_task_rows < n else ""
        if too:
            dropped[too] += 1
            support_idx.append(None)
            query_idx.append(None)
            continue
        rows = np.arange(start, start + n)
        n_s = n - sp.query_size if sp.query_size else int(round(n * sp.support_ratio))
        n_s = min(max(n_s, 0), n)
        if sp.rule == "time":
            # Support strictly earlier than query: move the boundary before any tie. (With a
            # fixed query size, ties keep the input order: the query must have query_size rows.)
            while not sp.query_size and 0 < n_s < n and ts[start + n_s - 1] == ts[start + n_s]:
                n_s -= 1
            s_rows, q_rows = rows[:n_s], rows[n_s:]
            s_rows = s_rows[-sp.max_support:]  # the most recent rows before the boundary
        else:
            perm = np.random.default_rng([sp.seed, th]).permutation(rows)
            s_rows, q_rows = np.sort(perm[:n_s])[: sp.max_support], np.sort(perm[n_s:])
        q_rows = q_rows[: sp.max_query]
        if len(s_rows) < sp.min_support:
            dropped["support_too_small"] += 1
            support_idx.append(None)
            query_idx.append(None)
            continue
        if len(q_rows) < sp.min_query:
            dropped["query_too_small"] += 1
            support_idx.append(None)
            query_idx.append(None)
            continue
        support_idx.append(s_rows)
        query_idx.append(q_rows)
    return support_idx, query_idx, dropped


DROP_REASONS = ("too_few_rows", "too_many_rows", "support_too_small", "query_too_small")


def splits_of(cfg: Config) -> tuple[str, ...]:
    """Shard splits prepare writes: train, eval (test), and val if data.split.val_fraction."""
    return SPLITS + (("val",) if cfg.data.split.val_fraction > 0 else ())


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
        self.label_sum = dict.fromkeys(self.splits, 0.0)
        self.files: dict[str, list[dict]] = {s: [] for s in self.splits}
        self.open: dict[str, tuple | None] = dict.fromkeys(self.splits)
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
        self.label_sum[split] += sum(float(pc.sum(pc.list_flatten(unit.column(side).combine_chunks().field("label")))
                                           .as_py() or 0.0) for side in ("support", "query"))
        if self.cfg.data.format == "webdataset":
            from gmeta.io.blocks import block_from_arrow
            from gmeta.io.wds import write_tar

            path = self.out / split / f"part-{shard:05d}-{within:04d}.tar"
            write_tar(path, block_from_arrow(unit, str(path), self.schema), unit.column("task_key").to_pylist(),
                      self.written[split], self.schema)
            self.files[split].append({"path": f"{split}/{path.name}", "tasks": n, "units": [n],
                                      "support_rows": rows["support"], "query_rows": rows["query"],
                                      "sha256": _sha256(path)})
        else:
            if self.open[split] is None:
                path = self.out / split / f"part-{shard:05d}.parquet"
                tmp = path.with_name(path.name + ".tmp")
                entry = {"path": f"{split}/{path.name}", "tasks": 0, "units": [], "support_rows": 0, "query_rows": 0}
                self.open[split] = (pq.ParquetWriter(tmp, unit.schema), path, entry)
            writer, path, entry = self.open[split]
            writer.write_table(unit, row_group_size=n)
            entry["tasks"] += n
            entry["units"].append(n)
            entry["support_rows"] += rows["support"]
            entry["query_rows"] += rows["query"]
            if within == self.units_per_shard - 1:
                self._close_file(split)
        self.written[split] += n

    def _close_file(self, split: str) -> None:
        if self.open[split] is None:
            return
        writer, path, entry = self.open[split]
        writer.close()
        path.with_name(path.name + ".tmp").replace(path)
        entry["sha256"] = _sha256(path)
        self.files[split].append(entry)
        self.open[split] = None

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
                          "label_mean": self.label_sum[split] / rows if rows else None, "files": files}
        return out


def _bucket_records(t: pa.Table, cfg: Config, dropped: dict[str, int]) -> dict[str, pa.Table]:
    """All rows of some tasks -> their task records, per split, in a seeded order."""
    sp = cfg.data.split
    t = t.take(pc.sort_indices(t, sort_keys=[("__key", "ascending"), ("__ts", "ascending")]))
    keys = t.column("__key").to_numpy(zero_copy_only=False)
    ts = t.column("__ts").to_numpy().astype(np.int64)
    task_start = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1]).astype(np.int64)
    counts = np.diff(np.concatenate([task_start, [len(keys)]]))
    task_keys = keys[task_start]
    task_hash = stable_hash(task_keys, "task")
    support_idx, query_idx, d = _split_tasks(cfg, task_start, counts, ts, task_hash)
    for k, v in d.items():
        dropped[k] += v
    # held-out tasks: a hash of the key, uniform in [0, 1): eval below eval_fraction, val
    # in the next val_fraction
    u = (stable_hash(task_keys, f"split{sp.seed}") >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    split_of = np.where(u < sp.eval_fraction, "eval", np.where(u < sp.eval_fraction + sp.val_fraction, "val", "train"))
    # order of tasks in the shards: a seeded hash of the key, so it does not depend on how
    # the input was partitioned
    rank = stable_hash(task_keys, f"order{sp.seed}")
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
    return out


def num_partitions(input_bytes: int, memory_mb: int) -> int:
    """Buckets so that one bucket's working set (about ``_EXPANSION`` times its decoded
    size: sort, gather, nesting) fits in the memory cap."""
    return max(1, -(-input_bytes * _EXPANSION // (memory_mb << 20)))


_EXPANSION = 20  # measured: peak Arrow + numpy bytes over decoded bucket bytes, with headroom
_BATCH_ROWS = 8192


def prepare(cfg: Config, input_path: str | Path, out_dir: str | Path) -> dict:
    """Build task shards and the manifest within ``data.prepare_memory_mb``; return the manifest.

    Pass 1 streams the input in batches (checking values, hashing ids) into buckets by a
    hash of the task key, spilled to disk when the input is larger than the memory cap
    allows; pass 2 groups one bucket at a time into task records and writes the shards.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    f = cfg.features
    input_path, out = Path(input_path), Path(out_dir)
    try:
        source = open_source(cfg, input_path)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    columns = input_columns(cfg)
    missing = [c for c in columns if c not in source.names]
    if missing:
        raise PrepareError(f"{input_path}: missing column(s) {missing} required by the config "
                           f"(features.*); columns present: {source.names}")
    has_true_prob = bool(f.true_prob) and f.true_prob in source.names
    if has_true_prob:
        columns.append(f.true_prob)
    try:
        input_bytes, input_rows = source.estimate(columns)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    parts_n = num_partitions(input_bytes, cfg.data.prepare_memory_mb)
    schema = shard_schema(cfg, has_true_prob)
    out.mkdir(parents=True, exist_ok=True)
    card = _Cardinality(cfg)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    n_rows = 0
    task_keys_seen = 0
    show = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as tmp:
        parts = _Partitions(parts_n, Path(tmp), (cfg.data.prepare_memory_mb << 20) // 4)
        with tqdm(total=input_rows or None, unit="rows", desc="prepare: read", disable=not show) as bar:
            where = str(input_path)
            try:
                for where, table in source.batches(columns):
                    _check_values(table, cfg, where)
                    parts.add(_hash_batch(table, cfg, card, where, first_row=n_rows))
                    n_rows += table.num_rows
                    bar.update(table.num_rows)
            except SourceError as e:
                raise PrepareError(str(e)) from None
            except pa.ArrowException as e:
                raise PrepareError(f"{where}: cannot read: {e}") from None
        if n_rows == 0:
            raise PrepareError(f"{input_path}: no rows")
        writer = _ShardWriter(out, cfg, schema)
        for bucket in tqdm(parts.buckets(), total=parts_n, unit="bucket", desc="prepare: group", disable=not show):
            records = _bucket_records(bucket, cfg, dropped)
            task_keys_seen += sum(r.num_rows for r in records.values())
            del bucket
            for split in records:
                writer.add(split, records[split])
        splits = writer.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "format": cfg.data.format,
        "input": str(input_path),
        "input_rows": int(n_rows),
        "input_tasks": int(task_keys_seen + sum(dropped.values())),
        "dropped_tasks": dropped,
        "task_key": f.task_key,
        "source": cfg.data.source.format,
        "input_columns": {c: str(source.schema.field(c).type) for c in columns},  # raw types, for serving
        "schema": schema,
        "cardinality": card.summary(),
        "split_rule": asdict(cfg.data.split),
        "partitions": parts_n,
        "splits": splits,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    tmp_manifest = out / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    tmp_manifest.replace(out / MANIFEST)
    log.info("prepare: %d rows, %d tasks -> %s (dropped %s, %d partition(s)) in %.1fs", n_rows,
             manifest["input_tasks"], ", ".join(f"{k} {v['tasks']}" for k, v in splits.items()), dropped, parts_n,
             manifest["seconds"])
    return manifest


def load_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise PrepareError(f"{path}: not found; run `gmeta prepare` first (data.shards_dir)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: not valid JSON: {e}") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise PrepareError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}; "
                           "prepare the shards again with this version of gmeta")
    return m


def check_manifest_matches(manifest: dict, cfg: Config, path: str) -> None:
    """The shards must have been prepared with the features the config declares."""
    want = [asdict(s) for s in cfg.features.sparse]
    got = manifest["schema"]["sparse"]
    if want != got:
        raise PrepareError(f"{path}: sparse features {got} differ from the config's features.sparse {want};"
                           " prepare the shards again with this config")
    if manifest["schema"]["dense"] != list(cfg.features.dense):
        raise PrepareError(f"{path}: dense features {manifest['schema']['dense']} differ from the config's "
                           f"features.dense {list(cfg.features.dense)}")
    objective = manifest["schema"].get("objective", "binary")
    if objective != cfg.model.objective:
        raise PrepareError(f"{path}: shards prepared for model.objective {objective!r} (labels checked for it), "
                           f"the config has {cfg.model.objective!r}; prepare the shards again with this config")
