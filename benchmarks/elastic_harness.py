"""``gmeta`` as torchrun's module for ``benchmarks/dynamic_sharding.py``: a slowed rank, a
killed rank, a record of what each step trained, and a one-process replay of recorded
global batches. Settings from the environment:

    GMETA_BENCH_SLOW=rank:seconds   that rank's meta step sleeps this long per task (a slower
                                    machine: its time grows with its share, as compute does)
    GMETA_BENCH_KILL=rank:step      that rank SIGKILLs itself after this step of the first attempt
    GMETA_BENCH_RECORD=dir          each rank appends, per step, the (unit, task) pairs it trained
                                    (none for a pad) to dir/attempt<A>-rank<R>.jsonl, and the
                                    step of a checkpoint it resumed from to ...-rank<R>.resume
    GMETA_BENCH_REPLAY=file         (one process) the reader yields the global batches in file,
                                    one JSON list of [unit, task] pairs per line, instead

    python -m torch.distributed.run ... --module benchmarks.elastic_harness train --config ...
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

import gmeta.checkpoint as checkpoint
import gmeta.io.dynamic as dynamic
import gmeta.training.step as train
from gmeta.cli import main

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _pair(name: str) -> tuple[int, float] | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    r, _, v = value.partition(":")
    return int(r), float(v)


SLOW = _pair("GMETA_BENCH_SLOW")
KILL = _pair("GMETA_BENCH_KILL")
RECORD = os.environ.get("GMETA_BENCH_RECORD", "")
REPLAY = os.environ.get("GMETA_BENCH_REPLAY", "")

_meta_step = train.meta_step
_trained = train.Fetcher.trained
_steps = 0


def slow_meta_step(model, batch, *args, **kwargs):
    if SLOW is not None and SLOW[0] == RANK:
        time.sleep(SLOW[1] * batch.num_tasks)
    return _meta_step(model, batch, *args, **kwargs)


def recorded_trained(self):
    global _steps
    token = self.tokens[0]
    _trained(self)
    _steps += 1
    if RECORD:
        with open(os.path.join(RECORD, f"attempt{ATTEMPT}-rank{RANK}.jsonl"), "a") as f:
            refs = None if token is None else np.asarray(token).tolist()
            f.write(json.dumps({"step": _steps, "refs": refs, "t": time.time()}) + "\n")
    if KILL is not None and ATTEMPT == 0 and KILL == (RANK, _steps):
        os.kill(os.getpid(), signal.SIGKILL)


_load = checkpoint.load_training_state


def recorded_load(path, *args, **kwargs):
    meta, own = _load(path, *args, **kwargs)
    if RECORD:
        with open(os.path.join(RECORD, f"attempt{ATTEMPT}-rank{RANK}.resume"), "w") as f:
            f.write(str(meta["step"]))
    return meta, own


def replayed_iter(self):
    """The recorded global batches, in order (one process, tasks_per_batch the global batch)."""
    window = dynamic.Window(self.root, self.units, self.schema, self.format, self.on_bad_task, self._sha256)
    with open(REPLAY) as f:
        steps = [np.asarray(json.loads(line), dtype=np.int64).reshape(-1, 2) for line in f]
    for refs in steps:
        np.add.at(window.remaining, refs[:, 0], 1)
        window.load(refs[:, 0])
        self._last_refs = refs
        yield window.batch(refs, self.size_buckets)[1].unpack()


train.meta_step = slow_meta_step
train.Fetcher.trained = recorded_trained  # type: ignore[method-assign]
checkpoint.load_training_state = recorded_load
if REPLAY:
    dynamic.DynamicTaskReader.__iter__ = replayed_iter  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
