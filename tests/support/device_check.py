"""A dispatch mode that sees every operand of every tensor operation and records those run
with operands on another device than the one the model was placed on.

On a CPU-only machine the "other device" is ``meta``: a model placed on ``meta`` computes
shapes only, and a tensor left on the CPU by the code under test (made without
``device=``, or never moved) shows up as a CPU operand of a meta op. PyTorch itself lets a
CPU index into a CUDA tensor (a hidden host-to-device copy and a sync) and mixes 0-dim CPU
tensors freely; this check allows only the latter, as a CUDA kernel does."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class WrongDevice(AssertionError):
    """An operation ran with an operand on another device than the model's."""


class DeviceCheck(TorchDispatchMode):
    def __init__(self, expected: torch.device) -> None:
        super().__init__()
        self.expected = torch.device(expected)
        self.wrong: list[tuple[str, list[str]]] = []  # (op, devices of its tensor operands)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        off = [t for t in tensors if t.device != self.expected and not (t.device.type == "cpu" and t.dim() == 0)]
        if off:
            self.wrong.append((str(func), [str(t.device) for t in tensors]))
            raise WrongDevice(f"{func}: operands on {[str(t.device) for t in tensors]}, expected {self.expected} "
                              f"(shapes {[tuple(t.shape) for t in tensors]})")
        return func(*args, **kwargs)
