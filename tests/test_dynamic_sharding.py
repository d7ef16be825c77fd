"""Dynamic data sharding (data.sharding=dynamic): the epoch's units handed out from a queue
on the job's store. Every task of an epoch is trained exactly once, by whichever rank took
it, in one process, 2 and 3 processes, across a SIGKILL under torchrun and across a resume
at another world size."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gmeta.io.dynamic import DynamicTaskReader, SizeSchedule, Trained, epoch_items
from gmeta.io.plan import Unit
from gmeta.io.reader import task_keys
from gmeta.parallel.adaptive import split_by_speed
from tests.conftest import DEBUG_CONFIG
from tests.support.multiprocess import run_gmeta_ranks
from tests.support.steps import surviving_records, torchrun_harness, trained_tasks

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data.sharding=dynamic", "tracking.enabled=false", "train.eval_at_end=false", "train.epochs=1"]


def _all_train_tasks(shards: Path) -> list[int]:
    return sorted(task_keys(shards, "train"))


def test_epoch_items_hand_out_every_untrained_task_once_and_cut_the_tail():
    units = [Unit("a", 0, 10), Unit("a", 1, 7), Unit("b", 0, 12), Unit("b", 1, 5)]
    items = epoch_items(units, seed=3, epoch=1, shuffle=True, max_tasks=0, tasks_per_batch=4, slots=2)
    refs = np.concatenate(items)
    assert len(refs) == 34 and len({tuple(r) for r in refs.tolist()}) == 34
    assert all(len(np.unique(it[:, 0])) == 1 for it in items)  # an item reads one unit
    sizes = [len(it) for it in items]
    assert min(sizes[:2]) > 4 and max(sizes[2:]) <= 4  # whole units, then the last 2 (slots) cut to a batch each
    # a checkpoint's record: only what it does not hold is handed out again
    trained = Trained(units)
    trained.add(refs[:9])
    again = Trained(units)
    again.update(json.loads(json.dumps(trained.to_dict())))  # as a checkpoint's meta.json holds it
    assert again.count() == 9
    rest = np.concatenate(epoch_items(units, seed=3, epoch=1, shuffle=True, max_tasks=0, tasks_per_batch=4, slots=2,
                                      trained=again))
    assert sorted(map(tuple, rest.tolist())) == sorted(map(tuple, refs[9:].tolist()))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_process_reads_every_task_once_without_a_process_group(debug_data, workers):
    shards = debug_data["shards"]
    reader = DynamicTaskReader(shards, "train", 16, nonce="t", num_workers=workers, seed=1, shuffle_buffer=64)
    seen = []
    for batch in reader:
        seen += batch.task_ids.tolist()
        reader.commit(reader.take())
    assert sorted(seen) == _all_train_tasks(shards)
    assert reader.queue_state()["trained_tasks"] == len(seen)


def _run(nproc: int, out: Path, record: Path, shards: Path, extra: list[str], monkeypatch) -> None:
    record.mkdir(parents=True)
    with monkeypatch.context() as m:
        m.setenv("GMETA_TEST_RECORD", str(record))
        run_gmeta_ranks(["train", "--config", DEBUG_CONFIG, "--nproc-per-node", str(nproc),
                         f"data.shards_dir={shards}", f"train.output_dir={out}", *COMMON, *extra], nproc, cwd=ROOT,
                        harness="tests.support.fault_harness")


def test_two_processes_train_every_task_of_the_epoch_once_then_three_finish_a_resumed_epoch(debug_data, tmp_path,
                                                                                         monkeypatch):
    shards = debug_data["shards"]
    every = _all_train_tasks(shards)
    # 2 processes stop mid-epoch (train.max_steps): the checkpoint holds the data queue
    _run(2, tmp_path / "two", tmp_path / "rec-two", shards, ["train.max_steps=8"], monkeypatch)
    first = surviving_records(tmp_path / "rec-two")
    assert sorted(first) == list(range(1, 9))
    queue = json.loads((tmp_path / "two" / "checkpoint" / "meta.json").read_text())["data_queue"]
    assert queue["trained_tasks"] == len(trained_tasks(first)) < len(every)
    # 3 processes resume it: the epoch's other tasks, each once
    _run(3, tmp_path / "three", tmp_path / "rec-three", shards, [f"--resume={tmp_path / 'two' / 'checkpoint'}"],
         monkeypatch)
    second = surviving_records(tmp_path / "rec-three")
    assert all(len(ranks) == 3 for ranks in second.values())
    done = trained_tasks(first) + trained_tasks(second)
    assert sorted(done) == every, Counter(done).most_common(3)
    end = json.loads((tmp_path / "three" / "checkpoint" / "meta.json").read_text())
    assert end["epoch_done"] and end["data_queue"]["trained_tasks"] == len(every)
    assert end["tasks_total"] == len(every)  # counted from the steps' all-reduce, pads not counted


def test_a_killed_rank_restarts_and_the_epoch_trains_every_task_exactly_once(debug_data, tmp_path):
    shards = debug_data["shards"]
    # rank 1 is killed after its 6th step, two after the checkpoint of step 4: the restarted
    # job goes on from step 4 and the queue hands out every task no step up to 4 trained
    extra = ["data.sharding=dynamic", "train.epochs=1", "train.checkpoint_every_steps=4", "train.log_every=5"]
    torchrun_harness(tmp_path / "killed", tmp_path / "rec", shards, "0:6:1", extra, 1)
    resumed = {p.name.split("-")[0]: int(p.read_text()) for p in (tmp_path / "rec").glob("*.resume")}
    assert resumed == {"attempt1": 4}, resumed
    steps = surviving_records(tmp_path / "rec")
    done = trained_tasks(steps)
    assert sorted(done) == _all_train_tasks(shards), Counter(done).most_common(3)


def test_split_by_speed_follows_speed_with_a_floor_and_sums_to_the_global_batch():
    assert split_by_speed([1.0, 1.0], 32, 4) == [16, 16]
    assert split_by_speed([1.0, 3.0], 32, 4) == [24, 8]  # 3x slower: a quarter of the batch
    assert split_by_speed([1.0, 100.0], 32, 4) == [28, 4]  # the floor
    assert split_by_speed([1.0, 2.0, 2.0], 10, 1) == [5, 3, 2]  # largest remainders, ties to the lower rank
    assert sum(split_by_speed([0.3, 0.7, 1.1, 5.0], 64, 2)) == 64


def test_a_size_schedule_takes_effect_after_its_lag_and_workers_wait_for_undecided_steps():
    sched = SizeSchedule(16, lag=3)
    assert [sched.size_at(t) for t in range(3)] == [16, 16, 16]
    sched.decide(2 + 3, 10)  # decided after step 2: from step 5 on (counted from 0)
    sched.step_done(2)
    assert [sched.size_at(t) for t in range(6)] == [16, 16, 16, 16, 16, 10]
    for k in range(20):  # more decisions than the ring holds: the newest that applies is found
        sched.decide(6 + k, 20 + k)
        sched.step_done(6 + k)
    assert sched.size_at(25) == 39 and sched.size_at(24) == 38
    waited = []
    sched.reset()
    import threading

    def worker():
        waited.append(sched.size_at(5))  # needs step 2 done: every decision for step 5 made

    th = threading.Thread(target=worker)
    th.start()
    th.join(0.2)
    assert th.is_alive()
    sched.decide(5, 7)
    sched.step_done(2)
    th.join(5)
    assert waited == [7]


def test_adaptive_batches_give_a_slow_rank_a_smaller_share_of_an_unchanged_global_batch(debug_data, tmp_path,
                                                                                       monkeypatch):
    shards = debug_data["shards"]
    monkeypatch.setenv("GMETA_TEST_SLOW", "1:0.01")  # rank 1's meta step: 10 ms more per task
    _run(2, tmp_path / "run", tmp_path / "rec", shards, ["train.adaptive_batch=true", "train.adaptive_batch_every=4",
                                                         "data.prefetch_factor=2"], monkeypatch)
    steps = surviving_records(tmp_path / "rec")
    sizes = [[len(steps[s][r]["task_ids"]) if not steps[s][r]["pad"] else 0 for r in (0, 1)] for s in sorted(steps)]
    # steps 1-4 at equal shares; decided after step 4, the split applies from step 4 + lag + 1
    lag = 1 * 2 + 2
    assert all(sz == [16, 16] for sz in sizes[:4 + lag])
    adapted = sizes[4 + lag]
    assert adapted[0] > 16 > adapted[1] and sum(adapted) == 32, sizes
    full = [sz for sz in sizes if 0 not in sz]  # before either rank ran out of data
    assert all(sum(sz) == 32 for sz in full[:-1]), sizes
    assert sorted(trained_tasks(steps)) == _all_train_tasks(shards)
