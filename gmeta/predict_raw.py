"""``gmeta predict --input RAW``: batch prediction on row-level logs of new tasks.

The input is what ``gmeta prepare`` reads (``data.source.format`` of the checkpoint's
config): rows of tasks that training never saw. Each row's role is its ``role`` column
("support": labelled, adapted on; "query": scored, its label may be missing; "": ignored)
or, without that column, the config's split rule (``data.split``), as prepare applies it.
Ids are hashed and values checked by the code the pyfunc model runs (``gmeta.serving``), so
the scores equal the pyfunc model's on the same rows.

Pass 1 streams the input into buckets by a hash of the task key (prepare's external
partitioning, spilled to disk past ``data.prepare_memory_mb``), so that every task's rows
are together; pass 2 scores one bucket at a time and writes it as one Parquet part
``part-BBBBB.parquet`` (columns task_key, input_row: the row's position in the input,
label, score), to a temporary name and renamed, then records it in ``_progress.json``.
Several checkpoints of the same features score in one pass: the data is read, bucketed and
featurised once, and every model writes its own column (score_0, score_1, ... in the order
given; the summary and ``_progress.json`` say which is which).
``--resume`` redoes pass 1 (a pure function of the input) and scores only the buckets not
recorded: every query row is written exactly once.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gmeta.checkpoint import load_unsharded
from gmeta.io.errors import PrepareError
from gmeta.io.features import input_columns, shard_fields
from gmeta.io.prepare import Partitions, num_partitions, open_input, stream_input
from gmeta.io.sources import SourceError
from gmeta.parallel.dist import configure_threads, default_device
from gmeta.predict import PROGRESS, PredictError, open_progress, write_atomic
from gmeta.scoring import inner_steps_for
from gmeta.serving import QUERY, ROLE, assign_roles, score_rows_models

log = logging.getLogger(__name__)


def _part(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"


def _reading(cfg, has_role: bool) -> dict:
    """What of a config decides how raw rows become task batches: the columns and label
    encoding, each sparse feature's hashing (shard_fields: not min_count or holdout_share,
    which the model applies), the source format, and without a role column the split rule."""
    features = {**asdict(cfg.features), "sparse": [shard_fields(s) for s in cfg.features.sparse]}
    return {"features": features, "data.source": asdict(cfg.data.source),
            **({} if has_role else {"data.split": asdict(cfg.data.split)})}


def _same_reading(cfgs: list, checkpoints: list, has_role: bool) -> None:
    """Every model must read the rows as the first does (or one pass would score some of
    them on rows featurised for another)."""
    first = _reading(cfgs[0], has_role)
    for c, other in zip(checkpoints[1:], cfgs[1:]):
        theirs = _reading(other, has_role)
        for key in first:
            if first[key] != theirs[key]:
                raise PredictError(f"--checkpoint {c}: its {key} differ from those of --checkpoint "
                                   f"{checkpoints[0]} in how raw rows are read; models scored in one pass "
                                   "must read the rows alike: predict them in separate runs")


def run_predict_raw(checkpoint: str | Path | list, input_path: str | Path, out_dir: str | Path, *,
                    inner_steps: int | None = None, resume: bool = False, progress: bool = True,
                    memory_mb: int | None = None, device: torch.device | None = None) -> dict:
    """Score every query row of the raw input with ``checkpoint`` (one, or a list scored in
    one pass); returns a summary (rows, tasks, parts, rows/s, models).
    ``memory_mb``: the cap that sizes the buckets (default: the checkpoint's
    data.prepare_memory_mb)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    device = device or default_device()
    checkpoints = [str(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint])]
    if len(set(checkpoints)) != len(checkpoints):
        raise PredictError(f"--checkpoint: the same checkpoint given twice: {checkpoints}")
    loaded = [load_unsharded(c, device) for c in checkpoints]
    cfg, meta = loaded[0][1], loaded[0][2]
    configure_threads(cfg.train.threads)
    column_types = meta.get("input_columns")
    f = cfg.features
    input_path, out = Path(input_path), Path(out_dir)
    source = open_input(cfg, input_path)  # the checkpoint's features and source format
    columns = input_columns(cfg)
    has_role = ROLE in source.names
    _same_reading([c for _, c, _ in loaded], checkpoints, has_role)
    read = columns + ([ROLE] if has_role else [])
    try:
        input_bytes, _ = source.estimate(read)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    memory_mb = memory_mb or cfg.data.prepare_memory_mb
    count = num_partitions(input_bytes, memory_mb)
    models = [{"column": "score" if len(checkpoints) == 1 else f"score_{i}", "checkpoint": str(Path(c).resolve()),
               "inner_steps": inner_steps_for(mc, inner_steps)}
              for i, (c, (_, mc, _)) in enumerate(zip(checkpoints, loaded))]
    job = {"models": models, "input": str(input_path.resolve()),
           "buckets": count, "roles": "column" if has_role else "split rule"}
    state = open_progress(out, {"job": job, "done": [], "rows": 0, "tasks": 0, "complete": False}, resume,
                          "checkpoint, input and settings")
    progress_file = out / PROGRESS
    done = set(state["done"])
    for stale in out.glob("part-*.parquet*"):  # written after the last recorded progress
        if stale.name.endswith(".tmp") or int(stale.name[5:10]) not in done:
            stale.unlink()
    if state["complete"]:
        log.info("predict: %s is complete (%d rows of %d tasks)", out, state["rows"], state["tasks"])
        return {**state, "out": str(out), "rows_per_s": 0.0, "new_rows": 0, "parts": len(done), "models": models}

    new_rows = 0
    with tempfile.TemporaryDirectory(dir=out, prefix=".predict-") as tmp:
        parts = Partitions(count, Path(tmp), max(1, memory_mb << 20) // 4)
        def add(batch, first_row: int) -> None:  # the rows as they are, with their task key and input position
            t = batch.table
            rows = pa.array(np.arange(first_row, first_row + t.num_rows, dtype=np.int64))
            parts.add(t.append_column("__key", t.column(f.task_key)).append_column("__row", rows))

        stream_input(source, read, input_path, add)
        scorers = [(m, c) for m, c, _ in loaded]
        with tqdm(total=count, initial=len(done), unit="bucket", desc="predict", disable=not progress) as bar:
            for b, bucket in parts.indexed_buckets():
                if b in done:
                    continue
                df = bucket.drop_columns(["__key"]).to_pandas()
                df = df.sort_values("__row", kind="stable").reset_index(drop=True)
                if not has_role:
                    df = assign_roles(df, cfg)
                try:
                    scores = score_rows_models(scorers, df, inner_steps, column_types)
                except PrepareError as e:
                    raise PrepareError(f"{input_path}: {e}") from None
                q = np.flatnonzero(df[ROLE].astype(str).to_numpy() == QUERY)
                label = df[f.label].to_numpy()[q] if f.label in df.columns else np.full(len(q), np.nan)
                table = pa.table({"task_key": pa.array(df[f.task_key].to_numpy()[q]),
                                  "input_row": pa.array(df["__row"].to_numpy()[q]),
                                  "label": pa.array(label, from_pandas=True),
                                  **{m["column"]: pa.array(scores[i, q].astype(np.float32))
                                     for i, m in enumerate(models)}})
                write_atomic(out / _part(b), lambda p, t=table: pq.write_table(t, p))
                state["done"].append(b)
                state["rows"] += len(q)
                state["tasks"] += int(df[f.task_key].iloc[q].nunique())
                new_rows += len(q)
                write_atomic(progress_file, lambda p: p.write_text(json.dumps(state, indent=2)))
                bar.update(1)
    state["complete"] = True
    write_atomic(progress_file, lambda p: p.write_text(json.dumps(state, indent=2)))
    dt = time.perf_counter() - t0
    log.info("predict: %d query rows of %d tasks from %s in %d part(s) -> %s (%.0f rows/s this run)",
             state["rows"], state["tasks"], input_path, len(state["done"]), out, new_rows / dt)
    return {**state, "out": str(out), "parts": len(state["done"]), "rows_per_s": new_rows / dt, "models": models,
            "new_rows": new_rows, "seconds": dt}
