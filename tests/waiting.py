"""Waiting for a condition with a deadline (the only way tests wait)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    check: Callable[[], Any],
    timeout: float = 20.0,
    every: float = 0.02,
    during: Callable[[], None] | None = None,
) -> Any:
    """Call ``check`` until it returns something truthy, and return that.

    ``during`` runs between tries (e.g. restart killed workers). Fails the test
    when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        if during is not None:
            during()
        time.sleep(every)
