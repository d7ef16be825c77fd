"""Features of a row, as training sees them: labels mapped and checked, ids hashed into
their tables, dense values transformed, bad values named. One module for ``gmeta prepare``
and for serving (the pyfunc model, raw-row scoring), so that both hash and check exactly
alike."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.config import SHARD_FIELDS, Config, SparseFeature
from gmeta.io.errors import PrepareError
from gmeta.io.sources import Batch, parse_number, split_field

log = logging.getLogger(__name__)


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
    as ``stable_hash``. Used for task-level choices, and for ids under ``hash_ids``'s
    version 2."""
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


ID_HASH = 2
"""The id hash ``gmeta prepare`` writes new shards with, recorded as the manifest's ``id_hash``."""
ID_HASHES = (1, 2)


MANAGED_HASH_SIZE = (1 << 63) - 1
"""The range of a managed feature's ids in the shards (``features.sparse[].ids: managed``):
torchrec's MCH ``input_hash_size``; int64 max itself marks an empty slot in its buffers."""


def hash_ids(values: np.ndarray, feature: str, num_embeddings: int, id_hash: int, ids: str = "hash") -> np.ndarray:
    """Raw ids of ``feature`` -> rows of its table of ``num_embeddings`` rows, [n] int64: the
    one id hash of gmeta, used by ``gmeta prepare``, serving, ``gmeta predict --input`` and
    ``task_batch``. Integers hash as integers, text as text.

    ``id_hash`` is the version the tables were trained with (the manifest's ``id_hash``,
    recorded in checkpoints; ``id_hash_of``):

    1  ``stable_hash`` keyed by the feature name, whose key pandas applies to strings only:
       an integer id takes the same row in every feature of the same table size, id 0 row 0,
       and small integers collide by construction (0 and 3 share row 0 of every table of 16
       rows). Shards whose manifest has no ``id_hash``, and the checkpoints trained on them.
    2  ``salted_hash`` keyed by the feature name: integers too hash as a random function of
       (feature, id), so distinct ids share a row only as often as chance has it. Strings
       hash as under 1, so text ids keep their rows.

    ``ids`` (``features.sparse[].ids``): "managed" returns the same hash taken modulo
    ``MANAGED_HASH_SIZE`` (63 bits, ``num_embeddings`` unused): the model's managed-collision
    module, not the hash, gives each such id its row (``gmeta.models.managed``).
    """
    if type(id_hash) is not int or id_hash not in ID_HASHES:
        raise ValueError(f"id_hash {id_hash!r}: must be one of {ID_HASHES}")
    if ids not in ("hash", "managed"):
        raise ValueError(f"ids {ids!r}: must be 'hash' or 'managed' (features.sparse[].ids)")
    h = stable_hash(values, feature) if id_hash == 1 else salted_hash(values, feature)
    size = MANAGED_HASH_SIZE if ids == "managed" else num_embeddings
    return (h % np.uint64(size)).astype(np.int64)


def id_bound(feature: dict) -> int:
    """One past the largest id a feature's shards may hold (a schema entry of the manifest;
    entries written before ``ids`` existed are hashed)."""
    return MANAGED_HASH_SIZE if feature.get("ids", "hash") == "managed" else int(feature["num_embeddings"])


def id_hash_of(record: dict, where: str) -> int:
    """The id hash of a manifest or of checkpoint metadata (its ``id_hash``). Without one it
    was written before the field existed, when ids went through hash 1. ``where`` names
    the file in the error."""
    v = record.get("id_hash", 1)
    if type(v) is not int or v not in ID_HASHES:
        raise PrepareError(f"{where}: id_hash {v!r} is not one this version of gmeta knows {list(ID_HASHES)}; "
                           "read it with the version of gmeta that wrote it")
    return v


def shard_fields(s: SparseFeature) -> dict:
    """What of a sparse feature's config the shards depend on (not min_count, holdout_share).
    A feature sharing another's table (``table``) hashes its ids as that feature's name."""
    return {k: v for k, v in asdict(s).items() if k in SHARD_FIELDS}


def shard_schema(cfg: Config, has_true_prob: bool) -> dict:
    """The schema of task records (in the manifest; what the reader and collation expect)."""
    schema = {"sparse": [shard_fields(s) for s in cfg.features.sparse], "dense": list(cfg.features.dense),
              "has_true_prob": has_true_prob, "objective": cfg.model.objective}
    labels = cfg.features.label_names()
    if len(labels) > 1:  # (one label: the schema as it was before several could be written)
        schema["labels"] = labels
    return schema


def schema_labels(schema: dict) -> list[str] | None:
    """The label columns of shards with several (their manifest schema's ``labels``); None
    for shards of one label, whose schema does not name it."""
    labels = schema.get("labels")
    return list(labels) if labels else None


def input_columns(cfg: Config) -> list[str]:
    """The raw columns the config reads (task key, timestamp if any, label, features)."""
    f = cfg.features
    return [f.task_key] + ([f.timestamp] if f.timestamp else []) + f.label_names() + [s.name for s in f.sparse] \
        + list(f.dense)


def _locator(where) -> Callable[[int], str]:
    """``where`` as a function of a batch row: a Batch's own, or ``"<where>: row i"``."""
    if isinstance(where, Batch):
        return where.locate
    return lambda i: f"{where}: row {i}"


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _first_null(col: pa.ChunkedArray | pa.Array) -> int:
    return _first(~np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool))


def binary_labels(col: pa.ChunkedArray | pa.Array, cfg: Config, where, name: str | None = None) -> np.ndarray:
    """The label column ``name`` (default ``features.label``) as float32 0/1
    (``model.objective: binary``): 0/1 numbers or booleans as they are, other encodings
    through ``features.positive_labels`` / ``negative_labels``. A value that is neither is an
    error naming the file, line and column."""
    f = cfg.features
    key = "features.label" if not f.labels else "features.labels"
    name = name or f.label
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
            raise PrepareError(f"{at(i)}: label {shown[i]!r} (column {name!r}) is in neither "
                               f"features.positive_labels {list(f.positive_labels)} nor features.negative_labels "
                               f"{list(f.negative_labels)}")
        return out
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        i = 0
        raise PrepareError(f"{at(i)}: column {name!r} ({key}) holds {col.type} values such as "
                           f"{col[i].as_py()!r}; binary labels must be 0/1 or booleans, or be mapped with "
                           "features.positive_labels and features.negative_labels")
    lab = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isin(lab, (0.0, 1.0))
    if bad.any():
        i = _first(bad)
        hint = (" (for -1/+1 labels set features.positive_labels: [1] and features.negative_labels: [-1])"
                if lab[i] == -1 else "")
        raise PrepareError(f"{at(i)}: column {name!r} ({key}) must be 0 or 1 for model.objective "
                           f"binary, got {lab[i]:g}{hint}; set model.objective: regression to predict the value "
                           "itself")
    return lab.astype(np.float32)


def check_values(table: pa.Table, cfg: Config, where) -> np.ndarray:
    """Nulls, non-numeric or non-finite values, labels the objective cannot take: an error
    naming the file and line (``where``: a Batch, or a name for rows without lines).
    Returns the labels as float32 (binary ones mapped to 0/1): ``[R]`` for one label,
    ``[R, L]`` for the L columns of ``features.labels``."""
    f = cfg.features
    at = _locator(where)
    fill = cfg.data.source.fill_missing
    labels = f.label_names()
    must = [f.task_key, *labels] + ([f.timestamp] if f.timestamp else [])
    for name in must + ([] if fill else [s.name for s in f.sparse]):
        col = table.column(name)
        if col.null_count:
            hint = "" if name in must else " (data.source.fill_missing: true maps them to a 'missing' id)"
            i = _first_null(col)
            raise PrepareError(f"{at(i)}: column {name!r} has a null value ({col.null_count} in this batch){hint}")
    numeric = list(f.dense) + ([f.true_prob] if f.true_prob in table.column_names else [])
    if cfg.model.objective == "regression":
        numeric[:0] = labels
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
        cols = [binary_labels(table.column(name), cfg, where, name) for name in labels]
    else:
        cols = [np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float32) for name in labels]
    return cols[0] if len(cols) == 1 else np.stack(cols, axis=1)


def label_array(labels: np.ndarray) -> pa.Array:
    """Labels ``[R]`` or ``[R, L]`` as an Arrow column of R rows (a fixed-size list of L
    per row for several labels, as the dense features are kept)."""
    labels = np.ascontiguousarray(labels, dtype=np.float32)
    if labels.ndim == 1:
        return pa.array(labels)
    return pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1)), labels.shape[1])


class Cardinality:
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
        # (managed ids own their rows: the model, not the hash, places them; nothing collides)
        for s in sorted((s for s in self.features if s.ids == "hash"), key=lambda s: s.num_embeddings):
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
            if s.ids == "managed":  # every live id its own slot: no collision; id_counts counts them
                out[s.name] = {"num_embeddings": m, "ids": "managed", "distinct_raw": raw, "distinct_raw_exact": exact,
                               "distinct_hashed": None, "colliding_share": 0.0, "colliding_share_exact": True,
                               "id_occurrences": self.occurrences[s.name], "multi_hot": s.multi_hot,
                               "pooling": s.pooling}
                continue
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
    # nulls only with data.source.fill_missing: check_values refuses them otherwise
    cols = [np.asarray(_zero_filled(table.column(c)).to_numpy(zero_copy_only=False), dtype=np.float32)
            for c in cfg.features.dense]
    dense = np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0), dtype=np.float32)
    if cfg.features.dense_transform == "log1p":
        dense = np.sign(dense) * np.log1p(np.abs(dense))
    return dense


_INTEGER = r"^-?[0-9]{1,18}$"  # a text token that is an int64


def _hash_ids(col: pa.Array, name: str, num_embeddings: int, id_hash: int,
              tokens: bool = False, ids: str = "hash") -> tuple[np.ndarray, np.ndarray]:
    """(raw ids, hashed ids) of a flat id column. A null (data.source.fill_missing) and an
    empty string get the id of the 'missing' value. ``tokens``: ids split out of a text
    field, where a token that is an integer hashes as that integer (as the same id does
    from a list<int64> column), decided token by token so that it does not depend on which
    other rows were read together. ``id_hash``: see ``hash_ids``."""
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
        hashed = hash_ids(raw, name, num_embeddings, id_hash, ids)
    else:
        hashed = np.empty(len(raw), dtype=np.int64)
        hashed[numeric] = hash_ids(raw[numeric].astype(np.int64), name, num_embeddings, id_hash, ids)
        hashed[~numeric] = hash_ids(raw[~numeric], name, num_embeddings, id_hash, ids)
    if valid is None:
        return raw, hashed
    missing = np.array([_MISSING], dtype=object)
    out = np.full(len(valid), hash_ids(missing, name, num_embeddings, id_hash, ids)[0])
    out[valid] = hashed
    # the raw values for Cardinality, aligned with the ids: the missing value is one more
    raw_all = np.full(len(valid), _MISSING, dtype=object)
    raw_all[valid] = raw
    return raw_all, out


def hash_batch(table: pa.Table, cfg: Config, card: Cardinality | None, where: str,
               first_row: int = 0, labels: np.ndarray | None = None, *, id_hash: int) -> pa.Table:
    """Raw batch -> the columns prepare keeps, sparse ids hashed into their tables by
    ``hash_ids`` version ``id_hash`` (prepare: ``ID_HASH``; serving: the checkpoint's)
    (``first_row``: the batch's position in the input: the time of rows without a timestamp,
    and the input order that breaks ties of time; ``labels``: from ``check_values``)."""
    f = cfg.features
    if labels is None:
        labels = check_values(table, cfg, where)
    cols: dict[str, pa.Array] = {
        "__key": table.column(f.task_key).combine_chunks(),
        "__ts": row_times(table, cfg, first_row),
        "__row": pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64)),
        "__label": label_array(labels),
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
            if s.max_length:  # a sequence, most recent first: its first max_length ids
                col = pc.list_slice(col, 0, s.max_length)
            items = col.flatten()
            if items.null_count and not cfg.data.source.fill_missing:
                raise PrepareError(f"{where}: column {s.name!r} has null ids inside its lists")
            raw, hashed = _hash_ids(items, s.table or s.name, s.num_embeddings, id_hash, tokens=text, ids=s.ids)
            off = col.offsets.to_numpy().astype(np.int64)
            cols[s.name] = pa.ListArray.from_arrays(pa.array((off - off[0]).astype(np.int32)), pa.array(hashed))
        else:
            raw, hashed = _hash_ids(col, s.table or s.name, s.num_embeddings, id_hash, ids=s.ids)
            cols[s.name] = pa.array(hashed)
        if card is not None:
            card.add(s.name, raw, hashed)
    dense = _dense_matrix(table, cfg)
    cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), len(f.dense)) if f.dense \
        else pa.array([[]] * table.num_rows, pa.list_(pa.float32()))  # (Parquet misreads fixed lists of size 0)
    if f.true_prob and f.true_prob in table.column_names:
        cols["true_prob"] = pa.array(table.column(f.true_prob).to_numpy().astype(np.float32))
    return pa.table(cols)
