"""The registry of meta-learning algorithms: ``meta.algorithm`` -> objective."""

from __future__ import annotations

from collections.abc import Callable

from gmeta.meta import erm, maml, reptile

ALGORITHMS: dict[str, Callable] = {"maml": maml.objective, "erm": erm.objective, "reptile": reptile.objective}
