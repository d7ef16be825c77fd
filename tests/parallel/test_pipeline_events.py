"""The pipeline's CUDA stream order, checked on the CPU with stand-in streams and events:
a batch's lookup waits for that batch's copy and id all-to-all, not for the next batch's,
which is queued on the same input-dist stream by then."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from gmeta.config import load_config
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.models.dlrm import build_model
from gmeta.parallel.pipeline import SparseDistPipeline
from gmeta.parallel.sharding import shard_model
from tests.support.multiprocess import run_ranks

OVERRIDES = ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]", "meta.tasks_per_batch=4"]


class FakeStream:
    """Counts the sections of work issued on it; logs what waits for what."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.sections = name, log, 0

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append((self.name, "waits for stream", other.name, other.sections))

    def wait_event(self, event: FakeEvent) -> None:
        assert event.stream is not None, "waiting for an event that was never recorded"
        self.log.append((self.name, "waits for event", event.stream.name, event.sections))


class FakeEvent:
    def __init__(self, *a, **kw) -> None:
        self.stream: FakeStream | None = None
        self.sections = -1

    def record(self, stream: FakeStream) -> None:
        self.stream, self.sections = stream, stream.sections  # all the work issued on it so far


def _events(rank, world, cfg_path, shards):
    cfg = load_config(cfg_path, OVERRIDES)
    torch.manual_seed(0)
    model = shard_model(build_model(cfg, device=torch.device("meta")), cfg, torch.device("cpu"))
    it = iter(TaskReader(shards, "train", cfg.meta.tasks_per_batch, rank=rank, world_size=world, seed=2))
    b0, b1 = next(it), next(it)
    want0 = model.module.lookup(layout_of(b0, model.module.pooling, 1)).detach()

    log: list = []
    pipe = SparseDistPipeline(model.module)
    pipe.copy_stream, pipe.dist_stream = FakeStream("copy", log), FakeStream("dist", log)
    default = FakeStream("default", log)

    @contextmanager
    def on(stream):
        stream.sections += 1
        yield

    saved = (torch.cuda.stream, torch.cuda.current_stream, torch.cuda.Event, torch.Tensor.record_stream)
    torch.cuda.stream, torch.cuda.current_stream, torch.cuda.Event = on, lambda *a: default, FakeEvent
    torch.Tensor.record_stream = lambda self, s: None  # CPU tensors: no allocator to tell
    try:
        p0 = pipe.start(b0)  # as run_steps: batch 0's ids collected, batch 1 started, then batch 0 looked up
        pipe.wait_ids(p0)
        after0 = pipe.dist_stream.sections
        p1 = pipe.start(b1)
        assert pipe.dist_stream.sections > after0  # batch 1's input dist is queued behind batch 0's
        rows0 = pipe.lookup(p0)
        pipe.wait_ids(p1)
        after1 = pipe.dist_stream.sections
        pipe.lookup(p1)
    finally:
        torch.cuda.stream, torch.cuda.current_stream, torch.cuda.Event, torch.Tensor.record_stream = saved
    waits = [w for w in log if w[0] == "default"]
    assert waits == [("default", "waits for event", "dist", after0), ("default", "waits for event", "dist", after1)], \
        log
    assert ("dist", "waits for stream", "copy", 1) in log  # the ids of batch 0 after its copy
    torch.testing.assert_close(rows0.detach(), want0, rtol=0, atol=0)


def test_lookup_waits_for_its_own_batchs_event_only(debug_config_path, debug_data):
    run_ranks(_events, 2, debug_config_path, debug_data["shards"])
