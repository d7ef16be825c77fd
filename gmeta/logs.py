"""Logging for gmeta's commands: gmeta's own INFO lines, third-party noise off by default.

Without ``--verbose`` (``GMETA_VERBOSE`` unset), one training used to print about 100 lines
of other libraries' output on stderr. Where each kind comes from and how it is silenced:

- torchrec's planner (``torchrec.distributed.planner.stats``: the sharding plan table,
  ``...planner.types`` / ``...storage_reservations``: warnings about how the topology and
  the storage estimate were built) and torchrec's sharders: Python loggers under
  ``torchrec``, set to ERROR.
- fbgemm_gpu: ``logging.info`` on the *root* logger ("Successfully loaded: 'fbgemm_gpu_*.so'",
  the TBE's "[TBE=...] ..." arguments): the root logger stays at WARNING.
- ``FutureWarning`` from torchrec's planner (HeuristicalStorageReservation): the warnings
  module, ignored for warnings raised in torchrec and fbgemm_gpu code; and
  torch.distributed.checkpoint's "Please use DTensor instead ... ShardedTensor" when a
  sharded checkpoint is loaded (torchrec's tables are ShardedTensors).
- torch's ``is_fx_tracing`` warning (logger ``torch.fx._symbolic_trace``, through torch's
  own glog-style handler, "[rank0]:W... _symbolic_trace.py:56]"): set to ERROR.
- C++ (c10 / c10d / gloo) warnings, glog style "[W ... socket.cpp:...]": TORCH_CPP_LOG_LEVEL,
  read when torch loads, so set (if the user has not) before torch is imported, here and,
  through the environment, in torchrun's workers.
- torchrun's "Setting OMP_NUM_THREADS ..." banner: gmeta sets OMP_NUM_THREADS itself before
  launching (see ``gmeta.cli._launch``).
- MLflow: its INFO lines (system metrics monitor start/stop) and its warnings on logging a
  pyfunc model (the CloudPickle notice, signature hints as UserWarnings): MLflow sets up its
  own logger from MLFLOW_LOGGING_LEVEL when imported, so that is set to ERROR (if the user
  has not set it), and its warnings are ignored.

``--verbose`` sets ``GMETA_VERBOSE=1`` (inherited by torchrun's workers) and puts the root
logger at INFO, which brings all of it back.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "GMETA_VERBOSE"
# Python loggers of other libraries that are silenced (below ERROR) by default.
NOISY_LOGGERS = ("torchrec", "fbgemm_gpu", "torch.fx._symbolic_trace", "mlflow")


class _QuietLibraries(logging.Filter):
    """Drops records below ERROR that libraries log on the *root* logger from their own
    files (fbgemm_gpu's load messages and its version-table notice), which a logger level
    cannot reach."""

    verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.levelno >= logging.ERROR or "fbgemm_gpu" not in record.pathname


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def setup_logging(verbose: bool | None = None) -> bool:
    """gmeta's loggers at INFO on stderr; other libraries quiet unless ``verbose`` (None:
    ``GMETA_VERBOSE``). Returns whether verbose. Call before importing torch, so that
    TORCH_CPP_LOG_LEVEL takes effect."""
    verbose = verbose_from_env() if verbose is None else verbose
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # torchrun's workers inherit it
    else:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    root = logging.getLogger()
    if not root.handlers:  # else someone (pytest, an application) handles the output already
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_QuietLibraries())
        root.addHandler(handler)
    for h in root.handlers:  # ours (an application's own handlers are left as they are)
        for f in h.filters:
            if isinstance(f, _QuietLibraries):
                f.verbose = verbose
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("gmeta").setLevel(logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(torchrec|fbgemm_gpu|mlflow)(\.|$)")
        # torch.distributed.checkpoint, once per sharded table, on loading torchrec's tables
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    return verbose
