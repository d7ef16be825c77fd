"""``gmeta predict``: batch inference over many tasks, resumable.

Streams the task shards of a split in manifest order, adapts each task on its support rows
and scores its query rows, and writes Parquet parts ``part-00000.parquet``, ... with
columns task_key, task_id, row (position in the task's query set, in time order), label
and score; with several labels (features.labels) ``label_<name>`` and ``score_<name>`` per
label (model.arch esmm: ``score_<click>`` is pCTR, ``score_<conversion>`` pCTCVR, then
``score_pcvr``, pCVR: the columns of ``gmeta.inference.serving.score_columns``, as raw rows get). Each
part is written to a temporary name and renamed; then ``_progress.json`` records the parts
and the reader's position (written the same way). After an interruption, ``--resume``
deletes any part the progress file does not list and goes on from the recorded position:
every query row is written exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gmeta.checkpoint import config_of, load_unsharded, read_meta
from gmeta.inference.serving import head_outputs, score_columns
from gmeta.io.manifest import check_shards, choose_shards
from gmeta.io.reader import TaskReader, task_keys
from gmeta.parallel.dist import configure_threads, default_device
from gmeta.scoring import inner_steps_for, predict_query
from gmeta.storage import absolute, check_bucket, is_url, location, write_atomic

log = logging.getLogger(__name__)

PROGRESS = "_progress.json"


class PredictError(ValueError):
    """Bad arguments or an output directory that cannot be (re)used. Names the path."""


def open_progress(out: Path, fresh: dict, resume: bool, same: str) -> dict:
    """The progress of the job ``fresh["job"]`` in ``out``: ``fresh`` for a new output, the
    recorded state with ``resume``. Refuses to overwrite predictions without ``resume``, to
    resume another job's (``same``: what must match, for the message), and a directory of
    parts without a progress file. Creates ``out`` (a local one; in an object store a
    directory is only a prefix of its objects' names)."""
    progress_file = out / PROGRESS
    state = fresh
    if progress_file.is_file():
        if not resume:
            raise PredictError(f"{out}: holds predictions already ({PROGRESS}); pass --resume to continue "
                               "them or choose another --out")
        try:
            state = json.loads(progress_file.read_text())
        except json.JSONDecodeError as e:
            raise PredictError(f"{progress_file}: unreadable: {e}") from None
        if state.get("job") != fresh["job"]:
            raise PredictError(f"{progress_file}: written for {state.get('job')}, this run is {fresh['job']}: "
                               f"resume with the same {same}")
    elif out.is_dir() and any(out.glob("part-*.parquet")):
        raise PredictError(f"{out}: holds part files but no {PROGRESS}; choose another --out")
    if not is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    return state


def per_label(column: str, values: np.ndarray, labels: list[str]) -> dict[str, pa.Array]:
    """``values`` ``[rows]`` as the one column ``column``, or ``[rows, L]`` as one column
    ``<column>_<label>`` per label."""
    if values.ndim == 1:
        return {column: pa.array(values.astype(np.float32))}
    if values.shape[1] != len(labels):
        raise PredictError(f"{values.shape[1]} {column}s per row for the labels {labels} (features.labels)")
    return {f"{column}_{name}": pa.array(values[:, i].astype(np.float32)) for i, name in enumerate(labels)}


def scores_by_column(scores: np.ndarray, columns: list[str]) -> dict[str, pa.Array]:
    """Scores ``[rows]`` or ``[rows, W]`` as the W ``columns`` (``score_columns``)."""
    scores = scores.reshape(len(scores), -1)
    if scores.shape[1] != len(columns):
        raise PredictError(f"{scores.shape[1]} score(s) per row for the columns {columns}")
    return {c: pa.array(scores[:, i].astype(np.float32)) for i, c in enumerate(columns)}


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def run_predict(checkpoint: str | Path, out_dir: str | Path, *, shards_dir: str | None = None, split: str = "eval",
                inner_steps: int | None = None, tasks_per_batch: int | None = None, rows_per_part: int = 200_000,
                resume: bool = False, max_tasks: int = 0, progress: bool = True, shards_why: str = "--shards",
                device: torch.device | None = None, allow_other_shards: bool = False) -> dict:
    """Predict every query row of ``split``; returns a summary (rows, tasks, parts, rows/s).
    ``shards_dir`` (chosen by ``shards_why``, for the log): None for the shards the checkpoint
    was trained on. Threads: the checkpoint's train.threads (see ``configure_threads``).
    ``device``: where to adapt and score (default: the GPU if there is one). Shards other
    than those the checkpoint was trained on are refused unless ``allow_other_shards``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    device = device or default_device()
    out = location(out_dir)
    check_bucket(out, "--out")
    meta = read_meta(checkpoint)
    trained = config_of(checkpoint, meta)
    shards = choose_shards(shards_dir, shards_why, trained, checkpoint, command="predict")
    check_shards(checkpoint, meta, trained, shards, allow_other_shards=allow_other_shards, doing="predicting")
    model, cfg, meta = load_unsharded(checkpoint, device)
    configure_threads(cfg.train.threads)
    steps = inner_steps_for(cfg, inner_steps)
    tpb = tasks_per_batch or cfg.eval.tasks_per_batch
    job = {"checkpoint": absolute(checkpoint), "shards": absolute(shards), "split": split,
           "inner_steps": steps, "tasks_per_batch": tpb, "max_tasks": max_tasks}
    reader = TaskReader(shards, split, tpb, shuffle=False, drop_last=False, num_workers=1,
                        pin_memory=device.type == "cuda", on_bad_task=cfg.data.on_bad_task, max_tasks=max_tasks,
                        size_buckets=cfg.meta.size_buckets, partitions=cfg.data.partitions)
    state = open_progress(out, {"job": job, "parts": 0, "rows": 0, "tasks": 0, "reader": None, "complete": False},
                          resume, "checkpoint, shards, split and settings")
    progress_file = out / PROGRESS
    if state["reader"] is not None:
        reader.load_state_dict(state["reader"])
    for stale in out.glob("part-*.parquet*"):  # written after the last recorded progress
        if stale.name.endswith(".tmp") or int(stale.name[5:10]) >= state["parts"]:
            stale.unlink()
    if state["complete"]:
        log.info("predict: %s is complete (%d rows of %d tasks)", out, state["rows"], state["tasks"])
        return {**state, "out": str(out), "rows_per_s": 0.0, "new_rows": 0}

    keys = task_keys(shards, split, cfg.data.partitions)
    labels = cfg.features.label_names()
    columns, outputs = score_columns(cfg), head_outputs(cfg)
    buf: dict[str, list] = {"task_key": [], "task_id": [], "row": [], "label": [], "score": []}
    new_rows = new_tasks = 0

    def flush(final: bool) -> None:
        if buf["score"]:
            table = pa.table({"task_key": pa.array([k for part in buf["task_key"] for k in part]),
                              "task_id": pa.array(np.concatenate(buf["task_id"])),
                              "row": pa.array(np.concatenate(buf["row"]).astype(np.int32)),
                              **per_label("label", np.concatenate(buf["label"]), labels),
                              **scores_by_column(np.concatenate(buf["score"]), columns)})
            write_atomic(out / part_name(state["parts"]), lambda p: pq.write_table(table, p))
            state["parts"] += 1
            for v in buf.values():
                v.clear()
        state["reader"] = reader.state_dict()
        state["complete"] = final
        write_atomic(progress_file, lambda p: p.write_text(json.dumps(state, indent=2)))

    pending = 0
    with tqdm(total=reader.num_tasks, initial=state["tasks"], unit="tasks", desc="predict",
              disable=not progress) as bar:
        for batch in reader:
            probs = predict_query(model, cfg, batch, steps, outputs)
            q_counts = (batch.query_offsets[1:] - batch.query_offsets[:-1]).numpy()
            ids = batch.task_ids.numpy()
            buf["task_key"].append(np.repeat(np.array([keys[int(i)] for i in ids], dtype=object), q_counts))
            buf["task_id"].append(np.repeat(ids, q_counts))
            buf["row"].append(np.arange(len(probs)) - np.repeat(batch.query_offsets[:-1].numpy(), q_counts))
            buf["label"].append(batch.labels[batch.num_support:].numpy())
            buf["score"].append(probs)
            state["rows"] += len(probs)
            state["tasks"] += batch.num_tasks
            new_rows += len(probs)
            new_tasks += batch.num_tasks
            pending += len(probs)
            bar.update(batch.num_tasks)
            if pending >= rows_per_part:
                flush(final=False)
                pending = 0
    flush(final=True)
    dt = time.perf_counter() - t0
    log.info("predict: %d query rows of %d tasks in %d part(s) -> %s (%.0f rows/s, %.0f tasks/s this run)",
             state["rows"], state["tasks"], state["parts"], out, new_rows / dt, new_tasks / dt)
    return {**state, "out": str(out), "rows_per_s": new_rows / dt, "new_rows": new_rows, "seconds": dt}
