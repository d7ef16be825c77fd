"""gmeta: meta-learning (MAML family) for DLRM-style recommendation models at scale.

The library's front door: ``gmeta.MetaLearner`` and ``gmeta.task_batch`` (train and score
on batches you build), ``gmeta.hash_ids``. The package is laid out by role (the tree and the
data flow: docs/design.md, "Where each stage lives"): ``io`` (data), ``models``, ``meta``
(the algorithms), ``parallel`` (what communicates), ``training``, ``evaluation``,
``inference``, ``experiments``; the top level keeps the command line (``cli``), the config
schema (``config``) and what several layers share (``types``, ``layout``, ``checkpoint``,
``scoring``, ``metrics``, ``tracking``, ``storage``, ``logs``, ``version``). Which may import
which: ``LAYERS`` in scripts/check_imports.py.
"""

from gmeta.version import __version__

__all__ = ["__version__", "MetaLearner", "task_batch", "BatchError", "hash_ids"]


def __getattr__(name: str):
    """``gmeta.MetaLearner``, ``gmeta.task_batch`` and ``gmeta.hash_ids``, imported on first
    use (they pull in torchrec or pandas; the CLI's light commands need not)."""
    if name == "MetaLearner":
        from gmeta.training.learner import MetaLearner

        return MetaLearner
    if name in ("task_batch", "BatchError"):
        from gmeta.io import batch

        return getattr(batch, name)
    if name == "hash_ids":
        from gmeta.io.features import hash_ids

        return hash_ids
    raise AttributeError(f"module 'gmeta' has no attribute {name!r}")
