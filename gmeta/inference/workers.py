"""The worker processes of ``gmeta predict --input`` (gmeta.inference.predict_raw), on one node or
several: how each scores units, how the units are handed out, and what happens when a
worker or a node dies.

The job's units (buckets of tasks) wait on a queue in a torch.distributed ``TCPStore`` (the
c10d store torchrun uses) that the launching process of node 0 holds. Each worker pops the
next unit when it is free, publishes the units it holds (``claims/<slot>``), and reports
each finished one on the queue ``done``. Worker slots are numbered across nodes (node r
holds slots r*N .. r*N+N-1). A node's agent (the launching process on every node, node 0's
included) watches its workers: one that dies has its claims put back on the queue and is
replaced while restarts are left. Every agent beats (``beat/<node>``); node 0 puts back the
claims of a node whose beat stops (a machine lost), and stops the job on a worker's error
(``error/<slot>``), telling the other nodes (``failed``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.distributed import TCPStore

from gmeta.checkpoint import META, load_unsharded
from gmeta.inference.predict import PredictError, part_name
from gmeta.inference.serving import (
    QUERY,
    ROLE,
    SUPPORT,
    assign_roles,
    featurise_rows,
    head_outputs,
    put_scores,
    score_array,
    score_columns,
    score_featurised,
    steps_for_batch,
)
from gmeta.io.errors import PrepareError
from gmeta.io.features import id_hash_of
from gmeta.parallel.dist import configure_threads, pick_device
from gmeta.storage import location, source, write_atomic

log = logging.getLogger(__name__)

# Fault injection for tests and benchmarks, per worker slot W: "slow=W:SECONDS" sleeps before
# scoring each unit, "kill=W:N" SIGKILLs the worker before scoring its N-th unit (once those
# before it are reported),
# "kill_written=W:N" after writing its N-th part but before reporting it; "wait=W:P" claims
# nothing until a worker of slot P has claimed a unit, "wait_done=W:P" until one has finished
# a unit (so that a test's second node, which starts later, surely gets work however slowly
# it starts: the counters claimed/<slot> and finished/<slot> in the store); comma-separated.
# They hit the first process of a slot only, not the one that replaces it.
FAULTS_ENV = "GMETA_PREDICT_FAULTS"
STORE_TIMEOUT_S = 300


def bucket_name(bucket: int) -> str:
    return f"bucket-{bucket:05d}.parquet"


class Scorer:
    """The models of one job, loaded once per process, and what turns a bucket's rows into
    its part: featurise (reader thread), then adapt and score (main thread)."""

    def __init__(self, checkpoints: list[str], input_path: str, inner_steps: int | None, has_role: bool,
                 device: torch.device, loaded: list | None = None) -> None:
        loaded = loaded or [load_unsharded(c, device) for c in checkpoints]
        self.models = [(m, c) for m, c, _ in loaded]
        self.cfg, self.column_types = loaded[0][1], loaded[0][2].get("input_columns")
        # every model reads the rows alike (run_predict_raw checks it), the first's way
        self.id_hash = id_hash_of(loaded[0][2], f"{checkpoints[0]}/{META}")
        self.input_path, self.inner_steps, self.has_role = input_path, inner_steps, has_role
        # per model ``score`` / ``score_<i>`` (several models), per label ``<that>_<label>``
        # (several labels): the names gmeta predict --shards writes for one model
        self.columns = [score_columns(c, "score" if len(loaded) == 1 else f"score_{i}")
                        for i, (_, c, _) in enumerate(loaded)]

    def featurise(self, bucket: pa.Table):
        df = bucket.drop_columns(["__key"]).to_pandas()
        df = df.sort_values("__row", kind="stable").reset_index(drop=True)
        if not self.has_role:
            df = assign_roles(df, self.cfg)
        try:
            return df, featurise_rows(df, self.cfg, self.column_types, id_hash=self.id_hash)
        except PrepareError as e:
            raise PrepareError(f"{self.input_path}: {e}") from None

    def score(self, df, featurised) -> tuple[pa.Table, int, int]:
        """The part of one bucket (its query rows), its number of tasks and of those
        without support rows."""
        return self.part(df, score_featurised(self.models, featurised, len(df), self.inner_steps))

    def score_gang(self, df, featurised, rank: int, size: int) -> tuple[pa.Table, int, int] | None:
        """``score`` by the ``size`` processes of a gang whose models' tables are sharded
        among them (collective: every rank calls it with the same unit): rank r adapts and
        scores batches r, r + size, ...; ranks with fewer batches repeat their last one for
        the tables' all-to-all and drop it. Rank 0 gathers the scores and returns the part,
        the others None."""
        from gmeta.scoring import inner_steps_for, predict_query

        mine = featurised[rank::size]
        rounds = -(-len(featurised) // size)
        scores = score_array(self.models, len(df))
        for i, (model, cfg) in enumerate(self.models):
            steps = inner_steps_for(cfg, self.inner_steps)
            outputs = head_outputs(cfg)
            for j in range(rounds):
                batch, positions = mine[min(j, len(mine) - 1)] if mine else featurised[0]
                preds = predict_query(model, cfg, batch, steps_for_batch(batch, steps), outputs)
                if j < len(mine):
                    put_scores(scores, i, positions, preds)
        gathered: list = [None] * size if rank == 0 else []
        torch.distributed.gather_object(scores, gathered if rank == 0 else None, dst=0)
        if rank:
            return None
        merged = gathered[0]
        for other in gathered[1:]:
            merged = np.where(np.isnan(merged), other, merged)
        return self.part(df, merged)

    def part(self, df, scores: np.ndarray) -> tuple[pa.Table, int, int]:
        """The part's table, its tasks, and its tasks without support rows. ``support_rows``:
        the support rows each row's task adapted on (0: the shared model's score). The query
        rows' labels as the input gave them: ``label``, or ``label_<name>`` per label of
        ``features.labels`` (as gmeta predict --shards names them)."""
        f = self.cfg.features
        role = df[ROLE].astype(str).to_numpy()
        q = np.flatnonzero(role == QUERY)
        keys = df[f.task_key].iloc[q]
        support = keys.map(df[f.task_key][role == SUPPORT].value_counts()).fillna(0).to_numpy(dtype=np.int32)
        names = f.label_names()
        labels = {"label" if len(names) == 1 else f"label_{name}":
                  pa.array(df[name].to_numpy()[q] if name in df.columns else np.full(len(q), np.nan), from_pandas=True)
                  for name in names}
        per_row = scores.reshape(len(self.columns), len(df), -1)[:, q]  # [models, query rows, labels]
        table = pa.table({"task_key": pa.array(keys.to_numpy()),
                          "input_row": pa.array(df["__row"].to_numpy()[q]),
                          **labels,
                          "support_rows": pa.array(support, pa.int32()),
                          **{c: pa.array(per_row[i, :, j].astype(np.float32))
                             for i, cols in enumerate(self.columns) for j, c in enumerate(cols)}})
        return table, int(keys.nunique()), int(keys[support == 0].nunique())


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


def pipeline(claim, load, finished, scorer: Scorer, out: Path, faults: dict | None = None) -> None:
    """Score units until ``claim()`` returns None: a reader thread claims, loads and
    featurises the next unit while this thread adapts and scores the current one; a writer
    thread writes each part and then calls ``finished(unit, rows, tasks,
    tasks_without_support)``. An error in any stage is raised here, after the parts already
    scored are written and reported."""
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

    reported = [0]  # units written and reported (the test faults wait on it)

    def write() -> None:
        n = 0
        try:
            while (item := written.get()) is not None:
                b, table, tasks, cold = item
                write_atomic(out / part_name(b), partial(_write_table, table))
                n += 1
                if faults.get("kill_written") == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                finished(b, table.num_rows, tasks, cold)
                reported[0] += 1
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
                # the units before it written and reported first, whatever the machine's load
                # (a kill between writing and reporting is the kill_written fault)
                while reported[0] < scored - 1 and writer.is_alive():
                    time.sleep(0.01)
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


def _faults(slot: int) -> dict:
    out: dict = {}
    for item in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        kind, _, rest = item.partition("=")
        w, _, value = rest.partition(":")
        if int(w) == slot:
            out[kind] = float(value) if kind == "slow" else int(value)
    return out


def queue_name(schedule: str, slot: int) -> str:
    return "units" if schedule == "queue" else f"units/{slot}"


def _read_bucket(buckets, b: int) -> pa.Table:
    with source(location(buckets) / bucket_name(b)) as src:
        return pq.read_table(src)


def worker_device(slot: int) -> tuple[torch.device, str]:
    """The device and collective backend of worker ``slot``: the GPU of its place among its
    node's workers (``LOCAL_WORLD_SIZE``, set by ``Node``), made the current device before
    anything touches CUDA (a first CUDA call would make a context on GPU 0 in every worker
    otherwise), or the CPU."""
    return pick_device(slot % int(os.environ["LOCAL_WORLD_SIZE"]))


def worker_main(host: str, port: int, slot: int, generation: int) -> int:
    """One worker process: connect to node 0's store, load the models, score units from
    the queue until the job is closed."""
    started = time.perf_counter()
    store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    spec = json.loads(store.get("spec"))
    try:
        device, backend = worker_device(slot)
        gang = spec.get("gang", 0)
        if gang:  # the tables sharded among the node's workers: one process group per node and generation
            from gmeta.checkpoint import load_sharded

            torch.distributed.init_process_group(
                backend, store=torch.distributed.PrefixStore(f"gang/{slot // gang}/{generation}", store),
                rank=slot % gang, world_size=gang, timeout=timedelta(seconds=spec["gang_timeout_s"]))
            loaded = [load_sharded(c, device) for c in spec["checkpoints"]]
            here, whole = _table_bytes(loaded[0][0])
            log.info("predict worker %d: tables sharded among %d processes: %.3f of %.3f MiB of embedding rows "
                     "here", slot, gang, here / 2**20, whole / 2**20)
        else:
            loaded = None
        scorer = Scorer(spec["checkpoints"], spec["input"], spec["inner_steps"], spec["has_role"], device, loaded)
        configure_threads(scorer.cfg.train.threads)
        claims: set[int] = set()
        lock = threading.Lock()
        name = queue_name(spec["schedule"], slot)
        count = {"units": 0, "rows": 0}

        def publish() -> None:
            store.set(f"claims/{slot}", json.dumps(sorted(claims)))

        faults = _faults(slot) if generation == 0 else {}
        waits = [(f"{kind}/{faults.pop(fault)}", fault)
                 for fault, kind in (("wait", "claimed"), ("wait_done", "finished")) if fault in faults]
        counting = bool(os.environ.get(FAULTS_ENV))  # the counters serve the test faults only

        def count_in_store(key: str) -> None:
            if counting:
                store.add(key, 1)

        def claim() -> int | None:
            while waits:
                key, fault = waits.pop()
                deadline = time.monotonic() + STORE_TIMEOUT_S
                while store.add(key, 0) == 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{FAULTS_ENV}: {fault}: no {key} in {STORE_TIMEOUT_S}s")
                    time.sleep(0.02)
            while True:
                try:
                    b = int(store.queue_pop(name, block=False))
                except torch.distributed.QueueEmptyError:
                    if store.check(["closed"]) or store.check(["failed"]):
                        return None
                    time.sleep(0.02)  # units can come back: another worker's, after it died
                    continue
                with lock:
                    claims.add(b)
                    publish()
                count_in_store(f"claimed/{slot}")
                return b

        def finished(b: int, rows: int, tasks: int, cold: int) -> None:
            store.queue_push("done", json.dumps({"unit": b, "rows": rows, "tasks": tasks, "cold": cold,
                                                 "slot": slot}))
            with lock:
                claims.discard(b)
                publish()
            count_in_store(f"finished/{slot}")
            count["units"] += 1
            count["rows"] += rows

        t0 = time.perf_counter()
        if gang:
            _gang_loop(claim, partial(_read_bucket, spec["buckets"]), finished, scorer, location(spec["out"]),
                       slot % gang, gang, faults)
            torch.distributed.destroy_process_group()
        else:
            pipeline(claim, partial(_read_bucket, spec["buckets"]), finished, scorer, location(spec["out"]), faults)
        log.info("predict worker %d: %d unit(s), %d query rows in %.1fs after loading its model(s) in %.1fs",
                 slot, count["units"], count["rows"], time.perf_counter() - t0, t0 - started)
    except Exception as e:  # noqa: BLE001 - reported to node 0, which stops the job
        store.set(f"error/{slot}", json.dumps({"kind": type(e).__name__, "message": str(e)}))
        log.exception("predict worker %d failed", slot)
        return 1
    return 0


def _table_bytes(model) -> tuple[int, int]:
    """(bytes of embedding rows this process holds, bytes of the whole tables) of a sharded
    model: its ShardedTensor (or DTensor) entries."""
    here = whole = 0
    for v in model.state_dict().values():
        if hasattr(v, "local_shards"):
            local = [s.tensor for s in v.local_shards()]
        elif hasattr(v, "to_local"):
            local = [v.to_local()]
        else:
            continue
        here += sum(t.numel() * t.element_size() for t in local)
        whole += math.prod(v.size()) * torch.empty((), dtype=v.dtype).element_size()
    return here, whole


def _gang_loop(claim, load, finished, scorer: Scorer, out: Path, rank: int, size: int, faults: dict) -> None:
    """The units of a gang (tables sharded among its processes), one at a time: rank 0
    claims the next unit and tells the others; all read and featurise it and score their
    share of its batches; rank 0 writes the part and reports it. (No reader thread here:
    the claim is a collective step too.)"""
    scored = 0
    while True:
        unit = [claim() if rank == 0 else None]
        torch.distributed.broadcast_object_list(unit, src=0)
        b = unit[0]
        if b is None:
            return
        df, featurised = scorer.featurise(load(b))
        scored += 1
        if faults.get("kill") == scored:
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.get("slow"):
            time.sleep(faults["slow"])
        result = scorer.score_gang(df, featurised, rank, size)
        if result is not None:
            table, tasks, cold = result
            write_atomic(out / part_name(b), partial(_write_table, table))
            finished(b, table.num_rows, tasks, cold)


def worker_error(store: TCPStore, slot: int) -> Exception:
    """The error a worker reported, as the exception the job raises: a PrepareError (bad
    input) as it is, anything else as a PredictError naming the worker."""
    err = json.loads(store.get(f"error/{slot}"))
    if err["kind"] == "PrepareError":
        return PrepareError(err["message"])
    return PredictError(f"predict worker {slot} failed: {err['kind']}: {err['message']}")


class Node:
    """The worker processes of one node (slots ``node * nproc`` on): started, watched, and
    replaced when they die, their claimed units put back on the queue."""

    def __init__(self, store: TCPStore, host: str, port: int, node: int, nproc: int, schedule: str,
                 max_restarts: int, gang: bool = False) -> None:
        self.store, self.host, self.port, self.node = store, host, port, node
        self.schedule, self.restarts_left, self.gang = schedule, max_restarts, gang
        self.procs: dict[int, subprocess.Popen] = {}
        self.generation: dict[int, int] = {}
        self.env = {**os.environ, "LOCAL_WORLD_SIZE": str(nproc)}
        self.env.pop("RANK", None)
        for slot in range(node * nproc, (node + 1) * nproc):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self.store.set(f"claims/{slot}", "[]")
        self.store.delete_key(f"error/{slot}")
        self.generation[slot] = self.generation.get(slot, -1) + 1
        self.procs[slot] = subprocess.Popen(
            [sys.executable, "-m", "gmeta.inference.workers", self.host, str(self.port), str(slot),
             str(self.generation[slot])], env=self.env)

    def push(self, units: list[int]) -> None:
        """Units onto the queue (static schedule: onto this node's workers' own queues)."""
        alive = sorted(self.procs)
        for i, b in enumerate(units):
            self.store.queue_push(queue_name(self.schedule, alive[i % len(alive)] if alive else 0), str(b))

    def check(self) -> None:
        """Beat; handle workers that exited: raise a worker's error; put a dead worker's
        claimed units back on the queue and replace it while restarts are left. When the
        last worker is gone and none may replace it, the node is marked down."""
        self.store.add(f"beat/{self.node}", 1)
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or code == 0:
                continue
            del self.procs[slot]
            if self.store.check([f"error/{slot}"]):
                raise worker_error(self.store, slot)
            if self.gang:
                self._restart_gang(slot, code)
                return
            lost = json.loads(self.store.get(f"claims/{slot}"))
            if self.schedule == "static":  # its own queue's units too
                name = queue_name("static", slot)
                while self.store.queue_len(name):
                    lost.append(int(self.store.queue_pop(name, block=False)))
            self.store.add("deaths", 1)
            why = f"signal {-code}" if code < 0 else f"exit status {code}"
            replace = self.restarts_left > 0
            log.warning("predict: worker %d died (%s) holding unit(s) %s: %s", slot, why, lost,
                        "it is replaced, its units go back to the queue" if replace else
                        "its units go to the other workers")
            if replace:
                self.restarts_left -= 1
                self._spawn(slot)
            if not self.procs:
                self.store.set(f"down/{self.node}", why)
            if self.schedule == "queue" or self.procs:
                self.push(lost)
            else:  # static, no worker left here: the queue every worker reads last
                for b in lost:
                    self.store.queue_push("units", str(b))

    def _restart_gang(self, slot: int, code: int) -> None:
        """A gang (tables sharded among this node's workers) cannot go on without one of
        them: stop the rest, put the gang's claimed units back on the queue, and start the
        whole gang again (a new process group) while restarts are left."""
        slots = sorted([slot, *self.procs])
        self.kill()
        self.procs.clear()
        lost = [b for s in slots for b in json.loads(self.store.get(f"claims/{s}"))]
        self.store.add("deaths", 1)
        why = f"signal {-code}" if code < 0 else f"exit status {code}"
        replace = self.restarts_left > 0
        log.warning("predict: worker %d of the gang %s died (%s) holding unit(s) %s: %s", slot, slots, why, lost,
                    "the gang is started again" if replace else "its units go to the other nodes")
        if replace:
            self.restarts_left -= 1
            for s in slots:
                self._spawn(s)
        else:
            self.store.set(f"down/{self.node}", why)
        for b in lost:
            self.store.queue_push("units", str(b))

    def close(self, timeout_s: float = 60) -> None:
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()

    def kill(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


class Coordinator:
    """Node 0's view of the whole job: the store, its own node, the other nodes' beats, and
    the units that must come back."""

    def __init__(self, spec: dict, host: str, port: int, nnodes: int, nproc: int, max_restarts: int,
                 node_timeout_s: float) -> None:
        self.store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=STORE_TIMEOUT_S))
        self.port = self.store.port
        self.store.set("spec", json.dumps(spec))
        self.schedule, self.nnodes, self.nproc, self.node_timeout_s = spec["schedule"], nnodes, nproc, node_timeout_s
        self.node = Node(self.store, host if nnodes > 1 else "127.0.0.1", self.port, 0, nproc, self.schedule,
                         max_restarts, gang=bool(spec.get("gang")))
        self.beats: dict[int, tuple[int, float]] = {}  # node -> (last beat seen, when it changed)
        self.lost_nodes: set[int] = set()
        self.quiet_since = 0.0

    def push(self, units: list[int]) -> None:
        self.node.push(units)

    def drain(self) -> list[dict]:
        got = []
        while self.store.queue_len("done"):
            got.append(json.loads(self.store.queue_pop("done", block=False)))
        return got

    def slots(self, node: int) -> range:
        return range(node * self.nproc, (node + 1) * self.nproc)

    def check(self, pending: list[int], done: set[int]) -> None:
        """Raise the first worker error of any node, or when every node is down; put back
        the units of a node whose beat stopped and the units no live worker holds."""
        self.node.check()
        for node in range(1, self.nnodes):
            for slot in self.slots(node):
                if self.store.check([f"error/{slot}"]):
                    raise worker_error(self.store, slot)
            beat = self.store.add(f"beat/{node}", 0)
            last = self.beats.get(node)
            now = time.monotonic()
            if last is None or beat != last[0]:
                self.beats[node] = (beat, now)
            elif beat and node not in self.lost_nodes and now - last[1] > self.node_timeout_s:
                self.lost_nodes.add(node)
                self.store.set(f"down/{node}", "no beat")
                lost = [b for s in self.slots(node) for b in json.loads(self.store.get(f"claims/{s}"))
                        if b not in done]
                log.warning("predict: node %d sent no beat for %.0fs: its unit(s) %s go to the other nodes",
                            node, now - last[1], lost)
                self.store.add("deaths", 1)
                self.node.push(lost)
        if all(self.store.check([f"down/{n}"]) for n in range(self.nnodes)):
            raise PredictError("predict: every worker died and no restarts are left; continue with --resume")
        self._reissue_lost(pending, done)

    def _reissue_lost(self, pending: list[int], done: set[int]) -> None:
        """A worker killed after popping a unit but before publishing its claim took that unit
        with it. So once a worker has died, when every queue has been empty and no claim held
        for a second while units are missing, put the missing ones back. (A live worker
        between pop and publish makes this a duplicate: written again, recorded once.)"""
        if not self.store.add("deaths", 0):
            return
        live = [s for n in range(self.nnodes) if n not in self.lost_nodes for s in self.slots(n)]
        names = ["units"] + ([queue_name("static", s) for s in live] if self.schedule == "static" else [])
        quiet = (not any(self.store.queue_len(n) for n in names)
                 and all(self.store.get(f"claims/{s}") == b"[]" for s in live if self.store.check([f"claims/{s}"])))
        if not quiet:
            self.quiet_since = 0.0
            return
        self.quiet_since = self.quiet_since or time.monotonic()
        missing = [b for b in pending if b not in done]
        if missing and time.monotonic() - self.quiet_since > 1.0:
            log.warning("predict: unit(s) %s were claimed by no live worker: put back in the queue", missing)
            self.node.push(missing)
            self.quiet_since = 0.0

    def close(self, grace_s: float = 30.0) -> None:
        """End the job: workers stop when the queue is empty; the store stays up until every
        other node that joined has seen it (at most ``grace_s``), so none waits on a store
        that is gone."""
        self.store.set("closed", "1")
        self.node.close()
        joined = [n for n in range(1, self.nnodes) if n not in self.lost_nodes and self.store.add(f"beat/{n}", 0)]
        deadline = time.monotonic() + grace_s
        while joined and time.monotonic() < deadline:
            joined = [n for n in joined if not self.store.check([f"left/{n}"])]
            time.sleep(0.05)

    def fail(self, why: str) -> None:
        """Tell the other nodes the job failed, and stop this node's workers."""
        self.store.set("failed", why)
        self.node.kill()


def node_agent(host: str, port: int, node: int, nproc: int, max_restarts: int, out: str) -> int:
    """Node ``node`` > 0 of a job: start its workers on node 0's store, watch them until the
    job closes or fails. Returns the exit status (0: the job closed)."""
    try:
        store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
        spec = json.loads(store.get("spec"))
    except (RuntimeError, OSError) as e:  # torch's DistStoreError is a RuntimeError
        raise PredictError(f"--rdzv-endpoint {host}:{port}: cannot reach node 0's queue within "
                           f"{STORE_TIMEOUT_S}s ({type(e).__name__}: {e}); is node 0 running, and its job not "
                           "over?") from None
    if location(spec["out"]) != location(out):
        raise PredictError(f"--out {out}: node 0 writes {spec['out']}; every node must be given the same --out")
    if spec["schedule"] != "queue":
        raise PredictError("predict: several nodes take units from the shared queue only")
    if spec.get("gang") and spec["gang"] != nproc:
        raise PredictError(f"--nproc-per-node {nproc}: the tables are sharded among {spec['gang']} processes per "
                           "node (node 0's --nproc-per-node); give every node the same")
    agent = Node(store, host, port, node, nproc, spec["schedule"], max_restarts, gang=bool(spec.get("gang")))
    log.info("predict node %d: %d worker(s) on %s:%d", node, nproc, host, port)
    try:
        while not store.check(["closed"]):
            if store.check(["failed"]):
                log.error("predict node %d: the job failed: %s", node, store.get("failed").decode())
                agent.kill()
                return 1
            try:
                agent.check()
            except (PredictError, PrepareError) as e:  # node 0 sees the same error and stops the job
                log.error("predict node %d: %s", node, e)
                agent.kill()
                return 1
            time.sleep(0.1)
        agent.close()
        store.set(f"left/{node}", "1")
    finally:
        agent.kill()
    return 0


if __name__ == "__main__":  # a worker process: ``python -m gmeta.inference.workers HOST PORT SLOT GENERATION``
    from gmeta.inference.workers import worker_main as main  # this module under its own name (and logger)
    from gmeta.logs import setup_logging

    setup_logging(None)
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
