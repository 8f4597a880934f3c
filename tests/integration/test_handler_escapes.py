"""Handlers that let out exceptions the event loop treats specially.

``CancelledError`` and ``StopIteration`` mean something to asyncio: a stray
one must fail its own job, like any other exception, and leave the worker
running the jobs after it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import pgqueue

from .worker_helpers import run_until_empty, running_worker, wait_until

Conn = psycopg.Connection[Any]


def outcomes(conn: Conn) -> list[tuple[Any, ...]]:
    """(task, state, attempts, kind of its last error) of every job, by id."""
    return conn.execute(
        "select task, state::text, attempts, errors -> -1 ->> 'kind'"
        " from pgqueue.jobs_overview order by id"
    ).fetchall()


def all_finished(conn: Conn) -> bool:
    row = conn.execute(
        "select count(*) from pgqueue.jobs_overview where state not in"
        " ('succeeded', 'dead')"
    ).fetchone()
    return row is not None and row[0] == 0


# (transactional, how the handler lets the exception out)
ASYNC_CASES = [
    pytest.param(False, "at once", id="async-at-once"),
    pytest.param(False, "after an await", id="async-after-await"),
    pytest.param(True, "at once", id="async-transactional-at-once"),
    pytest.param(True, "after an await", id="async-transactional-after-await"),
]


@pytest.mark.parametrize(("transactional", "when"), ASYNC_CASES)
def test_a_stray_cancelled_error_fails_its_job_and_the_worker_goes_on(
    dsn: str, conn: Conn, transactional: bool, when: str
) -> None:
    """The worker did not cancel the handler: its CancelledError is that job's
    failure (HandlerCancelled), recorded at once, not a lease left to expire
    nor a cancellation of the loop that started it."""
    app = pgqueue.App(dsn)

    @app.task(transactional=transactional, max_attempts=1)
    async def cancels(ctx: pgqueue.JobContext) -> None:
        if when == "after an await":
            await asyncio.sleep(0.01)
        raise asyncio.CancelledError()

    @app.task(transactional=transactional)
    async def fine(ctx: pgqueue.JobContext) -> int:
        await asyncio.sleep(0)
        return 1

    cancels.enqueue(conn)
    with running_worker(app, concurrency=1, lease_seconds=600) as worker:
        wait_until(lambda: worker.counters.failed == 1, timeout=10)
        fine.enqueue_many(conn, [{}] * 3)
        wait_until(lambda: all_finished(conn), timeout=10)
    assert outcomes(conn) == [
        ("cancels", "dead", 1, "HandlerCancelled"),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
    ]


@pytest.mark.parametrize(
    ("transactional", "tx_batch"),
    [(False, 1), (True, 1), (True, 4)],
    ids=["plain", "transactional", "tx-batch"],
)
def test_a_sync_handler_raising_stop_iteration_fails_its_job(
    dsn: str, conn: Conn, transactional: bool, tx_batch: int
) -> None:
    """A Future refuses StopIteration; the job fails with a RuntimeError whose
    cause is the StopIteration, as a generator's would (PEP 479), instead of
    staying in flight forever."""
    app = pgqueue.App(dsn)

    @app.task(transactional=transactional, max_attempts=1)
    def stops(ctx: pgqueue.JobContext) -> None:
        next(iter(()))

    @app.task(transactional=transactional)
    def fine(ctx: pgqueue.JobContext) -> int:
        return 1

    stops.enqueue(conn)
    fine.enqueue_many(conn, [{}] * 3)
    with running_worker(app, concurrency=2, tx_batch=tx_batch, lease_seconds=600):
        wait_until(lambda: all_finished(conn), timeout=10)
    assert outcomes(conn) == [
        ("stops", "dead", 1, "RuntimeError"),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
    ]
    traceback = conn.execute(
        "select errors -> -1 ->> 'traceback' from pgqueue.finished_jobs"
        " where task = 'stops'"
    ).fetchone()
    assert traceback is not None and "StopIteration" in traceback[0]


def test_a_job_leased_again_while_its_timed_out_thread_runs_is_waited_for(
    dsn: str, conn: Conn
) -> None:
    """A sync attempt that timed out keeps its slot until its thread returns;
    its retry, leased by the same worker meanwhile, is a second attempt in
    flight with the same job id. When the old thread returns (at 3 s), the
    new one (from about 2 s to about 3.8 s) is still in flight: an until-empty
    worker waits for it and completes it, rather than leaving it leased."""
    app = pgqueue.App(dsn)
    calls: list[int] = []

    @app.task(
        transactional=False,
        timeout=2.0,
        max_attempts=2,
        retry=pgqueue.ExponentialBackoff(base=0.01, max_delay=0.01),
    )
    def sleepy(ctx: pgqueue.JobContext) -> int:
        calls.append(ctx.attempt)
        time.sleep(3.0 if ctx.attempt == 1 else 1.8)
        return ctx.attempt

    job_id = sleepy.enqueue(conn)
    run_until_empty(app, concurrency=2, poll_interval=0.05)
    assert calls == [1, 2]
    assert conn.execute(
        "select state::text, attempts, result from pgqueue.jobs_overview where id = %s",
        [job_id],
    ).fetchone() == ("succeeded", 1, 2)


def test_a_connection_the_rollback_could_not_reset_is_not_given_to_the_next_job(
    dsn: str, conn: Conn
) -> None:
    """A sync job whose ROLLBACK failed (here: its handler left a query
    running on the connection; in life, a timeout's cancel landing on the
    ROLLBACK) leaves that connection out of an idle state. The next job on the
    same thread gets a new connection instead of failing at its BEGIN."""
    app = pgqueue.App(dsn)

    @app.task(max_attempts=1)
    def leaves_a_query_running(ctx: pgqueue.JobContext) -> None:
        assert ctx.conn is not None
        ctx.conn.pgconn.send_query(b"select pg_sleep(0.2)")
        raise RuntimeError("gave up with a query in flight")

    @app.task()
    def fine(ctx: pgqueue.JobContext) -> int:
        assert ctx.conn is not None
        ctx.conn.execute("select 1")
        return 1

    leaves_a_query_running.enqueue(conn)
    fine.enqueue_many(conn, [{}] * 3)
    with running_worker(app, concurrency=1, lease_seconds=600):
        wait_until(lambda: all_finished(conn), timeout=10)
    assert outcomes(conn) == [
        ("leaves_a_query_running", "dead", 1, "RuntimeError"),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
    ]
