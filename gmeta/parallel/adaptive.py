"""Per-rank meta-batch sizes that follow each rank's speed (``train.adaptive_batch``).

A synchronous step waits for its slowest rank. On a shared cluster one machine is often
slower than the rest for a while (another job on its cores, a throttled GPU, a noisy
neighbour): with equal shares all ranks then run at its pace. As AntDT does for
synchronous training, each rank here takes a share of the global batch in proportion to
its speed: every ``every`` steps the ranks all-gather their meta-step time per task (timed
around the local computation only: the collectives wait for the slowest rank and would
hide who is slow), smooth it, and split the fixed global batch ``tasks_per_batch x world``
again. The loss weighting of ``gmeta.training.step.agree_across_ranks`` makes a step the same
training whatever the split. The reader's workers make batches ahead, so a new split takes
effect ``lag`` steps later (``gmeta.io.dynamic.SizeSchedule``), on every rank at the same step.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from gmeta.io.dynamic import SizeSchedule

log = logging.getLogger(__name__)

SMOOTHING = 0.5  # weight of the newest window in the moving average of each rank's time per task


def split_by_speed(seconds_per_task: list[float], total: int, least: int) -> list[int]:
    """``total`` tasks split among ranks in proportion to their speed (1 / seconds per
    task), each at least ``least``: whole numbers summing to ``total`` (the largest
    remainders round up; ties to the lower rank)."""
    world = len(seconds_per_task)
    speed = [1.0 / max(s, 1e-12) for s in seconds_per_task]
    fixed: dict[int, float] = {}
    while True:  # ranks whose proportional share is below the floor get the floor; the rest share what is left
        free = [r for r in range(world) if r not in fixed]
        left = total - sum(fixed.values())
        norm = sum(speed[r] for r in free)
        ideal = {r: left * speed[r] / norm for r in free}
        low = [r for r in free if ideal[r] < least]
        if not low or len(low) == len(free):
            break
        fixed.update({r: float(least) for r in low})
    raw = [fixed.get(r, ideal.get(r, float(least))) for r in range(world)]
    sizes = [max(least, math.floor(x)) for x in raw]
    order = sorted(range(world), key=lambda r: (-(raw[r] - math.floor(raw[r])), r))
    i = 0
    while sum(sizes) < total:
        sizes[order[i % world]] += 1
        i += 1
    while sum(sizes) > total:  # (floors above the proportional share: take from the largest)
        sizes[max(range(world), key=lambda r: (sizes[r], -r))] -= 1
    return sizes


class _Timer:
    """Seconds of the timed regions since the last ``take``: CUDA events on a GPU (a host
    clock there times kernel launches), else the host clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t = 0.0

    def __enter__(self) -> _Timer:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self._t

    def take(self) -> float:
        if self.cuda and self.events:
            self.events[-1][1].synchronize()  # (every few steps only)
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
            self.events.clear()
        s, self.seconds = self.seconds, 0.0
        return s


class AdaptiveBatch:
    """The trainer's side: times each step's meta-step (``timer``), and every ``every``
    steps agrees with the other ranks on the next split (``after_step``)."""

    def __init__(self, schedule: SizeSchedule, tasks_per_batch: int, every: int, min_share: float,
                 device: torch.device) -> None:
        self.schedule = schedule
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.total = tasks_per_batch * self.world
        self.least = max(1, math.ceil(min_share * tasks_per_batch))
        self.every, self.device = every, device
        self.timer = _Timer(device)
        self.tasks = 0
        self.smoothed: list[float] | None = None
        self.sizes = [tasks_per_batch] * self.world
        self.changes = 0

    def after_step(self, epoch_step: int, tasks: int, global_step: int) -> None:
        """After step ``epoch_step`` of the epoch (from 1), in which this rank trained
        ``tasks`` real tasks. Collective every ``every`` steps."""
        self.tasks += tasks
        if epoch_step % self.every == 0:
            self._decide(epoch_step, global_step)
        self.schedule.step_done(epoch_step)  # after the decision: a worker waiting on it reads it

    def _decide(self, epoch_step: int, global_step: int) -> None:
        seconds = self.timer.take()
        mine = seconds / self.tasks if self.tasks else math.nan  # nan: only pads in the window
        self.tasks = 0
        every = torch.empty(self.world, dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(every, torch.tensor([mine], dtype=torch.float64, device=self.device))
        now = every.tolist()
        if self.smoothed is None:
            if any(math.isnan(x) for x in now):
                return
            self.smoothed = now
        else:
            self.smoothed = [old if math.isnan(x) else SMOOTHING * x + (1 - SMOOTHING) * old
                             for x, old in zip(now, self.smoothed)]
        sizes = split_by_speed(self.smoothed, self.total, self.least)
        if sizes == self.sizes:
            return
        self.sizes = sizes
        self.changes += 1
        self.schedule.decide(epoch_step + self.schedule.lag, sizes[self.rank])
        if self.rank == 0:
            log.info("adaptive batch: from step %d, tasks per rank %s (meta-step ms per task %s)",
                     global_step + self.schedule.lag + 1, sizes,
                     [round(1000 * s, 2) for s in self.smoothed])
