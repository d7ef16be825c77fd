"""A dispatch mode that sees every operand of every tensor operation and records those run
with operands on another device than the one the model was placed on.

On a CPU-only machine the "other device" is ``meta``: a model placed on ``meta`` computes
shapes only, and a tensor left on the CPU by the code under test (made without
``device=``, or never moved) shows up as a CPU operand of a meta op. PyTorch itself lets a
CPU index into a CUDA tensor (a hidden host-to-device copy and a sync) and mixes 0-dim CPU
tensors freely; this check allows only the latter, as a CUDA kernel does."""

from __future__ import annotations

from contextlib import contextmanager

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


class MixedDevices(TorchDispatchMode):
    """Fails at the first operation whose tensor operands lie on two devices (0-dim CPU
    tensors aside, which a CUDA kernel takes as scalars). Unlike ``DeviceCheck`` it lets
    host-only work (index plans built from numpy) run beside the device's."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {str(t.device) for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise WrongDevice(f"{func}: operands on {[str(t.device) for t in tensors]} "
                              f"(shapes {[tuple(t.shape) for t in tensors]})")
        return func(*args, **kwargs)


@contextmanager
def meta_stands_in_for_cuda():
    """The ``meta`` device behaving, for reads back to the host, as a GPU does: ``.cpu()``
    (or ``.to("cpu")``) of a tensor copied there from the host gives that host tensor back
    (the copy a GPU would make); of any other meta tensor, a value computed on the device
    that has no data here, it raises ``WrongDevice``; ``.numpy()`` of a meta tensor raises
    as it does for a CUDA tensor."""
    to, cpu = torch.Tensor.to, torch.Tensor.cpu
    host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta copy) -> (meta copy, host original)

    def back(t: torch.Tensor) -> torch.Tensor:
        if id(t) in host and host[id(t)][0] is t:
            return host[id(t)][1]
        raise WrongDevice(f"a tensor computed on the device ({tuple(t.shape)}, {t.dtype}) read back to the host")

    def to_(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "meta" and out.device.type == "cpu":
            return back(self)
        if self.device.type == "cpu" and out.device.type == "meta":
            host[id(out)] = (out, self)
        return out

    def cpu_(self, *args, **kwargs):
        return back(self) if self.device.type == "meta" else cpu(self, *args, **kwargs)

    torch.Tensor.to, torch.Tensor.cpu = to_, cpu_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.cpu = to, cpu  # type: ignore[method-assign]
