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
from gmeta.io.sources import Batch, SourceError, open_source, parse_number, split_field

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


def _salt64(salt: str) -> np.uint64:
    return stable_hash(np.array([salt], dtype=object), "salt")[0]


def salted_hash(values: np.ndarray, salt: str) -> np.ndarray:
    """Like ``stable_hash``, but the salt changes the hash of numbers too: pandas'
    ``hash_array`` applies its key to strings only, so integer task keys hashed alike under
    every salt (the held-out split ignored ``data.split.seed``, and split, shard order and
    partitions were one hash). Numbers are mixed twice with the salt in between (the
    finaliser of ``hash_array`` is a bijection of uint64 with full avalanche). Strings hash
    as ``stable_hash``. Used for task-level choices; ids keep ``stable_hash`` so that
    checkpoints and shards written before stay valid."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "iub":
        return stable_hash(arr, salt)
    x = arr.astype(np.int64).view(np.uint64) if arr.dtype.kind != "u" else arr.astype(np.uint64)
    s = _salt64(salt)
    with np.errstate(over="ignore"):
        y = pd.util.hash_array(x ^ s, categorize=False)
        return pd.util.hash_array(y + s, categorize=False)


def task_uniform(task_keys: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per task key, a pure function of (key, seed): the
    held-out split compares it with eval_fraction and val_fraction."""
    return (salted_hash(task_keys, f"split{seed}") >> np.uint64(11)).astype(np.float64) / float(1 << 53)


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


def _locator(where) -> callable:
    """``where`` as a function of a batch row: a Batch's own, or ``"<where>: row i"``."""
    if isinstance(where, Batch):
        return where.locate
    return lambda i: f"{where}: row {i}"


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _first_null(col: pa.ChunkedArray | pa.Array) -> int:
    return _first(~np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool))


def binary_labels(col: pa.ChunkedArray | pa.Array, cfg: Config, where) -> np.ndarray:
    """The label column as float32 0/1 (``model.objective: binary``): 0/1 numbers or
    booleans as they are, other encodings through ``features.positive_labels`` /
    ``negative_labels``. A value that is neither is an error naming the file and line."""
    f = cfg.features
    at = _locator(where)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_boolean(col.type) and not f.positive_labels:
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32)
    if f.positive_labels:
        out = np.full(len(col), np.nan, dtype=np.float32)
        if pa.types.is_boolean(col.type):
            col = col.cast(pa.string())  # "true" / "false", as the config's booleans read
        numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
        if numeric:
            shown = num = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        else:
            shown = np.asarray(pc.utf8_trim_whitespace(col.cast(pa.string())).to_numpy(zero_copy_only=False),
                               dtype=object)
            num = pd.to_numeric(pd.Series(shown), errors="coerce").to_numpy(dtype=np.float64)
        for values, y in ((f.positive_labels, 1.0), (f.negative_labels, 0.0)):
            nums = [x for x in map(parse_number, values) if x is not None]
            out[np.isin(num, nums)] = y  # numbers as numbers: "+1" and 1.0 are 1 (NaN matches nothing)
            if not numeric:
                out[np.isin(shown, [v.strip() for v in values])] = y
        bad = np.isnan(out)
        if bad.any():
            i = _first(bad)
            raise PrepareError(f"{at(i)}: label {shown[i]!r} (column {f.label!r}) is in neither "
                               f"features.positive_labels {list(f.positive_labels)} nor features.negative_labels "
                               f"{list(f.negative_labels)}")
        return out
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        i = 0
        raise PrepareError(f"{at(i)}: column {f.label!r} (features.label) holds {col.type} values such as "
                           f"{col[i].as_py()!r}; binary labels must be 0/1 or booleans, or be mapped with "
                           "features.positive_labels and features.negative_labels")
    lab = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isin(lab, (0.0, 1.0))
    if bad.any():
        i = _first(bad)
        hint = (" (for -1/+1 labels set features.positive_labels: [1] and features.negative_labels: [-1])"
                if lab[i] == -1 else "")
        raise PrepareError(f"{at(i)}: column {f.label!r} (features.label) must be 0 or 1 for model.objective "
                           f"binary, got {lab[i]:g}{hint}; set model.objective: regression to predict the value "
                           "itself")
    return lab.astype(np.float32)


def _check_values(table: pa.Table, cfg: Config, where) -> np.ndarray:
    """Nulls, non-numeric or non-finite values, labels the objective cannot take: an error
    naming the file and line (``where``: a Batch, or a name for rows without lines).
    Returns the labels as float32 (binary ones mapped to 0/1)."""
    f = cfg.features
    at = _locator(where)
    fill = cfg.data.source.fill_missing
    must = [f.task_key, f.label] + ([f.timestamp] if f.timestamp else [])
    for name in must + ([] if fill else [s.name for s in f.sparse]):
        col = table.column(name)
        if col.null_count:
            hint = "" if name in must else " (data.source.fill_missing: true maps them to a 'missing' id)"
            i = _first_null(col)
            raise PrepareError(f"{at(i)}: column {name!r} has a null value ({col.null_count} in this batch){hint}")
    numeric = list(f.dense) + ([f.true_prob] if f.true_prob in table.column_names else [])
    if cfg.model.objective == "regression":
        numeric.insert(0, f.label)
    for name in numeric:
        col = table.column(name)
        if not pa.types.is_integer(col.type) and not pa.types.is_floating(col.type) and not pa.types.is_null(col.type):
            raise PrepareError(f"{at(0)}: column {name!r} must be numeric, got {col.type} such as "
                               f"{col[0].as_py()!r}")
        if fill and name in f.dense:
            col = _zero_filled(col)
        elif col.null_count:
            hint = " (data.source.fill_missing: true reads them as 0)" if name in f.dense else ""
            i = _first_null(col)
            raise PrepareError(f"{at(i)}: column {name!r} has a null value ({col.null_count} in this batch){hint}")
        arr = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = ~np.isfinite(arr)
        if bad.any():
            raise PrepareError(f"{at(_first(bad))}: column {name!r} has a NaN/inf value "
                               f"({int(bad.sum())} in this batch)")
    if f.timestamp:
        ts_type = table.column(f.timestamp).type
        if not (pa.types.is_integer(ts_type) or pa.types.is_timestamp(ts_type)):
            raise PrepareError(f"{at(0)}: column {f.timestamp!r} (features.timestamp) must be an integer or "
                               f"timestamp, got {ts_type}")
    if cfg.model.objective == "binary":
        return binary_labels(table.column(f.label), cfg, where)
    return np.asarray(table.column(f.label).to_numpy(zero_copy_only=False), dtype=np.float32)


class _Cardinality:
    """Distinct ids per feature and their hash collisions.

    Before hashing, distinct raw ids are exact up to 4096, a k-minimum-values estimate
    beyond (memory stays bounded however many raw ids the input has). After hashing, each
    table row records the first raw id that hashed to it (as a 64-bit hash of the id) and
    how many rows it received; a row reached by a second raw id is *collided*, and the
    share of the feature's id occurrences that land in collided rows is exact. That needs
    17 bytes per table row, so it is kept for the smallest tables within an eighth of
    data.prepare_memory_mb; larger tables get the expected share for uniformly hashed ids."""

    K = 4096
    BYTES_PER_ROW = 17

    def __init__(self, cfg: Config) -> None:
        self.features = cfg.features.sparse
        self.kmv = {s.name: np.zeros(0, dtype=np.uint64) for s in self.features}
        self.owner: dict[str, np.ndarray] = {}
        self.rows: dict[str, np.ndarray] = {}
        self.collided: dict[str, np.ndarray] = {}
        budget = (cfg.data.prepare_memory_mb << 20) // 8 // self.BYTES_PER_ROW
        for s in sorted(self.features, key=lambda s: s.num_embeddings):
            if s.num_embeddings <= budget:
                budget -= s.num_embeddings
                self.owner[s.name] = np.zeros(s.num_embeddings, dtype=np.uint64)
                self.rows[s.name] = np.zeros(s.num_embeddings, dtype=np.int64)
                self.collided[s.name] = np.zeros(s.num_embeddings, dtype=bool)
        # what the exact tracking holds: taken from the memory the partitioning may use
        self.nbytes = sum(a.nbytes for d in (self.owner, self.rows, self.collided) for a in d.values())
        self.occurrences = dict.fromkeys((s.name for s in self.features), 0)

    def add(self, name: str, raw: np.ndarray, hashed: np.ndarray) -> None:
        h = stable_hash(raw, "kmv")
        self.occurrences[name] += len(hashed)
        self.kmv[name] = np.unique(np.concatenate([self.kmv[name], h]))[: self.K]
        if name not in self.owner or not len(hashed):
            return
        owner, collided = self.owner[name], self.collided[name]
        slots, counts = np.unique(hashed, return_counts=True)
        self.rows[name][slots] += counts
        h = h | np.uint64(1)  # 0 marks an empty table row
        order = np.lexsort((h, hashed))
        hs, hh = hashed[order], h[order]
        new = owner[hs] == 0
        owner[hs[new]] = hh[new]  # the last of several new raw ids wins; the others collide below
        collided[hs[owner[hs] != hh]] = True

    def summary(self) -> dict[str, dict]:
        out = {}
        for s in self.features:
            h = self.kmv[s.name]
            if len(h) < self.K:
                raw, exact = len(h), True
            else:  # (k - 1) / (k-th smallest hash as a fraction of the hash space)
                raw, exact = int(round((self.K - 1) / (float(h[-1]) / 2.0**64))), False
            m = s.num_embeddings
            if s.name in self.owner:
                rows = self.rows[s.name]
                hashed = int((rows > 0).sum())
                share = float(rows[self.collided[s.name]].sum() / rows.sum()) if rows.sum() else 0.0
                share_exact = True
            else:  # a raw id collides unless the other raw - 1 ids all miss its row
                hashed = None
                share = float(1.0 - (1.0 - 1.0 / m) ** max(raw - 1, 0))
                share_exact = False
            out[s.name] = {"num_embeddings": m, "distinct_raw": raw, "distinct_raw_exact": exact,
                           "distinct_hashed": hashed, "colliding_share": round(share, 6),
                           "colliding_share_exact": share_exact, "id_occurrences": self.occurrences[s.name],
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
    dense = np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0), dtype=np.float32)
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
    missing = np.array([_MISSING], dtype=object)
    out = np.full(len(valid), hash_ids(missing, name, num_embeddings)[0])
    out[valid] = hashed
    # the raw values for _Cardinality, aligned with the ids: the missing value is one more
    raw_all = np.full(len(valid), _MISSING, dtype=object)
    raw_all[valid] = raw
    return raw_all, out


def _hash_batch(table: pa.Table, cfg: Config, card: _Cardinality | None, where: str,
                first_row: int = 0, labels: np.ndarray | None = None) -> pa.Table:
    """Raw batch -> the columns prepare keeps, sparse ids hashed into their tables
    (``first_row``: the batch's position in the input: the time of rows without a timestamp,
    and the input order that breaks ties of time; ``labels``: from ``_check_values``)."""
    f = cfg.features
    if labels is None:
        labels = _check_values(table, cfg, where)
    cols: dict[str, pa.Array] = {
        "__key": table.column(f.task_key).combine_chunks(),
        "__ts": row_times(table, cfg, first_row),
        "__row": pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64)),
        "__label": pa.array(labels.astype(np.float32)),
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
    cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), len(f.dense)) if f.dense \
        else pa.array([[]] * table.num_rows, pa.list_(pa.float32()))  # (Parquet misreads fixed lists of size 0)
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


def _tie_order(cfg: Config, task_start: np.ndarray, counts: np.ndarray, ts: np.ndarray,
               task_hash: np.ndarray) -> np.ndarray | None:
    """data.split.tie_break "shuffle": a permutation of the task-sorted rows that orders the
    rows of equal time within a task in a seeded order, a function of (seed, task, time,
    position among the tied rows), so that it does not depend on which other rows were
    read together. None for the other rules (the rows stay in input order within a tie)."""
    if cfg.data.split.tie_break != "shuffle" or not len(ts):
        return None
    task = np.repeat(np.arange(len(counts)), counts)
    new_run = np.ones(len(ts), dtype=bool)
    new_run[1:] = (task[1:] != task[:-1]) | (ts[1:] != ts[:-1])
    run_start = np.flatnonzero(new_run)
    pos = np.arange(len(ts)) - run_start[np.cumsum(new_run) - 1]
    with np.errstate(over="ignore"):
        mix = task_hash[task].astype(np.uint64) ^ (ts.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        key = salted_hash(salted_hash(mix, f"tie{cfg.data.split.seed}") ^ pos.astype(np.uint64), "tie")
    return np.lexsort((key, ts, task))


def _split_tasks(cfg: Config, task_start: np.ndarray, counts: np.ndarray, ts: np.ndarray,
                 task_hash: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, dict[str, int]]]:
    """Per task, support and query row indices (into the task-sorted table); None for a
    dropped task. Also {"tasks": dropped tasks by reason, "rows": rows left out by reason}.

    The ratio rule draws each task's split from (seed, task), so the result does not depend
    on which other tasks were prepared together. The time rule puts the earliest rows in
    the support, rows of equal time ordered by data.split.tie_break."""
    sp = cfg.data.split
    support_idx, query_idx = [], []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    rows_out = dict.fromkeys(ROW_DROP_REASONS, 0)
    perm = _tie_order(cfg, task_start, counts, ts, task_hash)

    def drop(reason: str, n: int) -> None:
        dropped[reason] += 1
        rows_out[reason] += n
        support_idx.append(None)
        query_idx.append(None)

    for start, n, th in zip(task_start.tolist(), counts.tolist(), task_hash.tolist()):
        too = "too_few_rows" if n < sp.min_task_rows else "too_many_rows" if 0 < sp.max_task_rows < n else ""
        if too:
            drop(too, n)
            continue
        rows = np.arange(start, start + n) if perm is None else perm[start: start + n]
        n_s = n - sp.query_size if sp.query_size else int(round(n * sp.support_ratio))
        n_s = min(max(n_s, 0), n)
        if sp.rule == "time":
            # "strict": support strictly earlier than query, the boundary moved before any tie
            # (with a fixed query size ties keep the input order: the query must have
            # query_size rows). Otherwise ties are ordered by tie_break and cut anywhere.
            while sp.tie_break == "strict" and not sp.query_size and 0 < n_s < n \
                    and ts[start + n_s - 1] == ts[start + n_s]:
                n_s -= 1
            s_rows, q_rows = rows[:n_s], rows[n_s:]
            s_rows = s_rows[-sp.max_support:]  # the most recent rows before the boundary
        else:
            shuffled = np.random.default_rng([sp.seed, th]).permutation(rows)
            s_rows, q_rows = np.sort(shuffled[:n_s])[: sp.max_support], np.sort(shuffled[n_s:])
        q_rows = q_rows[: sp.max_query]
        if len(s_rows) < sp.min_support:
            drop("support_too_small", n)
            continue
        if len(q_rows) < sp.min_query:
            drop("query_too_small", n)
            continue
        support_idx.append(s_rows)
        query_idx.append(q_rows)
        rows_out["support_over_max"] += n_s - len(s_rows)
        rows_out["query_over_max"] += (n - n_s) - len(q_rows)
    return support_idx, query_idx, {"tasks": dropped, "rows": rows_out}


DROP_REASONS = ("too_few_rows", "too_many_rows", "support_too_small", "query_too_small")
# rows not written: all rows of a dropped task (by the task's reason), and rows of a kept
# task beyond data.split.max_support (the earliest support rows) or max_query (the latest)
ROW_DROP_REASONS = DROP_REASONS + ("support_over_max", "query_over_max")


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


def _bucket_records(t: pa.Table, cfg: Config, dropped: dict[str, dict[str, int]]) -> dict[str, pa.Table]:
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
    support_idx, query_idx, d = _split_tasks(cfg, task_start, counts, ts, task_hash)
    for kind in ("tasks", "rows"):
        for k, v in d[kind].items():
            dropped[kind][k] += v
    # held-out tasks: a hash of the key, uniform in [0, 1): eval below eval_fraction, val
    # in the next val_fraction
    u = task_uniform(task_keys, sp.seed)
    split_of = np.where(u < sp.eval_fraction, "eval", np.where(u < sp.eval_fraction + sp.val_fraction, "val", "train"))
    # order of tasks in the shards: a seeded hash of the key (another salt than the split's,
    # or the shards would be sorted by split), so it does not depend on how the input was
    # partitioned
    rank = salted_hash(task_keys, f"order{sp.seed}")
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
        hint = ""
        if any(parse_number(str(n)) is not None for n in source.names):
            hint = " (names that are numbers: the file seems to have no header; set data.source.column_names)"
        elif f.timestamp in missing and cfg.data.source.format in ("libsvm", "libfm"):
            hint = " (libSVM lines have no time: set features.timestamp: '' to take the line order as time order)"
        raise PrepareError(f"{input_path}: missing column(s) {missing} required by the config "
                           f"(features.*); columns present: {source.names[:40]}{hint}")
    has_true_prob = bool(f.true_prob) and f.true_prob in source.names
    if has_true_prob:
        columns.append(f.true_prob)
    try:
        input_bytes, input_rows = source.estimate(columns)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    card = _Cardinality(cfg)
    memory = (cfg.data.prepare_memory_mb << 20) - 2 * card.nbytes  # (and its temporaries)
    parts_n = num_partitions(input_bytes, max(1, memory >> 20))
    schema = shard_schema(cfg, has_true_prob)
    out.mkdir(parents=True, exist_ok=True)
    dropped = {"tasks": dict.fromkeys(DROP_REASONS, 0), "rows": dict.fromkeys(ROW_DROP_REASONS, 0)}
    n_rows = 0
    task_keys_seen = 0
    show = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as tmp:
        parts = _Partitions(parts_n, Path(tmp), max(1, memory) // 4)
        with tqdm(total=input_rows or None, unit="rows", desc="prepare: read", disable=not show) as bar:
            where = str(input_path)
            try:
                for batch in source.batches(columns):
                    where = batch.where
                    labels = _check_values(batch.table, cfg, batch)
                    parts.add(_hash_batch(batch.table, cfg, card, where, first_row=n_rows, labels=labels))
                    n_rows += batch.table.num_rows
                    bar.update(batch.table.num_rows)
            except SourceError as e:
                raise PrepareError(str(e)) from None
            except pa.ArrowException as e:
                raise PrepareError(f"{where}: cannot read: {e}") from None
        if n_rows == 0:
            raise PrepareError(f"{input_path}: no rows")
        # shards are written beside the output and moved into place only when complete, so
        # a failed prepare leaves the shards and manifest of the last one as they were
        staging = Path(tmp) / "shards"
        writer = _ShardWriter(staging, cfg, schema)
        for bucket in tqdm(parts.buckets(), total=parts_n, unit="bucket", desc="prepare: group", disable=not show):
            records = _bucket_records(bucket, cfg, dropped)
            task_keys_seen += sum(r.num_rows for r in records.values())
            del bucket
            for split in records:
                writer.add(split, records[split])
        splits = writer.close()
        input_tasks = int(task_keys_seen + sum(dropped["tasks"].values()))
        _check_splits(cfg, splits, dropped, input_tasks, input_path)
        cardinality = card.summary()
        manifest = {
            "format_version": FORMAT_VERSION,
            "format": cfg.data.format,
            "input": str(input_path),
            "input_rows": int(n_rows),
            "input_tasks": input_tasks,
            "dropped_tasks": dropped["tasks"],
            "rows": {"read": int(n_rows),
                     "written": {k: v["support_rows"] + v["query_rows"] for k, v in splits.items()},
                     "dropped": dropped["rows"]},
            "task_key": f.task_key,
            "source": cfg.data.source.format,
            "input_columns": {c: str(source.schema.field(c).type) for c in columns},  # raw types, for serving
            "schema": schema,
            "cardinality": cardinality,
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
    rule = (f"data.split.rule {sp.rule}" + (f", tie_break {sp.tie_break}" if sp.rule == "time" else "")
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
    """Move the staged split directories into ``out`` and write the manifest last. The old
    manifest goes first, so a crash in between leaves no manifest that names missing shards."""
    old_manifest = out / MANIFEST
    if old_manifest.exists():
        old_manifest.unlink()
    for split in ("train", "eval", "val"):
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
    lines.append("  ids (distinct raw -> table rows used / table size, rows whose id collides):")
    for name, c in m["cardinality"].items():
        raw = f"{c['distinct_raw']:,}" + ("" if c["distinct_raw_exact"] else "~")
        used = f"{c['distinct_hashed']:,}" if c["distinct_hashed"] is not None else "?"
        share = f"{100 * c['colliding_share']:.2f}%" + ("" if c["colliding_share_exact"] else " (expected)")
        lines.append(f"    {name}: {raw} -> {used} / {c['num_embeddings']:,}, {share}")
    return "\n".join(lines)


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
