"""Process group, device choice and dense-gradient synchronisation.

Dense parameters are data parallel but not wrapped in DDP: DDP does not support double
backward, and the meta step calls the dense head with per-task fast weights rather than
through ``DDP.forward``, which would silently skip its all-reduce. Gradients are mean-all-reduced
explicitly instead. torchrec already divides sparse gradients by the world size in its
all-to-all backward, so a mean keeps dense and sparse updates consistent.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    """True in a process started by torchrun (torch.distributed.run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container or taskset may allow
    fewer than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """Processes of this job on this node: LOCAL_WORLD_SIZE (torchrun sets it), else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def threads_per_process(requested: int, processes: int | None = None) -> tuple[int, str]:
    """Intra-op threads for each process and why: ``requested`` (train.threads) if > 0,
    else the usable cores divided by the processes on this node, at least 1."""
    if requested > 0:
        return requested, "train.threads"
    cores = usable_cores()
    procs = local_processes() if processes is None else max(1, processes)
    return max(1, cores // procs), f"{cores} cores / {procs} local process{'es' if procs != 1 else ''}"


_threads_logged: int | None = None


def configure_threads(requested: int) -> int:
    """Set torch's intra-op thread count (see ``threads_per_process``) and return it.

    torch's default is one thread per core in *every* process: two processes on a shared
    2-core machine then fight over the cores and an epoch runs 10-20x slower. The line is
    logged once per process and value: ``gmeta.experiments.cold_start`` trains in-process many times."""
    global _threads_logged
    n, why = threads_per_process(requested)
    torch.set_num_threads(n)
    if n != _threads_logged and os.environ.get("RANK", "0") == "0":
        log.info("threads: %d per process (%s)", n, why)
    _threads_logged = n
    return n


def default_device() -> torch.device:
    """Where a one-process job (predict, serving) runs: the current GPU if there is one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def pick_device(local_rank: int) -> tuple[torch.device, str]:
    """CUDA + NCCL when a GPU is present, CPU + gloo otherwise."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed() -> DistEnv:
    """Join the process group torchrun set up, or make a one-process group.

    The one-process group is made over a TCP address of its own, without setting RANK,
    WORLD_SIZE or LOCAL_RANK in the environment: a process that trains in-process (tests,
    ``gmeta.experiments.cold_start``) and later starts ``gmeta train --nproc-per-node N`` must not pass
    them on, or the child would take itself for a torchrun worker of a one-process job."""
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        init = "env://"
    else:
        rank, world, local_rank = 0, 1, 0
        init = f"tcp://127.0.0.1:{free_port()}"
    device, backend = pick_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device, backend)


def broadcast_params(params: list[torch.Tensor], src: int = 0) -> None:
    """Make every rank start from rank ``src``'s dense parameters."""
    if dist.get_world_size() == 1 or not params:
        return
    with torch.no_grad():
        flat = _flatten_dense_tensors([p.data for p in params])
        dist.broadcast(flat, src)
        for p, v in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params])):
            p.data.copy_(v)


class DenseGradSync:
    """Bucketed, asynchronous mean all-reduce of dense gradients, overlapped with backward.

    Buckets are filled in reverse parameter order (roughly the order backward produces
    gradients). A gradient hook marks each parameter ready; as soon as a bucket is complete
    its all-reduce starts while backward goes on. Buckets start strictly in index order, so
    every rank issues the same collectives in the same order. ``wait()`` (before the
    optimizer step) starts any bucket still incomplete (a parameter without a gradient on
    this rank contributes zeros), waits for all, and writes the means back.

    A plain hook-based reducer rather than DDP: DDP does not support the double backward of
    second-order MAML and is bypassed by the meta step's calls (see module docstring).
    """

    def __init__(self, params: list[torch.Tensor], bucket_bytes: int = 4 << 20) -> None:
        self.params = list(params)
        self.world = dist.get_world_size()
        self.buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            if self.buckets[-1] and size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.bucket_of = {id(p): b for b, ps in enumerate(self.buckets) for p in ps}
        self._reset()
        self.handles = []
        if self.world > 1:
            for p in self.params:
                self.handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _reset(self) -> None:
        self.ready = [0] * len(self.buckets)
        self.launched: list[tuple | None] = [None] * len(self.buckets)
        self.next = 0

    def _on_grad(self, p: torch.Tensor) -> None:
        b = self.bucket_of[id(p)]
        self.ready[b] += 1
        while self.next < len(self.buckets) and self.ready[self.next] == len(self.buckets[self.next]):
            self._launch(self.next)

    def _launch(self, b: int) -> None:
        grads = []
        for p in self.buckets[b]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = _flatten_dense_tensors(grads)
        self.launched[b] = (dist.all_reduce(flat, async_op=True), flat, grads)
        self.next = b + 1

    def wait(self) -> None:
        """Sync point: all dense gradients reduced (mean over ranks) when this returns."""
        if self.world == 1:
            return
        while self.next < len(self.buckets):
            self._launch(self.next)
        for launched in self.launched:
            assert launched is not None  # the loop above launched every bucket not yet launched
            work, flat, grads = launched
            work.wait()
            flat.div_(self.world)
            for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(v)
        self._reset()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
