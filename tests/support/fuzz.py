"""Hypothesis settings and a wall-clock guard for the fuzz tests."""

from __future__ import annotations

import signal
from contextlib import contextmanager

from hypothesis import HealthCheck

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow], derandomize=True)


@contextmanager
def time_limit(seconds: int):
    def fail(*_):
        raise TimeoutError(f"no result within {seconds}s: a hang")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
