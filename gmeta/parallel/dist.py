"""Process group, device choice and dense-gradient synchronisation.

Dense parameters are data parallel but not wrapped in DDP: DDP does not support double
backward, and the meta step calls the dense head through ``functional_call`` rather than
``DDP.forward``, which would silently skip its all-reduce. Gradients are mean-all-reduced
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


def pick_device(local_rank: int) -> tuple[torch.device, str]:
    """CUDA + NCCL when a GPU is present, CPU + gloo otherwise."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed() -> DistEnv:
    """Join the process group torchrun set up, or make a one-process group."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, backend = pick_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
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


def allreduce_mean_grads(params: list[torch.Tensor], bucket_bytes: int = 25 << 20) -> None:
    """Mean all-reduce of dense gradients in flat buckets, all launched before any wait.

    A parameter without a gradient on this rank contributes zeros, so every rank sends
    the same buckets (a rank skipping one would deadlock the others).
    """
    world = dist.get_world_size()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p.grad)
        size += nbytes
    flats = [_flatten_dense_tensors(b) for b in buckets]
    works = [dist.all_reduce(f, async_op=True) for f in flats]
    for work, flat, bucket in zip(works, flats, buckets):
        work.wait()  # sync point: the optimizer step needs the reduced gradients
        flat.div_(world)
        for g, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(v)
