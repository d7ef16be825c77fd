"""Run a function on several CPU ranks over gloo (spawned processes, free port)."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from gmeta.parallel.dist import free_port


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Every check of this rank has passed. Leave without interpreter teardown: about one run
    # in ten, a rank aborted there ("terminate called without an active exception", after
    # destroy_process_group returned), failing a test whose checks had all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; an exception (a failed
    assert) in any rank fails the caller with that rank's traceback."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
