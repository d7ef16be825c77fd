"""``gmeta`` under torchrun with a test-side recorder, for the kill-and-resume test.

Every process records, after each optimizer step (``gmeta.training.step.train_step`` returning),
the task ids of the meta-batch it trained, and the step of any checkpoint it resumed from;
it kills itself with SIGKILL right after step ``call`` of restart ``attempt`` on ``rank``
for each ``attempt:call:rank`` in GMETA_TEST_KILLS. The records are the test's own, not
the trainer's claim. GMETA_TEST_NAN_AT=k,l,... makes the meta-loss of the k-th, l-th, ...
meta-batch NaN (on every rank). GMETA_TEST_SLOW=r:s,... slows rank r's meta step by s
seconds per task (a straggler).

    GMETA_TEST_RECORD=DIR GMETA_TEST_KILLS=0:7:1,1:5:0 \\
        python -m torch.distributed.run ... --module tests.support.fault_harness train --config ...
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time

import gmeta.checkpoint as checkpoint
import gmeta.training.step as train
from gmeta.cli import main

faulthandler.register(signal.SIGUSR1)  # stack dump of a hung rank: kill -USR1 <pid>
RECORD = os.environ["GMETA_TEST_RECORD"]
KILLS = {tuple(int(x) for x in item.split(":")) for item in os.environ.get("GMETA_TEST_KILLS", "").split(",") if item}
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
PREFIX = os.path.join(RECORD, f"attempt{ATTEMPT}-rank{RANK}")

NAN_AT = {int(x) for x in os.environ.get("GMETA_TEST_NAN_AT", "").split(",") if x}
# GMETA_TEST_SLOW=rank:seconds,...: that rank's meta step sleeps this long per task
SLOW = {int(r): float(v) for r, _, v in (x.partition(":") for x in os.environ.get("GMETA_TEST_SLOW", "").split(","))
        if r}

_meta_step = train.meta_step
_train_step = train.train_step
_load = checkpoint.load_training_state
_calls = 0


_forwards = 0


def nan_meta_step(model, batch, *args, **kwargs):
    global _forwards
    if SLOW.get(RANK):  # a slower machine: time per task, inside the meta step (as its compute would be)
        time.sleep(SLOW[RANK] * batch.num_tasks)
    out = _meta_step(model, batch, *args, **kwargs)
    _forwards += 1
    if _forwards in NAN_AT:
        out.loss = out.loss * float("nan")
    return out


def recorded_train_step(model, batch, *args, **kwargs):
    global _calls
    out = _train_step(model, batch, *args, **kwargs)
    _calls += 1
    with open(PREFIX + ".jsonl", "a") as f:
        f.write(json.dumps({"call": _calls, "task_ids": batch.task_ids.tolist(), "skipped": bool(out.skipped),
                            "pad": bool(kwargs.get("pad"))}) + "\n")
    if (ATTEMPT, _calls, RANK) in KILLS:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


def recorded_load(path, *args, **kwargs):
    meta, own = _load(path, *args, **kwargs)
    with open(PREFIX + ".resume", "w") as f:
        f.write(str(meta["step"]))
    return meta, own


train.train_step = recorded_train_step
train.meta_step = nan_meta_step
checkpoint.load_training_state = recorded_load

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
