"""``gmeta ...`` run in the test's own process, reported as ``subprocess.run`` would report it.

A ``python -m gmeta.cli`` subprocess spends several CPU-seconds importing torch, torchrec,
fbgemm and MLflow before it does anything; the test process has them imported already.
Where the process boundary is not what a test checks (a one-process command, its exit code,
what it prints and logs), ``run_gmeta`` calls ``gmeta.cli.main`` here instead. What stays a
real process: several ranks (``--nproc-per-node`` > 1 starts torchrun's workers, whose
output goes to the file descriptors, not to ``sys.stderr``, as does a DataLoader worker's),
signals, and what only a fresh interpreter shows (the libraries' import-time output).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch


class NotInProcess(RuntimeError):
    """A command that would start other processes (torchrun) was given to ``run_gmeta``."""


def _mlflow_globals() -> tuple[str | None, str | None]:
    """MLflow's process-wide tracking URI and active experiment, which a tracked command sets
    (a relative ``sqlite:///mlflow.db`` would follow later tests into other directories).
    Private names: MLflow has no public way to read back "unset"."""
    if "mlflow" not in sys.modules:
        return None, None
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri, fluent._active_experiment_id


def _restore_mlflow_globals(uri: str | None, experiment: str | None) -> None:
    if "mlflow" not in sys.modules:
        return
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    utils.set_tracking_uri(uri)  # type: ignore[arg-type]  # None unsets it
    fluent._active_experiment_id = experiment


@contextlib.contextmanager
def _process_state(cwd: Path | str | None, env: Mapping[str, str] | None) -> Iterator[None]:
    """The working directory, environment, torch thread count, root log level and MLflow's
    globals a command may change (train sets the threads, the CLI the log levels, tracking
    MLflow's URI), put back afterwards; and no
    process group left behind by a command that failed after joining one (the next in-process
    command or a test's own ``init_process_group`` would find it)."""
    import torch.distributed as dist

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    threads, root_level = torch.get_num_threads(), logging.getLogger().level
    mlflow_globals = _mlflow_globals()
    # A model and trainer of an earlier test or command hold a process group in reference
    # cycles. Left to a later collection, they could be freed in a forked child (a DataLoader
    # worker of this command), where gloo's destructor waits forever for threads that a fork
    # does not copy: free them in this process, before and after the command.
    gc.collect()
    try:
        if env:
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()  # (see below)
        _restore_mlflow_globals(*mlflow_globals)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        logging.getLogger().setLevel(root_level)


def run_gmeta(args: Sequence[str | Path], *, cwd: Path | str | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``gmeta ARGS`` through ``gmeta.cli.main`` in this process (one process: a command that
    would start torchrun is refused, use a subprocess). The result's ``stderr`` holds what the
    command printed there followed by its log lines as gmeta's handler formats them
    (``HH:MM:SS logger: message``); an exception escaping ``main`` is a traceback there and
    return code 1, as the interpreter would give; ``argparse``'s exit its own code."""
    from gmeta import cli

    argv = [str(a) for a in args]

    def no_launch(*a, **k):
        raise NotInProcess(f"run_gmeta: `gmeta {' '.join(argv)}` starts torchrun: run it as a subprocess")

    out, err, logged = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    launch, cli._launch = cli._launch, no_launch
    try:
        with _process_state(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except NotInProcess:
                raise
            except Exception:
                traceback.print_exc(file=sys.stderr)
                rc = 1
    finally:
        cli._launch = launch
        root.removeHandler(handler)
    return subprocess.CompletedProcess(["gmeta", *argv], rc, out.getvalue(), err.getvalue() + logged.getvalue())
