"""Count the calls that make a GPU wait for the host (or the host for the GPU) in a block.

On a CPU machine nothing actually waits, so the calls are recognised by what they are:
reading a value back (``item``, ``tolist``, ``numpy``, ``cpu``, ``bool``/``int``/``float``
of a tensor), ops whose output size depends on the values (``nonzero``, ``unique``,
``masked_select``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``)
and value comparisons on the host (``equal``, ``is_nonzero``); and tensors made on the device
from host data (``torch.tensor`` / ``as_tensor`` of Python numbers or lists with a
``device``, indexing with a Python list, which becomes an index tensor): on a GPU each is a
pageable host-to-device copy that synchronises the stream, so they count as syncs too. Calls on counters that
fbgemm keeps on the host by design (its iteration counter; feature dims copied once) are
not device syncs on a GPU and are listed apart by their source line; so are the reads of
torchrec's id all-to-all, which must learn on the host how many ids each rank sends: the
pipeline issues it for the next batch (``SparseDistPipeline.start``) before this batch's
compute and collects it in ``wait_ids``; those are listed apart as ``input_dist``.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default, aten.masked_select.default, aten.is_nonzero.default,
             aten.equal.default}
_READ_BACK = {"tolist", "numpy", "item", "cpu", "__bool__", "__int__", "__float__", "__index__"}
_FROM_HOST = {"tensor", "as_tensor"}  # of Python data (not of a tensor)
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


def _host_index(index) -> bool:
    """Whether an index holds a Python list (or a tuple of them): made into a tensor."""
    if isinstance(index, list):
        return True
    return isinstance(index, tuple) and any(isinstance(i, list) for i in index)
# source lines of host-side counters (not device syncs on a GPU)
HOST_COUNTERS = ("self.iter_cpu", "self.feature_dims = self.feature_dims.cpu()")


def _where() -> tuple[str, str, bool]:
    """(innermost frame outside torch and this file, its source line, whether the call is
    inside the pipeline's input dist)."""
    stack = traceback.extract_stack()[:-3]
    in_dist = any(fr.filename.endswith("gmeta/parallel/pipeline.py") and fr.name in ("start", "wait_ids")
                  for fr in stack)
    for fr in reversed(stack):
        if "/torch/" not in fr.filename and not fr.filename.endswith("sync_counter.py"):
            return f"{fr.filename}:{fr.lineno}", (fr.line or ""), in_dist
    return "?", "", in_dist


class SyncCounter:
    """``with SyncCounter() as c: ...``; then ``c.syncs`` (list of (call, where, line)) and
    ``c.host_counters`` and ``c.input_dist``. A read-back through ``item`` shows once (its aten op is folded in)."""

    def __init__(self) -> None:
        self.syncs: list[tuple[str, str, str]] = []
        self.host_counters: list[tuple[str, str, str]] = []
        self.input_dist: list[tuple[str, str, str]] = []
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                bad = func in _SYNC_OPS and func is not aten._local_scalar_dense.default
                if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                    bad = True
                if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                    bad = True
                if bad:
                    counter._record(str(func))
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in _READ_BACK:
                    counter._record(name)
                elif name in _FROM_HOST and args and isinstance(args[0], (list, tuple, int, float, bool)) \
                        and (kwargs or {}).get("device") is not None:
                    counter._record(f"{name} from host data")
                elif name in _INDEXING and len(args) > 1 and _host_index(args[1]):
                    counter._record(f"{name} with a list index")
                return func(*args, **(kwargs or {}))

        self._modes = (_Function(), _Dispatch())

    def _record(self, call: str) -> None:
        where, line, in_dist = _where()
        kind = self.host_counters if any(h in line for h in HOST_COUNTERS) else self.input_dist if in_dist \
            else self.syncs
        kind.append((call, where, line))

    def __enter__(self) -> SyncCounter:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
