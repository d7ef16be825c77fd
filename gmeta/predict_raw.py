from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from functools import partial
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
from gmeta.predict import PROGRESS, PredictError, open_progress
from gmeta.scoring import inner_steps_for
from gmeta.serving import QUERY, ROLE, assign_roles, featurise_rows, score_featurised
from gmeta.storage import absolute, check_bucket, is_url, location, write_atomic

log = logging.getLogger(__name__)

UNITS = 32  # default least number of buckets (units of work): enough to balance a few processes
# Fault injection for tests and benchmarks, per worker slot W: "slow=W:SECONDS" sleeps before
# scoring each unit, "kill=W:N" SIGKILLs the worker before scoring its N-th unit,
# "kill_written=W:N" after writing its N-th part but before reporting it; comma-separated.
# They hit the first process of a slot only, not the one that replaces it.
FAULTS_ENV = "GMETA_PREDICT_FAULTS"


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


class _Scorer:
    """The models of one job, loaded once per process, and what turns a bucket's rows into
    its part: featurise (reader thread), then adapt and score (main thread)."""

    def __init__(self, checkpoints: list[str], input_path: str, inner_steps: int | None, has_role: bool,
                 device: torch.device, loaded: list | None = None) -> None:
        loaded = loaded or [load_unsharded(c, device) for c in checkpoints]
        self.models = [(m, c) for m, c, _ in loaded]
        self.cfg, self.column_types = loaded[0][1], loaded[0][2].get("input_columns")
        self.input_path, self.inner_steps, self.has_role = input_path, inner_steps, has_role
        self.columns = ["score" if len(loaded) == 1 else f"score_{i}" for i in range(len(loaded))]

    def featurise(self, bucket: pa.Table):
        df = bucket.drop_columns(["__key"]).to_pandas()
        df = df.sort_values("__row", kind="stable").reset_index(drop=True)
        if not self.has_role:
            df = assign_roles(df, self.cfg)
        try:
            return df, featurise_rows(df, self.cfg, self.column_types)
        except PrepareError as e:
            raise PrepareError(f"{self.input_path}: {e}") from None

    def score(self, df, featurised) -> tuple[pa.Table, int]:
        """The part of one bucket (its query rows) and its number of tasks."""
        f = self.cfg.features
        scores = score_featurised(self.models, featurised, len(df), self.inner_steps)
        q = np.flatnonzero(df[ROLE].astype(str).to_numpy() == QUERY)
        label = df[f.label].to_numpy()[q] if f.label in df.columns else np.full(len(q), np.nan)
        table = pa.table({"task_key": pa.array(df[f.task_key].to_numpy()[q]),
                          "input_row": pa.array(df["__row"].to_numpy()[q]),
                          "label": pa.array(label, from_pandas=True),
                          **{c: pa.array(scores[i, q].astype(np.float32)) for i, c in enumerate(self.columns)}})
        return table, int(df[f.task_key].iloc[q].nunique())


def _write_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table, str(path))


def _put(q: queue.Queue, item, alive) -> None:
    """``q.put`` that gives up once ``alive()`` is false (its consumer is gone)."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if not alive():
                raise RuntimeError("predict: a pipeline thread died") from None


def _pipeline(claim, load, finished, scorer: _Scorer, out: Path, faults: dict | None = None) -> None:
    """Score units until ``claim()`` returns None: a reader thread claims, loads and
    featurises the next unit while this thread adapts and scores the current one; a writer
    thread writes each part and then calls ``finished(unit, rows, tasks)``. An error in any
    stage is raised here, after the parts already scored are written and reported."""
    faults = faults or {}
    ready: queue.Queue = queue.Queue(maxsize=1)
    written: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                b = claim()
                if b is None:
                    break
                _put(ready, (b, *scorer.featurise(load(b))), lambda: not stop.is_set())
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            _put(ready, e, lambda: not stop.is_set())
            return
        _put(ready, None, lambda: not stop.is_set())

    def write() -> None:
        n = 0
        try:
            while (item := written.get()) is not None:
                b, table, tasks = item
                write_atomic(out / _part(b), partial(_write_table, table))
                n += 1
                if faults.get("kill_written") == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                finished(b, table.num_rows, tasks)
        except BaseException as e:  # noqa: BLE001 - raised by the main thread
            errors.append(e)

    reader = threading.Thread(target=read, name="predict-reader", daemon=True)
    writer = threading.Thread(target=write, name="predict-writer", daemon=True)
    reader.start()
    writer.start()
    scored = 0
    try:
        while True:
            try:
                item = ready.get(timeout=0.1)
            except queue.Empty:
                if errors:
                    raise errors[0] from None
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            b, df, featurised = item
            scored += 1
            if faults.get("kill") == scored:
                os.kill(os.getpid(), signal.SIGKILL)
            if faults.get("slow"):
                time.sleep(faults["slow"])
            _put(written, (b, *scorer.score(df, featurised)), writer.is_alive)
    finally:
        stop.set()  # the reader claims nothing more; what is scored is still written
        if writer.is_alive():
            written.put(None)
            writer.join()
        reader.join(timeout=5)
    if errors:
        raise errors[0]


def _faults(wid: int) -> dict:
    out = {}
    for item in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        kind, _, rest = item.partition("=")
        w, _, value = rest.partition(":")
        if int(w) == wid:
            out[kind] = float(value) if kind == "slow" else int(value)
    return out


def _queue_name(schedule: str, slot: int) -> str:
    return "units" if schedule == "queue" else f"units/{slot}"


def worker_main(spec_path: str, slot: int, generation: int) -> int:
    """One worker process: connect to the coordinator's store, load the models, score
    units from the queue until the coordinator closes it."""
    started = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    store = torch.distributed.TCPStore(spec["host"], spec["port"], is_master=False,
                                       timeout=timedelta(seconds=spec["timeout_s"]))
    try:
        device = default_device()
        if device.type == "cuda":
            device = torch.device("cuda", slot % torch.cuda.device_count())
        scorer = _Scorer(spec["checkpoints"], spec["input"], spec["inner_steps"], spec["has_role"], device)
        configure_threads(scorer.cfg.train.threads)
        claims: set[int] = set()
        lock = threading.Lock()
        name = _queue_name(spec["schedule"], slot)

        def publish() -> None:
            store.set(f"claims/{slot}", json.dumps(sorted(claims)))

        def claim() -> int | None:
            while True:
                try:
                    b = int(store.queue_pop(name, block=False))
                except torch.distributed.QueueEmptyError:
                    if store.check(["closed"]):
                        return None
                    time.sleep(0.02)  # units can come back: another worker's, after it died
                    continue
                with lock:
                    claims.add(b)
                    publish()
                return b

        def finished(b: int, rows: int, tasks: int) -> None:
            store.queue_push("done", json.dumps({"unit": b, "rows": rows, "tasks": tasks, "slot": slot}))
            with lock:
                claims.discard(b)
                publish()

        buckets = Path(spec["buckets"])
        count = {"units": 0, "rows": 0}
        t0 = time.perf_counter()

        def finished_counted(b: int, rows: int, tasks: int) -> None:
            finished(b, rows, tasks)
            count["units"] += 1
            count["rows"] += rows

        _pipeline(claim, lambda b: pq.read_table(buckets / f"bucket-{b:05d}.parquet"), finished_counted, scorer,
                  location(spec["out"]), _faults(slot) if generation == 0 else {})
        log.info("predict worker %d: %d unit(s), %d query rows in %.1fs after loading its model(s) in %.1fs",
                 slot, count["units"], count["rows"], time.perf_counter() - t0, t0 - started)
    except Exception as e:  # noqa: BLE001 - reported to the coordinator, which stops the job
        store.set(f"error/{slot}", json.dumps({"kind": type(e).__name__, "message": str(e)}))
        log.exception("predict worker %d failed", slot)
        return 1
    return 0


class _Workers:
    """The coordinator's side of a multi-process job: the store, the worker processes, and
    the bookkeeping that reissues a dead worker's units."""

    def __init__(self, nproc: int, spec: dict, spec_path: Path, max_restarts: int) -> None:
        self.store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                                timeout=timedelta(seconds=spec["timeout_s"]))
        spec.update(host="127.0.0.1", port=self.store.port)
        spec_path.write_text(json.dumps(spec))
        self.spec, self.spec_path, self.restarts_left = spec, spec_path, max_restarts
        self.procs: dict[int, subprocess.Popen] = {}
        self.generation: dict[int, int] = {}
        self.deaths, self.quiet_since = 0, 0.0
        env = {**os.environ, "LOCAL_WORLD_SIZE": str(nproc)}
        env.pop("RANK", None)
        self.env = env
        for slot in range(nproc):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self.store.set(f"claims/{slot}", "[]")
        self.store.delete_key(f"error/{slot}")
        self.generation[slot] = self.generation.get(slot, -1) + 1
        self.procs[slot] = subprocess.Popen([sys.executable, "-m", "gmeta.predict_raw", str(self.spec_path),
                                             str(slot), str(self.generation[slot])], env=self.env)

    def push(self, units: list[int]) -> None:
        alive = sorted(self.procs)
        for i, b in enumerate(units):
            self.store.queue_push(_queue_name(self.spec["schedule"], alive[i % len(alive)]), str(b))

    def drain(self) -> list[dict]:
        got = []
        while self.store.queue_len("done"):
            got.append(json.loads(self.store.queue_pop("done", block=False)))
        return got

    def check(self, done: set[int]) -> None:
        """Handle workers that exited: raise a worker's error; put a dead worker's unfinished
        units back in the queue and replace it while restarts are left."""
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or code == 0:
                continue
            del self.procs[slot]
            if self.store.check([f"error/{slot}"]):
                err = json.loads(self.store.get(f"error/{slot}"))
                cls = PrepareError if err["kind"] == "PrepareError" else PredictError
                raise cls(err["message"] if cls is PrepareError else
                          f"predict worker {slot} failed: {err['kind']}: {err['message']}")
            lost = [b for b in json.loads(self.store.get(f"claims/{slot}")) if b not in done]
            if self.spec["schedule"] == "static":  # its own queue's units too
                name = _queue_name("static", slot)
                while self.store.queue_len(name):
                    lost.append(int(self.store.queue_pop(name, block=False)))
            self.deaths += 1
            why = f"signal {-code}" if code < 0 else f"exit status {code}"
            replace = self.restarts_left > 0
            log.warning("predict: worker %d died (%s) holding unit(s) %s: %s", slot, why, lost,
                        "it is replaced, its units go back to the queue" if replace else
                        "its units go to the other workers")
            if replace:
                self.restarts_left -= 1
                self._spawn(slot)
            elif not self.procs:
                raise PredictError(f"predict: every worker died (the last: {why}) and no restarts are left; "
                                   "continue with --resume")
            self.push(lost)

    def reissue_lost(self, pending: list[int], done: set[int]) -> None:
        """A worker killed after popping a unit but before publishing its claim took that unit
        with it. So once a worker has died, when every queue has been empty and no claim held
        for a second while units are missing, put the missing ones back. (A live worker
        between pop and publish makes this a duplicate: written again, recorded once.)"""
        if not self.deaths:
            return
        names = ["units"] if self.spec["schedule"] == "queue" else [_queue_name("static", s) for s in self.procs]
        quiet = (not any(self.store.queue_len(n) for n in names)
                 and all(self.store.get(f"claims/{s}") == b"[]" for s in self.procs))
        if not quiet:
            self.quiet_since = 0.0
            return
        self.quiet_since = self.quiet_since or time.monotonic()
        missing = [b for b in pending if b not in done]
        if missing and time.monotonic() - self.quiet_since > 1.0:
            log.warning("predict: unit(s) %s were claimed by no live worker: put back in the queue", missing)
            self.push(missing)
            self.quiet_since = 0.0

    def close(self) -> None:
        self.store.set("closed", "1")
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def kill(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


def run_predict_raw(checkpoint: str | Path | list, input_path: str | Path, out_dir: str | Path, *,
                    inner_steps: int | None = None, resume: bool = False, progress: bool = True,
                    memory_mb: int | None = None, device: torch.device | None = None, nproc: int = 1,
                    units: int = UNITS, max_restarts: int = 3, schedule: str = "queue") -> dict:
    """Score every query row of the raw input with ``checkpoint`` (one, or a list scored in
    one pass); returns a summary (rows, tasks, parts, rows/s, models).
    ``memory_mb``: the cap that sizes the buckets (default: the checkpoint's
    data.prepare_memory_mb); ``units``: the least number of buckets; ``nproc``: worker
    processes (1: in this process); ``max_restarts``: dead workers replaced;
    ``schedule``: "queue" (shared) or "static" (unit i to worker i mod nproc: the baseline
    of the straggler benchmark)."""
    from tqdm import tqdm

    if nproc < 1 or units < 1 or max_restarts < 0 or schedule not in ("queue", "static"):
        raise PredictError(f"predict: nproc ({nproc}) and units ({units}) must be >= 1, max_restarts "
                           f"({max_restarts}) >= 0, schedule ({schedule!r}) 'queue' or 'static'")
    t0 = time.perf_counter()
    device = device or default_device()
    checkpoints = [str(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint])]
    if len(set(checkpoints)) != len(checkpoints):
        raise PredictError(f"--checkpoint: the same checkpoint given twice: {checkpoints}")
    loaded = [load_unsharded(c, device) for c in checkpoints]
    cfg = loaded[0][1]
    configure_threads(cfg.train.threads)
    f = cfg.features
    input_path, out = location(input_path), location(out_dir)
    check_bucket(out, "--out")
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
    count = max(units, num_partitions(input_bytes, memory_mb))
    models = [{"column": "score" if len(checkpoints) == 1 else f"score_{i}", "checkpoint": absolute(c),
               "inner_steps": inner_steps_for(mc, inner_steps)}
              for i, (c, (_, mc, _)) in enumerate(zip(checkpoints, loaded))]
    job = {"models": models, "input": absolute(input_path),
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

    def record(b: int, rows: int, tasks: int) -> None:
        nonlocal new_rows
        if b in done:  # a dead worker's unit, written again by another: the same part
            return
        done.add(b)
        state["done"].append(b)
        state["rows"] += rows
        state["tasks"] += tasks
        new_rows += rows
        write_atomic(progress_file, lambda p: p.write_text(json.dumps(state, indent=2)))
        bar.update(1)

    # the buckets: beside the output, or for an object store on local disk (the workers are local)
    with tempfile.TemporaryDirectory(dir=None if is_url(out) else out, prefix=".predict-") as tmp_name, \
            tqdm(total=count, initial=len(done), unit="bucket", desc="predict", disable=not progress) as bar:
        tmp = Path(tmp_name)
        workers = None
        if nproc > 1:  # started first: they load the models while this process reads the input
            spec = {"checkpoints": checkpoints, "input": str(input_path), "inner_steps": inner_steps,
                    "has_role": has_role, "out": str(out), "buckets": str(tmp), "schedule": schedule,
                    "timeout_s": 300}
            workers = _Workers(nproc, spec, tmp / "job.json", max_restarts)
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
            if workers is None:
                it = iter(pending)
                _pipeline(lambda: next(it, None), lambda b: pq.read_table(parts.path(b)), record,
                          _Scorer(checkpoints, str(input_path), inner_steps, has_role, device, loaded), out)
            else:
                workers.push(pending)
                while not done.issuperset(pending):
                    for msg in workers.drain():
                        record(msg["unit"], msg["rows"], msg["tasks"])
                    workers.check(done)
                    workers.reissue_lost(pending, done)
                    time.sleep(0.02)
                workers.close()
                workers = None
        finally:
            if workers is not None:
                workers.kill()
    state["complete"] = True
    write_atomic(progress_file, lambda p: p.write_text(json.dumps(state, indent=2)))
    dt = time.perf_counter() - t0
    log.info("predict: %d query rows of %d tasks from %s in %d part(s) -> %s (%.0f rows/s this run)",
             state["rows"], state["tasks"], input_path, len(state["done"]), out, new_rows / dt)
    return {**state, "out": str(out), "parts": len(state["done"]), "rows_per_s": new_rows / dt, "models": models,
            "new_rows": new_rows, "seconds": dt}


if __name__ == "__main__":  # a worker process: ``python -m gmeta.predict_raw SPEC SLOT GENERATION``
    from gmeta.logs import setup_logging
    from gmeta.predict_raw import worker_main as main  # this module under its own name (and logger)

    setup_logging(None)
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
