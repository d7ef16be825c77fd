"""gmeta: meta-learning (MAML family) for DLRM recommendation models at scale."""

from gmeta.version import __version__

__all__ = ["__version__", "MetaLearner", "task_batch", "BatchError", "hash_ids"]


def __getattr__(name: str):
    """``gmeta.MetaLearner``, ``gmeta.task_batch`` and ``gmeta.hash_ids``, imported on first
    use (they pull in torchrec or pandas; the CLI's light commands need not)."""
    if name == "MetaLearner":
        from gmeta.learner import MetaLearner

        return MetaLearner
    if name in ("task_batch", "BatchError"):
        from gmeta import batch

        return getattr(batch, name)
    if name == "hash_ids":
        from gmeta.io.features import hash_ids

        return hash_ids
    raise AttributeError(f"module 'gmeta' has no attribute {name!r}")
