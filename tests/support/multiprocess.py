"""Run a function on several CPU ranks over gloo (processes from a fork server, free port)."""

from __future__ import annotations

import multiprocessing
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from gmeta.parallel.dist import free_port

# A spawned rank imports torch, torchrec, fbgemm and gmeta afresh: seconds of CPU per rank,
# per test. The fork server imports them once a session and forks each rank from itself: a
# process that has run nothing (no threads, no OpenMP pool, no process group), so a rank
# starts as clean as a spawned one, unlike a fork of the test process.
PRELOAD = ["torch", "torch.distributed", "fbgemm_gpu", "torchrec", "torchrec.distributed", "gmeta.train",
           "gmeta.evaluate", "gmeta.checkpoint", "tests.support.multiprocess"]


def _entry(rank: int, world_size: int, port: int, fn, args, env: dict[str, str], cwd: str) -> None:
    # a spawned rank would have the caller's environment and directory of now; the fork
    # server's are those of its start
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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
    multiprocessing.set_forkserver_preload(PRELOAD)  # (read when the server starts: the first call)
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args, dict(os.environ), os.getcwd()),
                       nprocs=world_size, join=True, start_method="forkserver")
