"""gmeta: meta-learning (MAML family) for DLRM recommendation models at scale."""

__version__ = "0.1.0"
