"""Run a real Worker in a thread of the test process, and wait for conditions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pgqueue


@contextmanager
def running_worker(app: pgqueue.App, **options: Any) -> Iterator[pgqueue.Worker]:
    """Start a worker (no signal handlers) and stop it gracefully on exit."""
    options.setdefault("handle_signals", False)
    options.setdefault("concurrency", 4)
    worker = pgqueue.Worker(app, **options)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(60)
        assert not thread.is_alive(), "worker did not stop"
        if errors:
            raise errors[0]


def wait_until(
    check: Callable[[], Any], timeout: float = 20.0, every: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)
