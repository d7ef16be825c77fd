"""``gmeta predict --input``: row-level logs of new tasks scored by one or several
checkpoints, in worker processes on one node or several (``gmeta.inference.workers``);
resumable, its output written part by part."""

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

from gmeta.checkpoint import META, config_of, load_unsharded, read_meta
from gmeta.inference.predict import PROGRESS, PredictError, open_progress
from gmeta.inference.serving import ROLE, score_columns
from gmeta.inference.workers import Coordinator, Scorer, bucket_name, node_agent, pipeline
from gmeta.io.errors import PrepareError
from gmeta.io.features import id_hash_of, input_columns, shard_fields
from gmeta.io.prepare import Partitions, num_partitions, open_input, stream_input
from gmeta.io.sources import SourceError
from gmeta.parallel.dist import configure_threads, default_device
from gmeta.scoring import inner_steps_for
from gmeta.storage import absolute, check_bucket, is_url, location, rmtree, upload, write_atomic

log = logging.getLogger(__name__)

# Default number of buckets (units of work): enough to balance a few processes, but no unit
# under UNIT_BYTES of (decoded) input: each unit costs about 10 ms of its own (a small input
# of 300 campaigns ran in 0.81 s in 32 units, 0.52 s in one). More when the memory cap needs them.
UNITS = 32
UNIT_BYTES = 4 << 20


def _reading(cfg, meta: dict, checkpoint: str, has_role: bool) -> dict:
    """What of a checkpoint decides how raw rows become task batches: the columns and label
    encoding, each sparse feature's hashing (shard_fields: not min_count or holdout_share,
    which the model applies; the id hash its tables were trained with), the source format,
    and without a role column the split rule."""
    features = {**asdict(cfg.features), "sparse": [shard_fields(s) for s in cfg.features.sparse]}
    return {"features": features, "id_hash": id_hash_of(meta, f"{checkpoint}/{META}"),
            "data.source": asdict(cfg.data.source),
            **({} if has_role else {"data.split": asdict(cfg.data.split)})}


def _same_reading(loaded: list, checkpoints: list, has_role: bool) -> None:
    """Every model must read the rows as the first does (or one pass would score some of
    them on rows featurised for another). ``loaded``: (model, config, meta) of each."""
    first = _reading(loaded[0][1], loaded[0][2], checkpoints[0], has_role)
    for c, (_, other, meta) in zip(checkpoints[1:], loaded[1:]):
        theirs = _reading(other, meta, c, has_role)
        for key in first:
            if first[key] != theirs[key]:
                raise PredictError(f"--checkpoint {c}: its {key} differ from those of --checkpoint "
                                   f"{checkpoints[0]} in how raw rows are read; models scored in one pass "
                                   "must read the rows alike: predict them in separate runs")


def run_predict_raw(checkpoint: str | Path | list, input_path: str | Path, out_dir: str | Path, *,
                    inner_steps: int | None = None, resume: bool = False, progress: bool = True,
                    memory_mb: int | None = None, device: torch.device | None = None, nproc: int = 1,
                    units: int | None = None, max_restarts: int = 3, schedule: str = "queue", nnodes: int = 1,
                    rdzv_endpoint: str = "", node_timeout_s: float = 60.0, shard_tables: bool = False) -> dict:
    """Score every query row of the raw input with ``checkpoint`` (one, or a list scored in
    one pass); returns a summary (rows, tasks, tasks_without_support, parts, rows/s, models).
    A task without support rows (query rows only) is scored by the shared model, unadapted,
    whatever ``inner_steps``; the output's ``support_rows`` says how many rows each row's
    task adapted on.
    ``memory_mb``: the cap that sizes the buckets (default: the checkpoint's
    data.prepare_memory_mb); ``units``: the least number of buckets (default: UNITS, fewer
    for a small input, see UNIT_BYTES); ``nproc``: worker
    processes (1: in this process); ``max_restarts``: dead workers replaced;
    ``schedule``: "queue" (shared) or "static" (unit i to worker i mod nproc: the baseline
    of the straggler benchmark). Several nodes: this is node 0, ``nnodes`` in all, its store
    at ``rdzv_endpoint`` (host:port the others reach; they run ``run_predict_node``), a node
    whose beat stops for ``node_timeout_s`` counted as lost; the output (and the buckets,
    written under it) must be on a filesystem or object store every node shares.
    ``shard_tables``: the embedding tables sharded among each node's ``nproc`` workers (by
    the checkpoint's sharding plan), for tables too large for one process; they score the
    node's units together, and one that dies restarts them all."""
    from tqdm import tqdm

    if (nproc < 1 or (units is not None and units < 1) or max_restarts < 0 or schedule not in ("queue", "static")
            or nnodes < 1):
        raise PredictError(f"predict: nproc ({nproc}), units ({units}) and nnodes ({nnodes}) must be >= 1, "
                           f"max_restarts ({max_restarts}) >= 0, schedule ({schedule!r}) 'queue' or 'static'")
    host, port = _endpoint(rdzv_endpoint, nnodes)
    if nnodes > 1 and schedule != "queue":
        raise PredictError("predict: several nodes take units from the shared queue only")
    if shard_tables and (nproc < 2 or schedule != "queue"):
        raise PredictError(f"predict: --shard-tables shards the tables among a node's worker processes: it needs "
                           f"--nproc-per-node >= 2 (got {nproc}) and the shared queue")
    t0 = time.perf_counter()
    checkpoints = [str(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint])]
    if len(set(checkpoints)) != len(checkpoints):
        raise PredictError(f"--checkpoint: the same checkpoint given twice: {checkpoints}")
    in_process = nproc == 1 and nnodes == 1
    if in_process:
        here = device or default_device()
        loaded: list = [load_unsharded(c, here) for c in checkpoints]
    else:  # the workers load the models, each on its own GPU (sharded with shard_tables): here their configs only
        loaded = [(None, config_of(c, meta), meta) for c in checkpoints for meta in [read_meta(c)]]
    cfg = loaded[0][1]
    configure_threads(cfg.train.threads)
    f = cfg.features
    input_path, out = location(input_path), location(out_dir)
    check_bucket(out, "--out")
    source = open_input(cfg, input_path)  # the checkpoint's features and source format
    columns = input_columns(cfg)
    has_role = ROLE in source.names
    _same_reading(loaded, checkpoints, has_role)
    read = columns + ([ROLE] if has_role else [])
    try:
        input_bytes, _ = source.estimate(read)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    memory_mb = memory_mb or cfg.data.prepare_memory_mb
    if units is None:
        units = min(UNITS, max(1, -(-input_bytes // UNIT_BYTES)))
    count = max(units, num_partitions(input_bytes, memory_mb))
    models = [{"column": "score" if len(checkpoints) == 1 else f"score_{i}", "checkpoint": absolute(c),
               "inner_steps": inner_steps_for(mc, inner_steps)}
              for i, (c, (_, mc, _)) in enumerate(zip(checkpoints, loaded))]
    for m, (_, mc, _) in zip(models, loaded):  # a column per label <column>_<label> (and esmm's <column>_pcvr)
        if score_columns(mc, str(m["column"])) != [m["column"]]:
            m["columns"] = score_columns(mc, str(m["column"]))
    job = {"models": models, "input": absolute(input_path),
           "buckets": count, "roles": "column" if has_role else "split rule"}
    state = open_progress(out, {"job": job, "done": [], "rows": 0, "tasks": 0, "tasks_without_support": 0,
                                "complete": False}, resume, "checkpoint, input and settings")
    state.setdefault("tasks_without_support", 0)
    progress_file = out / PROGRESS
    done = set(state["done"])
    for stale in out.glob("part-*.parquet*"):  # written after the last recorded progress
        if stale.name.endswith(".tmp") or int(stale.name[5:10]) not in done:
            stale.unlink()
    if state["complete"]:
        log.info("predict: %s is complete (%d rows of %d tasks)", out, state["rows"], state["tasks"])
        return {**state, "out": str(out), "rows_per_s": 0.0, "new_rows": 0, "parts": len(done), "models": models}

    new_rows = 0
    worker_units: dict[int, int] = {}  # slot -> units it finished (first) in this run

    def record(b: int, rows: int, tasks: int, cold: int, slot: int = 0) -> None:
        nonlocal new_rows
        if b in done:  # a dead worker's unit, written again by another: the same part
            return
        worker_units[slot] = worker_units.get(slot, 0) + 1
        done.add(b)
        state["done"].append(b)
        state["rows"] += rows
        state["tasks"] += tasks
        state["tasks_without_support"] += cold
        new_rows += rows
        write_atomic(progress_file, lambda p: p.write_text(json.dumps(state, indent=2)))
        bar.update(1)

    # the buckets: beside the output (where every node sees them), or for an object store on
    # local disk, uploaded next to the output when other nodes need them
    shared = location(f"{out}/.predict-buckets") if is_url(out) and nnodes > 1 else None
    with tempfile.TemporaryDirectory(dir=None if is_url(out) else out, prefix=".predict-") as tmp_name, \
            tqdm(total=count, initial=len(done), unit="bucket", desc="predict", disable=not progress) as bar:
        tmp = Path(tmp_name)
        job_nodes = None
        if not in_process:  # started first: they load the models while this process reads the input
            spec = {"checkpoints": checkpoints, "input": str(input_path), "inner_steps": inner_steps,
                    "has_role": has_role, "out": str(out), "buckets": str(shared or tmp), "schedule": schedule,
                    "gang": nproc if shard_tables else 0, "gang_timeout_s": 1800}
            job_nodes = Coordinator(spec, host, port, nnodes, nproc, max_restarts, node_timeout_s)
        try:
            parts = Partitions(count, tmp, max(1, memory_mb << 20) // 4)

            def add(batch, first_row: int) -> None:  # the rows as they are, with their task key and input position
                t = batch.table
                rows = pa.array(np.arange(first_row, first_row + t.num_rows, dtype=np.int64))
                parts.add(t.append_column("__key", t.column(f.task_key)).append_column("__row", rows))

            stream_input(source, read, input_path, add)
            sizes = {b: p.stat().st_size for b, p in parts.files().items() if b not in done}
            pending = sorted(sizes, key=lambda b: (-sizes[b], b))  # largest first: the last units are short
            # buckets with no query row write an empty part: every bucket counts once
            if job_nodes is None:
                it = iter(pending)
                pipeline(lambda: next(it, None), lambda b: pq.read_table(parts.path(b)), record,
                         Scorer(checkpoints, str(input_path), inner_steps, has_role, here, loaded), out)
            else:
                if shared is not None:
                    for b in pending:
                        upload(parts.path(b), shared / bucket_name(b))
                job_nodes.push(pending)
                while not done.issuperset(pending):
                    for msg in job_nodes.drain():
                        record(msg["unit"], msg["rows"], msg["tasks"], msg["cold"], msg["slot"])
                    job_nodes.check(pending, done)
                    time.sleep(0.02)
                job_nodes.close()
                job_nodes = None
        except BaseException as e:
            if job_nodes is not None:
                job_nodes.fail(f"{type(e).__name__}: {e}")
            raise
        finally:
            if shared is not None:
                rmtree(shared)
    state["complete"] = True
    write_atomic(progress_file, lambda p: p.write_text(json.dumps(state, indent=2)))
    dt = time.perf_counter() - t0
    log.info("predict: %d query rows of %d tasks from %s in %d part(s) -> %s (%.0f rows/s this run)",
             state["rows"], state["tasks"], input_path, len(state["done"]), out, new_rows / dt)
    if state["tasks_without_support"]:
        log.info("predict: %d of the %d tasks had no support rows: scored by the shared model, unadapted "
                 "(support_rows 0 in the output)", state["tasks_without_support"], state["tasks"])
    return {**state, "out": str(out), "parts": len(state["done"]), "rows_per_s": new_rows / dt, "models": models,
            "new_rows": new_rows, "seconds": dt, "worker_units": worker_units}


def _endpoint(rdzv_endpoint: str, nnodes: int) -> tuple[str, int]:
    """(host, port) of node 0's store: any free port on loopback for one node."""
    if nnodes == 1 and not rdzv_endpoint:
        return "127.0.0.1", 0
    host, _, port = rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise PredictError(f"--rdzv-endpoint {rdzv_endpoint!r}: give host:port (node 0's address, which every "
                           "node reaches)")
    return host, int(port)


def run_predict_node(rdzv_endpoint: str, node_rank: int, nproc: int, out_dir: str | Path, *,
                     max_restarts: int = 3) -> int:
    """Node ``node_rank`` >= 1 of a job whose node 0 runs ``run_predict_raw``: its workers take
    units from node 0's queue until the job ends. Returns the exit status."""
    if node_rank < 1 or nproc < 1 or max_restarts < 0:
        raise PredictError(f"predict: node_rank ({node_rank}) and nproc ({nproc}) must be >= 1, max_restarts "
                           f"({max_restarts}) >= 0")
    host, port = _endpoint(rdzv_endpoint, 2)
    return node_agent(host, port, node_rank, nproc, max_restarts, str(out_dir))

