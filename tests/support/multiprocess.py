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
PRELOAD = ["torch", "torch.distributed", "fbgemm_gpu", "torchrec", "torchrec.distributed", "gmeta.training.run",
           "gmeta.evaluation.evaluate", "gmeta.checkpoint", "tests.support.multiprocess"]


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


def _gmeta_worker(rank: int, world_size: int, argv: list[str], harness: str) -> None:
    """What each of torchrun's workers runs for ``gmeta ARGV``: the command line, on a rank
    of the process group already made (under it, gmeta.cli goes straight to the work)."""
    import importlib

    from gmeta.cli import main

    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)  # as torchrun sets it: the cores are shared (threads)
    if harness:
        importlib.import_module(harness)
    rc = main(argv)
    assert rc == 0, f"rank {rank}: `gmeta {' '.join(argv)}` exited with {rc} (its message is above)"


def run_gmeta_ranks(argv: list, nproc: int = 2, cwd: str | os.PathLike | None = None, harness: str = "") -> None:
    """``gmeta train --nproc-per-node NPROC ...``'s workers, forked from the fork server, in
    ``cwd``: the job as torchrun runs it, without the launcher and NPROC interpreters' imports
    (seconds each). For a test of what the job computes, not of launching it (signals,
    restarts, the launcher's messages: a real ``gmeta`` process). ``harness``: a module each
    rank imports first, as ``torchrun --module`` would run it (tests.support.fault_harness,
    which records every step; its settings from the environment of this call)."""
    saved = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        run_ranks(_gmeta_worker, nproc, [str(a) for a in argv], harness)
    finally:
        os.chdir(saved)
