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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gmeta.config import Config

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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


def _read_input(cfg: Config, input_path: Path) -> pa.Table:
    f = cfg.features
    if not input_path.exists():
        raise PrepareError(f"input not found: {input_path}")
    if input_path.is_dir():
        files = sorted(p for p in input_path.rglob("*") if p.suffix in (".parquet", ".csv"))
        if not files:
            raise PrepareError(f"{input_path}: no .parquet or .csv files inside")
    else:
        files = [input_path]
    fmt = "csv" if files[0].suffix == ".csv" else "parquet"
    columns = [f.task_key, f.timestamp, f.label] + [s.name for s in f.sparse] + list(f.dense)
    if f.true_prob:
        columns.append(f.true_prob)
    dataset = ds.dataset([str(p) for p in files], format=fmt)
    missing = [c for c in columns if c not in dataset.schema.names]
    if f.true_prob and f.true_prob in missing:
        missing.remove(f.true_prob)
        columns.remove(f.true_prob)
        f_true = ""
    else:
        f_true = f.true_prob
    if missing:
        raise PrepareError(
            f"{input_path}: missing column(s) {missing} required by the config "
            f"(features.*); columns present: {dataset.schema.names}"
        )
    table = dataset.to_table(columns=columns)
    table = table.replace_schema_metadata({b"gmeta_true_prob": f_true.encode()})
    return table


def _check_values(table: pa.Table, cfg: Config, input_path: Path) -> None:
    f = cfg.features
    for name in [f.task_key, f.timestamp, f.label] + [s.name for s in f.sparse]:
        nulls = table.column(name).null_count
        if nulls:
            raise PrepareError(f"{input_path}: column {name!r} has {nulls} null value(s)")
    for name in [f.label] + list(f.dense):
        col = table.column(name)
        if not pa.types.is_integer(col.type) and not pa.types.is_floating(col.type):
            raise PrepareError(f"{input_path}: column {name!r} must be numeric, got {col.type}")
        arr = col.to_numpy().astype(np.float64)
        bad = ~np.isfinite(arr)
        if bad.any():
            raise PrepareError(f"{input_path}: column {name!r} has {int(bad.sum())} NaN/inf value(s)"
                               f" (first at row {int(np.argmax(bad))})")
    lab = table.column(f.label).to_numpy().astype(np.float64)
    if not np.isin(lab, (0.0, 1.0)).all():
        raise PrepareError(f"{input_path}: column {f.label!r} (features.label) must be 0 or 1")
    for s in cfg.features.sparse:
        t = table.column(s.name).type
        if s.multi_hot != (pa.types.is_list(t) or pa.types.is_large_list(t)):
            kind = "a list column" if s.multi_hot else "a scalar column"
            raise PrepareError(f"{input_path}: column {s.name!r} must be {kind} "
                               f"(features.sparse multi_hot={s.multi_hot}), got {t}")


def _hash_features(table: pa.Table, cfg: Config) -> tuple[dict[str, pa.Array], dict[str, dict]]:
    """Hash every sparse column into its table; return arrays and per-feature cardinality."""
    out: dict[str, pa.Array] = {}
    card: dict[str, dict] = {}
    for s in cfg.features.sparse:
        col = table.column(s.name).combine_chunks()
        if s.multi_hot:
            flat = col.flatten()
            raw = flat.to_numpy(zero_copy_only=False)
            hashed = hash_ids(raw, s.name, s.num_embeddings)
            off = col.offsets.to_numpy()
            offsets = pa.array((off - off[0]).astype(np.int32))
            out[s.name] = pa.ListArray.from_arrays(offsets, pa.array(hashed))
        else:
            raw = col.to_numpy(zero_copy_only=False)
            hashed = hash_ids(raw, s.name, s.num_embeddings)
            out[s.name] = pa.array(hashed)
        distinct_raw = len(pd.unique(raw)) if len(raw) else 0
        distinct_hashed = len(np.unique(hashed))
        card[s.name] = {
            "num_embeddings": s.num_embeddings,
            "distinct_raw": int(distinct_raw),
            "distinct_hashed": int(distinct_hashed),
            "multi_hot": s.multi_hot,
            "pooling": s.pooling,
        }
    return out, card


def _split_tasks(cfg: Config, task_start: np.ndarray, counts: np.ndarray, ts: np.ndarray,
                 rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Per task, support and query row indices (into the task-sorted table)."""
    sp = cfg.data.split
    support_idx, query_idx = [], []
    dropped = {"support_too_small": 0, "query_too_small": 0}
    for start, n in zip(task_start.tolist(), counts.tolist()):
        rows = np.arange(start, start + n)
        n_s = int(round(n * sp.support_ratio))
        n_s = min(max(n_s, 0), n)
        if sp.rule == "time":
            # Support strictly earlier than query: move the boundary before any tie.
            while 0 < n_s < n and ts[start + n_s - 1] == ts[start + n_s]:
                n_s -= 1
            s_rows, q_rows = rows[:n_s], rows[n_s:]
            s_rows = s_rows[-sp.max_support:]  # the most recent rows before the boundary
        else:
            perm = rng.permutation(rows)
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


def _write_shard(rec: pa.Table, split_dir: Path, k: int, first: int, cfg: Config, schema: dict) -> list[dict]:
    """Write one shard's task records; return manifest entries of the files written.

    Parquet: one file, row groups of ``tasks_per_row_group`` tasks (the reading unit).
    WebDataset: one tar per unit, so both formats have the same units and a reader yields
    identical batches from either.
    """
    split = split_dir.name
    entries = []
    s_rows = pc.list_value_length(rec.column("support").combine_chunks().field("label"))
    q_rows = pc.list_value_length(rec.column("query").combine_chunks().field("label"))

    def entry(path: Path, lo: int, hi: int, units: list[int]) -> dict:
        return {"path": f"{split}/{path.name}", "tasks": hi - lo, "units": units,
                "support_rows": int(pc.sum(s_rows.slice(lo, hi - lo)).as_py() or 0),
                "query_rows": int(pc.sum(q_rows.slice(lo, hi - lo)).as_py() or 0), "sha256": _sha256(path)}

    step = cfg.data.tasks_per_row_group
    if cfg.data.format == "parquet":
        path = split_dir / f"part-{k:05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(rec, tmp, row_group_size=step)
        tmp.replace(path)
        meta = pq.ParquetFile(path).metadata
        entries.append(entry(path, 0, rec.num_rows, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]))
    else:
        from gmeta.io.blocks import block_from_arrow
        from gmeta.io.wds import write_tar

        for u, lo in enumerate(range(0, rec.num_rows, step)):
            part = rec.slice(lo, step)
            path = split_dir / f"part-{k:05d}-{u:04d}.tar"
            block = block_from_arrow(part, str(path), schema)
            write_tar(path, block, part.column("task_key").to_pylist(), first + lo, schema)
            entries.append(entry(path, lo, lo + part.num_rows, [part.num_rows]))
    return entries


def prepare(cfg: Config, input_path: str | Path, out_dir: str | Path) -> dict:
    """Build task shards and the manifest; return the manifest dict."""
    t0 = time.perf_counter()
    f = cfg.features
    sp = cfg.data.split
    input_path = Path(input_path)
    out = Path(out_dir)
    table = _read_input(cfg, input_path)
    true_prob_col = table.schema.metadata[b"gmeta_true_prob"].decode()
    _check_values(table, cfg, input_path)
    n_rows_in = table.num_rows
    if n_rows_in == 0:
        raise PrepareError(f"{input_path}: no rows")

    # Sort rows by (task key, time). The sort is a stable lexicographic sort of two keys.
    order = pc.sort_indices(table, sort_keys=[(f.task_key, "ascending"), (f.timestamp, "ascending")])
    order_np = order.to_numpy()
    keys = table.column(f.task_key).take(order).to_numpy(zero_copy_only=False)
    ts = table.column(f.timestamp).take(order).to_numpy(zero_copy_only=False).astype(np.int64)
    change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    task_start = np.concatenate([[0], change]).astype(np.int64)
    counts = np.diff(np.concatenate([task_start, [len(keys)]]))
    task_keys = keys[task_start]

    hashed, card = _hash_features(table, cfg)
    dense = np.stack([table.column(c).to_numpy().astype(np.float32) for c in f.dense], axis=1)
    columns: dict[str, pa.Array] = {name: arr.take(order) for name, arr in hashed.items()}
    columns["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(dense[order_np].reshape(-1)), len(f.dense))
    columns["label"] = pa.array(table.column(f.label).to_numpy().astype(np.float32)[order_np])
    if true_prob_col:
        columns["true_prob"] = pa.array(table.column(true_prob_col).to_numpy().astype(np.float32)[order_np])
    columns["timestamp"] = pa.array(ts)

    rng = np.random.default_rng(sp.seed)
    support_idx, query_idx, dropped = _split_tasks(cfg, task_start, counts, ts, rng)
    task_ids = stable_hash(task_keys, "task").astype(np.int64)
    # eval tasks: a hash of the key, uniform in [0, 1), below eval_fraction
    u = (stable_hash(task_keys, f"split{sp.seed}") >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    is_eval = u < sp.eval_fraction

    out.mkdir(parents=True, exist_ok=True)
    schema = {"sparse": [asdict(s) for s in f.sparse], "dense": list(f.dense), "has_true_prob": bool(true_prob_col)}
    manifest_splits = {}
    for split in SPLITS:
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for old in [*split_dir.glob("*.parquet"), *split_dir.glob("*.tar")]:
            old.unlink()
        sel = [i for i in range(len(task_keys))
               if support_idx[i] is not None and bool(is_eval[i]) == (split == "eval")]
        # Deterministic task order across shards, mixed so no shard is all big tasks.
        sel = [sel[j] for j in np.random.default_rng(sp.seed + (split == "eval")).permutation(len(sel))]
        files = []
        n_sup = n_qry = 0
        for k, lo in enumerate(range(0, len(sel), cfg.data.tasks_per_shard)):
            chunk = sel[lo: lo + cfg.data.tasks_per_shard]
            s_len = np.array([len(support_idx[i]) for i in chunk])
            q_len = np.array([len(query_idx[i]) for i in chunk])
            s_rows = np.concatenate([support_idx[i] for i in chunk])
            q_rows = np.concatenate([query_idx[i] for i in chunk])
            rec = pa.table({
                "task_key": pa.array(task_keys[chunk]),
                "task_id": pa.array(task_ids[chunk]),
                "support": _nested(s_rows, s_len, columns),
                "query": _nested(q_rows, q_len, columns),
            })
            files += _write_shard(rec, split_dir, k, lo, cfg, schema)
            n_sup += int(s_len.sum())
            n_qry += int(q_len.sum())
        manifest_splits[split] = {"tasks": len(sel), "support_rows": n_sup, "query_rows": n_qry, "files": files}

    manifest = {
        "format_version": FORMAT_VERSION,
        "format": cfg.data.format,
        "input": str(input_path),
        "input_rows": int(n_rows_in),
        "input_tasks": int(len(task_keys)),
        "dropped_tasks": dropped,
        "task_key": f.task_key,
        "schema": schema,
        "cardinality": card,
        "split_rule": asdict(sp),
        "splits": manifest_splits,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)
    log.info("prepare: %d rows, %d tasks -> train %d, eval %d tasks (dropped %s) in %.1fs",
             n_rows_in, len(task_keys), manifest_splits["train"]["tasks"],
             manifest_splits["eval"]["tasks"], dropped, manifest["seconds"])
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
        raise PrepareError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}")
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
