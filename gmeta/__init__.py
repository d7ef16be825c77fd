"""gmeta: meta-learning (MAML family) for DLRM recommendation models at scale."""

from gmeta.version import __version__

__all__ = ["__version__", "MetaLearner", "task_batch", "BatchError"]


def __getattr__(name: str):
    """``gmeta.MetaLearner`` and ``gmeta.task_batch``, imported on first use (they pull in
    torchrec; the CLI's light commands need not)."""
    if name == "MetaLearner":
        from gmeta.learner import MetaLearner

        return MetaLearner
    if name in ("task_batch", "BatchError"):
        from gmeta import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'gmeta' has no attribute {name!r}")
