"""Errors of gmeta's data path.

In a module of their own so that every io module can raise them without importing
another's machinery."""

from __future__ import annotations


class PrepareError(ValueError):
    """The raw input cannot be turned into task shards. The message names file and column."""
