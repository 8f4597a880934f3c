"""Run a real Worker in a thread of the test process, and wait for conditions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

import pgqueue

from ..waiting import wait_until

__all__ = [
    "reap_now",
    "run_until_empty",
    "running_worker",
    "wait_until",
]  # tests import from here


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


def reap_now(dsn: str, job_id: int, *, due_now: bool = False) -> None:
    """Expire a running job's lease and reap it, as another worker would after
    this one froze. With ``due_now`` the rerun skips its backoff."""
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute(
            "update pgqueue.jobs set lease_expires_at = now() - interval '1 s'"
            " where id = %s",
            [job_id],
        )
        other.execute("select pgqueue.reap()")
        if due_now:
            other.execute(
                "update pgqueue.jobs set run_at = now() where id = %s", [job_id]
            )


def run_until_empty(app: pgqueue.App, **options: Any) -> pgqueue.Worker:
    """Run an until-empty worker to its end; fail the test if it has not
    returned within a minute (stopping it first)."""
    import pytest

    worker = pgqueue.Worker(app, until_empty=True, handle_signals=False, **options)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        worker.stop()
        thread.join(timeout=30)
        pytest.fail("the --until-empty worker did not return within a minute")
    return worker
