"""The worker loop against a real database: transactions, retries, fencing, wake-ups."""

from __future__ import annotations

import asyncio
import contextvars
import signal
import threading
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import structlog.testing

import pgqueue
from pgqueue.retry import ExponentialBackoff

from .worker_helpers import reap_now, run_until_empty, running_worker, wait_until

Conn = psycopg.Connection[Any]
FAST_RETRY = ExponentialBackoff(base=0.01, max_delay=0.05)


@pytest.fixture
def business(conn: Conn) -> Conn:
    conn.execute("create table business (job_id bigint, value text)")
    return conn


def job_state(conn: Conn, job_id: int) -> str | None:
    row = conn.execute(
        "select state::text from pgqueue.jobs_overview where id = %s", [job_id]
    ).fetchone()
    return row[0] if row else None


def finished(
    conn: Conn, job_id: int, states: tuple[str, ...] = ("succeeded", "dead")
) -> bool:
    return job_state(conn, job_id) in states


def states_with_most_attempts(conn: Conn) -> list[tuple[Any, ...]]:
    """(state, jobs, most attempts of one job) per state."""
    return conn.execute(
        "select state::text, count(*), max(attempts) from pgqueue.jobs_overview"
        " group by 1 order by 1"
    ).fetchall()


def rows(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute("select job_id, value from business order by job_id").fetchall()


def test_transactional_handler_commits_with_completion(
    dsn: str, business: Conn
) -> None:
    app = pgqueue.App(dsn)

    @app.task()
    def record(ctx: pgqueue.JobContext, value: str) -> dict[str, str]:
        ctx.conn.execute("insert into business values (%s, %s)", [ctx.job.id, value])
        return {"stored": value}

    ids = record.enqueue_many(business, [{"value": str(i)} for i in range(50)])
    with running_worker(app):
        wait_until(lambda: all(finished(business, i) for i in ids))
    assert [r[0] for r in rows(business)] == ids
    result = business.execute(
        "select result from pgqueue.finished_jobs where id = %s", [ids[7]]
    ).fetchone()
    assert result == ({"stored": "7"},)


def test_handler_exception_rolls_back_its_writes_and_records_the_error(
    dsn: str, business: Conn
) -> None:
    app = pgqueue.App(dsn)

    @app.task(max_attempts=3, retry=FAST_RETRY)
    def flaky(ctx: pgqueue.JobContext) -> None:
        ctx.conn.execute(
            "insert into business values (%s, %s)",
            [ctx.job.id, f"attempt {ctx.attempt}"],
        )
        if ctx.attempt < 3:
            raise ValueError(f"boom {ctx.attempt}")

    job_id = flaky.enqueue(business)
    with running_worker(app):
        wait_until(lambda: finished(business, job_id))
    assert rows(business) == [(job_id, "attempt 3")]
    errors = business.execute(
        "select attempts, errors from pgqueue.finished_jobs where id = %s", [job_id]
    ).fetchone()
    assert errors is not None and errors[0] == 2
    assert [e["error"] for e in errors[1]] == [
        "ValueError: boom 1",
        "ValueError: boom 2",
    ]
    assert "Traceback" in errors[1][0]["traceback"] and errors[1][0]["attempt"] == 1


def test_retry_then_dead_after_max_attempts(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn)

    @app.task(max_attempts=3, retry=FAST_RETRY)
    async def always_fails(ctx: pgqueue.JobContext) -> None:
        raise RuntimeError("no luck")

    job_id = always_fails.enqueue(conn)
    with running_worker(app):
        wait_until(lambda: finished(conn, job_id))
    row = conn.execute(
        "select attempts, last_error from pgqueue.dead_jobs where id = %s", [job_id]
    ).fetchone()
    assert row == (3, "RuntimeError: no luck")


def test_retry_outcome_sets_the_delay(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn)

    @app.task()
    def later(ctx: pgqueue.JobContext) -> None:
        raise pgqueue.Retry("rate limited", after=3600)

    job_id = later.enqueue(conn)
    with running_worker(app):
        wait_until(
            lambda: conn.execute(
                "select attempts from pgqueue.jobs where id = %s and state = 'queued' and attempts = 1",
                [job_id],
            ).fetchone()
        )
    wait = conn.execute(
        "select extract(epoch from run_at - now()) from pgqueue.jobs where id = %s",
        [job_id],
    ).fetchone()
    assert wait is not None and wait[0] > 3500


def test_unknown_task_fails_clearly_and_the_worker_keeps_going(
    dsn: str, business: Conn
) -> None:
    app = pgqueue.App(dsn)

    @app.task()
    def known(ctx: pgqueue.JobContext) -> None:
        ctx.conn.execute("insert into business values (%s, 'ok')", [ctx.job.id])

    stranger = app.enqueue(business, "not_registered", {}, max_attempts=1)
    job_id = known.enqueue(business)
    with running_worker(app):
        wait_until(lambda: finished(business, job_id) and finished(business, stranger))
    error = business.execute(
        "select last_error from pgqueue.dead_jobs where id = %s", [stranger]
    ).fetchone()
    assert (
        error is not None
        and "TaskNotFound" in error[0]
        and "not_registered" in error[0]
    )
    assert rows(business) == [(job_id, "ok")]


def test_arguments_that_do_not_match_the_handler_fail_that_job(
    dsn: str, conn: Conn
) -> None:
    app = pgqueue.App(dsn)

    @app.task(max_attempts=1)
    def needs_x(ctx: pgqueue.JobContext, x: int) -> None:
        pass

    bad = app.enqueue(conn, "needs_x", {"y": 1}, max_attempts=1)
    good = needs_x.enqueue(conn, x=1)
    with running_worker(app):
        wait_until(lambda: finished(conn, bad) and finished(conn, good))
    error = conn.execute(
        "select last_error from pgqueue.dead_jobs where id = %s", [bad]
    ).fetchone()
    assert error is not None and "do not match" in error[0]
    assert job_state(conn, good) == "succeeded"


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
def test_timeout_abandons_the_attempt_and_rolls_back(
    dsn: str, business: Conn, is_async: bool
) -> None:
    app = pgqueue.App(dsn)
    if is_async:

        @app.task(timeout=0.3, max_attempts=2, retry=FAST_RETRY)
        async def slow(ctx: pgqueue.JobContext) -> None:
            await ctx.conn.execute(
                "insert into business values (%s, %s)", [ctx.job.id, str(ctx.attempt)]
            )
            if ctx.attempt == 1:
                await asyncio.sleep(5)

    else:

        @app.task(timeout=0.3, max_attempts=2, retry=FAST_RETRY)
        def slow(ctx: pgqueue.JobContext) -> None:
            ctx.conn.execute(
                "insert into business values (%s, %s)", [ctx.job.id, str(ctx.attempt)]
            )
            if ctx.attempt == 1:
                time.sleep(1.5)

    job_id = app.tasks["slow"].enqueue(business)
    with running_worker(app):
        wait_until(lambda: finished(business, job_id))
    assert job_state(business, job_id) == "succeeded"
    assert rows(business) == [(job_id, "2")]
    errors = business.execute(
        "select errors from pgqueue.finished_jobs where id = %s", [job_id]
    ).fetchone()
    assert errors is not None and errors[0][0]["kind"] == "JobTimeout"


@pytest.mark.parametrize(
    ("transactional", "tx_batch"),
    [(True, 1), (True, 4), (False, 1)],
    ids=["transactional", "tx-batch", "non-transactional"],
)
def test_a_handlers_own_timeout_error_is_not_its_timeout(
    dsn: str, conn: Conn, transactional: bool, tx_batch: int
) -> None:
    """A handler with a timeout that raises TimeoutError itself (a socket or an
    HTTP client timing out) fails with that error, not with JobTimeout: the
    worker's timeout did not fire. Only the timeout firing is JobTimeout."""
    app = pgqueue.App(dsn)

    @app.task(timeout=30, max_attempts=1, transactional=transactional)
    async def flaky(ctx: pgqueue.JobContext) -> None:
        raise TimeoutError("upstream took too long")

    @app.task(timeout=0.2, max_attempts=1, transactional=transactional)
    async def stuck(ctx: pgqueue.JobContext) -> None:
        await asyncio.sleep(5)

    own = flaky.enqueue(conn)
    fired = stuck.enqueue(conn)
    run_until_empty(app, tx_batch=tx_batch)
    kinds = dict(
        conn.execute(
            "select id, errors -> 0 ->> 'kind' from pgqueue.finished_jobs"
            " where id = any(%s)",
            [[own, fired]],
        ).fetchall()
    )
    assert kinds == {own: "TimeoutError", fired: "JobTimeout"}


TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tenant", default=None
)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("transactional", "tx_batch"), [(False, 1), (True, 1), (True, 4)]
)
def test_context_variables_do_not_leak_from_job_to_job(
    dsn: str, conn: Conn, is_async: bool, transactional: bool, tx_batch: int
) -> None:
    """A context variable a handler sets (a tenant, a trace span, structlog's
    bound context) is gone for the next job, which starts where a slot freed:
    inside the job before it, or on the same thread."""
    app = pgqueue.App(dsn)
    seen: list[tuple[int, str | None]] = []

    if is_async:

        @app.task(transactional=transactional)
        async def step(ctx: pgqueue.JobContext, n: int) -> None:
            seen.append((n, TENANT.get()))
            TENANT.set(f"tenant of job {n}")
            await asyncio.sleep(0.01)

    else:

        @app.task(transactional=transactional)
        def step(ctx: pgqueue.JobContext, n: int) -> None:
            seen.append((n, TENANT.get()))
            TENANT.set(f"tenant of job {n}")

    app.tasks["step"].enqueue_many(conn, [{"n": n} for n in range(4)])
    run_until_empty(app, concurrency=tx_batch, prefetch=3, tx_batch=tx_batch)
    assert sorted(seen) == [(n, None) for n in range(4)]


RESULTS = [
    "it's \\ a 'quote' %s {schema} $$",
    "日本語 🚀",
    {"k": "x" * 10_000},
    None,
    0,
]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_transactional_results_are_stored_verbatim(
    dsn: str, business: Conn, is_async: bool
) -> None:
    """A transactional job's result (quotes, backslashes, placeholders, non-ASCII,
    none at all) is stored as returned, with the business row committed."""
    app = pgqueue.App(dsn)

    if is_async:

        @app.task()
        async def give(ctx: pgqueue.JobContext, i: int) -> Any:
            await ctx.conn.execute("insert into business values (%s, 'x')", [i])
            return RESULTS[i]

    else:

        @app.task()
        def give(ctx: pgqueue.JobContext, i: int) -> Any:
            ctx.conn.execute("insert into business values (%s, 'x')", [i])
            return RESULTS[i]

    ids = app.tasks["give"].enqueue_many(
        business, [{"i": i} for i in range(len(RESULTS))]
    )
    run_until_empty(app)
    stored = business.execute(
        "select result, state::text from pgqueue.finished_jobs where id = any(%s)"
        " order by id",
        [ids],
    ).fetchall()
    assert stored == [(r, "succeeded") for r in RESULTS]
    assert len(rows(business)) == len(RESULTS)


def test_non_transactional_async_task_stores_its_result(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def summarize(ctx: pgqueue.JobContext, text: str) -> dict[str, Any]:
        assert ctx.conn is None
        await asyncio.sleep(0.01)
        return {"words": len(text.split())}

    ids = summarize.enqueue_many(conn, [{"text": "a b c"}] * 20)
    with running_worker(app, concurrency=20):
        wait_until(lambda: all(finished(conn, i) for i in ids))
    results = conn.execute(
        "select distinct result from pgqueue.finished_jobs"
    ).fetchall()
    assert results == [({"words": 3},)]


TRICKY = [
    'quote " and backslash \\ and \\"',
    "braces {a,b} and comma, NULL",
    "unicode é ☃ 𝄞",
    "",
    "NULL",
]


def test_batched_completions_store_every_result_verbatim(dsn: str, conn: Conn) -> None:
    """Results of many jobs are completed in one statement; strings that mean
    something in an array literal (quotes, backslashes, braces, NULL) and jobs
    without a result in the same batch all come back exactly."""
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def echo(ctx: pgqueue.JobContext, i: int, text: str) -> Any:
        # No await: the handler finishes in place (pgqueue/eager.py).
        if i % 3 == 0:
            return None
        return {"i": i, "text": text, "list": [text, None, 1.5]}

    args = [{"i": i, "text": TRICKY[i % len(TRICKY)]} for i in range(300)]
    ids = echo.enqueue_many(conn, args)
    with running_worker(app, concurrency=100, prefetch=100):
        wait_until(lambda: all(finished(conn, i) for i in ids))
    stored = dict(
        conn.execute(
            "select id, result from pgqueue.finished_jobs where state = 'succeeded'"
        ).fetchall()
    )
    for job_id, arg in zip(ids, args, strict=True):
        expected = (
            None if arg["i"] % 3 == 0 else {**arg, "list": [arg["text"], None, 1.5]}
        )
        assert stored[job_id] == expected


def test_a_lost_lease_in_a_completion_batch_fails_only_that_job(
    dsn: str, conn: Conn
) -> None:
    """Non-transactional completions are written in batches; a job reaped while
    it ran is reported lost (and reruns), the rest of its batch completes."""
    app = pgqueue.App(dsn)
    runs: list[tuple[int, int]] = []

    @app.task(transactional=False)
    async def step(ctx: pgqueue.JobContext, n: int) -> int:
        runs.append((n, ctx.attempt))
        if n == 3 and ctx.attempt == 1:
            reap_now(dsn, ctx.job.id, due_now=True)
        return n

    ids = step.enqueue_many(conn, [{"n": n} for n in range(20)])
    with running_worker(app, concurrency=20, prefetch=20) as worker:
        wait_until(lambda: all(finished(conn, i) for i in ids))
    assert worker.counters.lease_lost == 1
    assert sorted(runs) == sorted([(n, 1) for n in range(20)] + [(3, 2)])
    done = conn.execute(
        "select id, attempts, result from pgqueue.finished_jobs where state = 'succeeded' order by id"
    ).fetchall()
    assert done == [(job_id, 1 if n == 3 else 0, n) for n, job_id in enumerate(ids)]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_completion_after_lost_lease_is_fenced(
    dsn: str, business: Conn, is_async: bool
) -> None:
    """A worker whose lease expired while its handler ran cannot complete the job:
    its transaction rolls back, the rerun's commits, the business table has one row."""
    app = pgqueue.App(dsn)
    first_started = threading.Event()
    release_first = threading.Event()

    if is_async:

        @app.task(retry=FAST_RETRY)
        async def once(ctx: pgqueue.JobContext) -> None:
            await ctx.conn.execute(
                "insert into business values (%s, %s)",
                [ctx.job.id, f"attempt {ctx.attempt}"],
            )
            if ctx.attempt == 1:
                first_started.set()
                await asyncio.to_thread(release_first.wait, 10)

    else:

        @app.task(retry=FAST_RETRY)
        def once(ctx: pgqueue.JobContext) -> None:
            ctx.conn.execute(
                "insert into business values (%s, %s)",
                [ctx.job.id, f"attempt {ctx.attempt}"],
            )
            if ctx.attempt == 1:
                first_started.set()
                release_first.wait(10)

    job_id = app.tasks["once"].enqueue(business)
    # One slot: the job below runs on the connection whose completion was refused.
    with running_worker(app, lease_seconds=30, concurrency=1) as worker:
        first_started.wait(10)
        # The lease "expires" (as when the worker froze) and another worker reaps it.
        business.execute(
            "update pgqueue.jobs set lease_expires_at = now() - interval '1 s' where id = %s",
            [job_id],
        )
        business.execute("select pgqueue.reap()")
        with running_worker(app, lease_seconds=30):
            wait_until(lambda: finished(business, job_id))
        release_first.set()
        wait_until(lambda: worker.counters.lease_lost == 1)
        # The refused completion left that connection usable: the next job
        # commits its row and its completion there.
        next_id = app.tasks["once"].enqueue(business)
        wait_until(lambda: finished(business, next_id))
    assert rows(business) == [(job_id, "attempt 2"), (next_id, "attempt 1")]
    assert job_state(business, next_id) == "succeeded"


def test_heartbeats_racing_completions_report_no_lost_lease(
    dsn: str, business: Conn
) -> None:
    """A heartbeat lists the jobs running when it starts; those that complete
    or fail while it is on its way are gone from the table when it runs. They
    finished: the worker must not report their leases as expired."""
    app = pgqueue.App(dsn)

    @app.task()
    def record(ctx: pgqueue.JobContext) -> None:
        ctx.conn.execute("insert into business values (%s, 'x')", [ctx.job.id])
        time.sleep(0.01)

    @app.task(transactional=False)
    async def quick(ctx: pgqueue.JobContext) -> None:
        await asyncio.sleep(0.01)

    @app.task(max_attempts=1)
    def broken(ctx: pgqueue.JobContext) -> None:
        time.sleep(0.01)
        raise ValueError("dead on the first attempt")

    record.enqueue_many(business, [{}] * 1200)
    quick.enqueue_many(business, [{}] * 1200)
    broken.enqueue_many(business, [{}] * 600)
    # Heartbeats every second while eight jobs end every 10 ms or so: 3,000 jobs
    # of 10 ms on 8 slots last at least 3.75 s, however fast the machine (with
    # 2 ms jobs a fast one finished between two heartbeats).
    with (
        structlog.testing.capture_logs() as events,
        running_worker(app, concurrency=8, lease_seconds=3) as worker,
    ):
        wait_until(
            lambda: (
                business.execute("select count(*) from pgqueue.jobs").fetchone() == (0,)
            ),
            timeout=120,
        )
    assert worker.counters.succeeded == 2400
    assert worker.counters.failed == 600
    assert worker.counters.lease_lost == 0
    assert worker.counters.heartbeats >= 2
    expired = [e for e in events if e["event"] == "job_lease_expired"]
    assert expired == [], f"{len(expired)} finished jobs reported as expired"


def _long_job_app(
    dsn: str,
) -> tuple[pgqueue.App, pgqueue.Task, threading.Event, threading.Event]:
    """An app whose one task runs until ``release`` is set; ``started`` says
    that it runs."""
    app = pgqueue.App(dsn)
    started = threading.Event()
    release = threading.Event()

    @app.task(transactional=False)
    async def long(ctx: pgqueue.JobContext) -> None:
        started.set()
        await asyncio.to_thread(release.wait, 30)

    return app, long, started, release


def _expiries(events: list[Any]) -> list[Any]:
    return [e["job_id"] for e in events if e["event"] == "job_lease_expired"]


def _lease_expires_at(conn: Conn, job_id: int) -> Any:
    row = conn.execute(
        "select lease_expires_at from pgqueue.jobs where id = %s", [job_id]
    ).fetchone()
    assert row is not None
    return row[0]


def test_a_running_row_locked_by_another_session_keeps_its_lease(
    dsn: str, business: Conn
) -> None:
    """The heartbeat skips locked rows, and not only completions lock them: a
    lease whose FOR UPDATE met the row as it was being leased keeps its lock
    until its transaction ends (as does anyone's SELECT ... FOR UPDATE). Such
    a job still holds its lease: no expiry is reported, and it is renewed as
    soon as the lock goes, not a whole heartbeat interval later."""
    app, long, started, release = _long_job_app(dsn)
    job_id = long.enqueue(business)
    locker = psycopg.connect(dsn)
    try:
        with (
            structlog.testing.capture_logs() as events,
            running_worker(app, lease_seconds=6, concurrency=1) as worker,
        ):
            assert started.wait(10)
            locker.execute(
                "select 1 from pgqueue.jobs where id = %s for update", [job_id]
            )
            locked_at = _lease_expires_at(business, job_id)
            beats = worker.counters.heartbeats
            # Two heartbeats (every 2 s) meet the lock.
            wait_until(lambda: worker.counters.heartbeats >= beats + 2, timeout=10)
            assert _lease_expires_at(business, job_id) == locked_at
            locker.rollback()
            # Renewed within the retry (0.5 s), well before the next beat (2 s).
            unlocked = time.monotonic()
            wait_until(lambda: _lease_expires_at(business, job_id) != locked_at)
            assert time.monotonic() - unlocked < 1.5
            release.set()
            wait_until(lambda: finished(business, job_id))
        assert _expiries(events) == []
        assert worker.counters.succeeded == 1
    finally:
        release.set()
        locker.close()


def test_a_reaped_running_job_is_reported_as_expired(dsn: str, business: Conn) -> None:
    app, long, started, release = _long_job_app(dsn)
    job_id = long.enqueue(business)
    try:
        with (
            structlog.testing.capture_logs() as events,
            running_worker(app, lease_seconds=3, concurrency=1),
        ):
            assert started.wait(10)
            reap_now(dsn, job_id)
            wait_until(lambda: _expiries(events) == [job_id], timeout=10)
            release.set()
    finally:
        release.set()


def test_a_new_job_takes_the_one_free_slot_beside_long_jobs(
    dsn: str, business: Conn
) -> None:
    """A worker with no backlog leases for any free slot: with 7 of 8 slots
    on long jobs, a job enqueued next waited for one of them to end."""
    app = pgqueue.App(dsn)
    release = threading.Event()
    started: list[int] = []

    @app.task(transactional=False)
    async def long(ctx: pgqueue.JobContext) -> None:
        started.append(ctx.job.id)
        await asyncio.to_thread(release.wait, 60)

    @app.task(transactional=False)
    async def short(ctx: pgqueue.JobContext) -> None:
        started.append(ctx.job.id)

    long.enqueue_many(business, [{}] * 7)
    try:
        with running_worker(app, concurrency=8, poll_interval=1.0) as worker:
            wait_until(lambda: len(started) == 7)
            # One after the other: a lease of the one free slot that came
            # back full is no backlog.
            for _ in range(3):
                job_id = short.enqueue(business)
                wait_until(lambda j=job_id: finished(business, j), timeout=10)
            assert len(started) == 10
            assert worker.counters.succeeded == 3  # the long ones still run
            release.set()
    finally:
        release.set()


def test_an_idle_worker_does_not_spin_on_a_due_job_another_session_locked(
    dsn: str, business: Conn
) -> None:
    """The lease skips a locked row; next_run_at still sees the job due. The
    worker looked again at once, thousands of times a second, while the lock
    was held; it backs off to its poll interval now, and runs the job once
    the lock is gone."""
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def noop(ctx: pgqueue.JobContext) -> None:
        pass

    job_id = noop.enqueue(business)
    locker = psycopg.connect(dsn)
    try:
        locker.execute("select 1 from pgqueue.jobs where id = %s for update", [job_id])
        with running_worker(app, poll_interval=1.0) as worker:
            wait_until(lambda: worker.counters.lease_calls >= 1)
            time.sleep(0.5)
            before = worker.counters.lease_calls
            time.sleep(3)
            # Backing off from 10 ms to the 1 s poll: about 9 in 3 s.
            assert worker.counters.lease_calls - before <= 30
            locker.rollback()
            wait_until(lambda: finished(business, job_id), timeout=5)
    finally:
        locker.close()


def _quick_and_boom(app: pgqueue.App) -> tuple[pgqueue.Task, pgqueue.Task]:
    """A task that succeeds and one that fails for good, at once."""

    @app.task(transactional=False)
    async def quick(ctx: pgqueue.JobContext) -> int:
        return 2

    @app.task(transactional=False, max_attempts=1)
    async def boom(ctx: pgqueue.JobContext) -> None:
        raise ValueError("no")

    return quick, boom


def _others_are_written(
    business: Conn, quick: pgqueue.Task, boom: pgqueue.Task
) -> None:
    """Five completions and a failure of the running worker are written."""
    others = quick.enqueue_many(business, [{}] * 5)
    failing = boom.enqueue(business)
    wait_until(lambda: all(finished(business, i) for i in others), timeout=10)
    wait_until(lambda: job_state(business, failing) == "dead", timeout=10)


@pytest.mark.parametrize("db_timeout", [None, 3.0], ids=["default", "short-deadline"])
def test_a_completion_whose_row_another_session_locked_holds_up_no_other(
    dsn: str, business: Conn, db_timeout: float | None
) -> None:
    """A completion waits a quarter of the deadline, at most 2 s, for a row
    lock (0020); the one that met a lock is set aside, and the worker's other
    completions and failures are written meanwhile. It waited for the lock
    until the deadline, then again, with everything behind it; it is written
    once the lock is gone. With a deadline of 3 s (750 ms to wait), the
    worker's own cancel, at half the deadline, would otherwise come first."""
    app = pgqueue.App(dsn)
    go = threading.Event()
    returned = threading.Event()

    @app.task(transactional=False)
    async def held(ctx: pgqueue.JobContext) -> int:
        await asyncio.to_thread(go.wait, 30)
        returned.set()
        return 1

    quick, boom = _quick_and_boom(app)
    locked = held.enqueue(business)
    locker = psycopg.connect(dsn)
    try:
        with (
            structlog.testing.capture_logs() as events,
            running_worker(app, lease_seconds=30, db_timeout=db_timeout) as worker,
        ):
            wait_until(lambda: job_state(business, locked) == "running")
            locker.execute(
                "select 1 from pgqueue.jobs where id = %s for update", [locked]
            )
            go.set()
            assert returned.wait(10)
            _others_are_written(business, quick, boom)
            assert job_state(business, locked) == "running"
            assert any(e["event"] == "complete_waits_for_lock" for e in events)
            locker.rollback()
            wait_until(lambda: job_state(business, locked) == "succeeded", timeout=30)
        assert worker.counters.succeeded == 6
        assert worker.counters.lease_lost == 0
        given_up = [e for e in events if e["event"] == "complete_given_up"]
        assert given_up == []
    finally:
        go.set()
        locker.close()


def test_a_failure_whose_row_another_session_locked_holds_up_no_other(
    dsn: str, business: Conn
) -> None:
    """A failure that meets a row lock is set aside, as a completion is: the
    worker's other completions and failures are written meanwhile, and it
    gets one last try when the worker stops. It was tried again and again,
    the flusher sleeping up to 5 s between tries with every completion behind
    it, and a stopping worker spent its 10 s final flush on it."""
    app = pgqueue.App(dsn)
    go = threading.Event()

    @app.task(transactional=False, max_attempts=1)
    async def held(ctx: pgqueue.JobContext) -> None:
        await asyncio.to_thread(go.wait, 30)
        raise ValueError("held")

    quick, boom = _quick_and_boom(app)
    locked = held.enqueue(business)
    locker = psycopg.connect(dsn)
    try:
        with (
            structlog.testing.capture_logs() as events,
            running_worker(app, lease_seconds=30, db_timeout=3.0) as worker,
        ):
            wait_until(lambda: job_state(business, locked) == "running")
            locker.execute(
                "select 1 from pgqueue.jobs where id = %s for update", [locked]
            )
            go.set()
            wait_until(lambda: any(e["event"] == "fail_waits_for_lock" for e in events))
            _others_are_written(business, quick, boom)
            assert job_state(business, locked) == "running"
            stopping = time.monotonic()
        # The last try waited 750 ms for the lock (a quarter of db_timeout).
        assert time.monotonic() - stopping < 6
        assert job_state(business, locked) == "running"  # its lease runs out
        assert worker.counters.succeeded == 5
        assert worker.counters.failed == 1
        tries = [e for e in events if e["event"] == "fail_waits_for_lock"]
        assert len(tries) >= 2  # set aside, then the last try at shutdown
    finally:
        go.set()
        locker.close()


def test_a_completion_set_aside_for_a_lock_gets_a_last_try_at_shutdown(
    dsn: str, business: Conn
) -> None:
    """A completion set aside after meeting a row lock is tried once more when
    the worker stops, whenever it was due: it was left unwritten, and its job
    ran again once its lease ran out."""
    app = pgqueue.App(dsn)
    go = threading.Event()

    @app.task(transactional=False)
    async def quick(ctx: pgqueue.JobContext) -> int:
        await asyncio.to_thread(go.wait, 30)
        return 1

    job_id = quick.enqueue(business)
    locker = psycopg.connect(dsn)
    try:
        with (
            structlog.testing.capture_logs() as events,
            running_worker(app, lease_seconds=30, db_timeout=2.0),
        ):
            wait_until(lambda: job_state(business, job_id) == "running")
            locker.execute(
                "select 1 from pgqueue.jobs where id = %s for update", [job_id]
            )
            go.set()
            wait_until(
                lambda: any(e["event"] == "complete_waits_for_lock" for e in events)
            )
            locker.rollback()
        assert job_state(business, job_id) == "succeeded"
    finally:
        go.set()
        locker.close()


def test_a_worker_whose_row_reap_deleted_registers_again(
    dsn: str, business: Conn
) -> None:
    """reap deletes the rows of workers silent for an hour: a live worker
    whose heartbeats are further apart (a lease of 3 hours or more), or that
    came back from an hour stopped, was gone from pgqueue.workers for good.
    It registers again at each reap now: a row deleted comes back, and one
    that looks an hour old is fresh again (kept, or deleted by a reap and
    registered anew; register_worker's own test covers what it keeps)."""
    app = pgqueue.App(dsn)
    fresh = (
        "select last_seen > now() - interval '1 min' from pgqueue.workers where id = %s"
    )
    with running_worker(app, reap_interval=0.2) as worker:
        wait_until(lambda: business.execute(fresh, [worker.worker_id]).fetchone())
        business.execute(
            "delete from pgqueue.workers where id = %s", [worker.worker_id]
        )
        business.commit()
        wait_until(lambda: business.execute(fresh, [worker.worker_id]).fetchone())
        business.execute(
            "update pgqueue.workers set last_seen = now() - interval '2 h'"
            " where id = %s",
            [worker.worker_id],
        )
        business.commit()
        wait_until(
            lambda: business.execute(fresh, [worker.worker_id]).fetchone() == (True,)
        )


def test_jobs_leased_ahead_are_handed_back_when_the_grace_begins(
    dsn: str, business: Conn
) -> None:
    """A stopping worker starts none of the jobs it leased ahead (prefetch):
    they are handed back as the grace begins, and another worker runs them
    while the first still waits for its running job. They stayed leased to
    the first until its grace was over."""
    app = pgqueue.App(dsn)
    release = threading.Event()
    ran_by: dict[int, str] = {}

    @app.task(transactional=False)
    async def long(ctx: pgqueue.JobContext) -> None:
        await asyncio.to_thread(release.wait, 60)

    @app.task(transactional=False)
    async def short(ctx: pgqueue.JobContext) -> None:
        ran_by[ctx.job.id] = ctx.worker_id

    long.enqueue(business)
    try:
        first = pgqueue.Worker(
            app, handle_signals=False, concurrency=1, prefetch=3, shutdown_grace=60
        )
        thread = threading.Thread(target=first.run, daemon=True)
        thread.start()
        wait_until(lambda: first.counters.leased == 1)
        ids = short.enqueue_many(business, [{}] * 3)
        wait_until(lambda: first.counters.leased == 4)  # 3 waiting for the slot
        first.stop()
        with running_worker(app) as second:
            wait_until(lambda: all(finished(business, i) for i in ids), timeout=10)
            assert set(ran_by.values()) == {second.worker_id}
            assert thread.is_alive()  # still in its grace
        release.set()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        release.set()


def test_two_workers_never_run_the_same_job(dsn: str, business: Conn) -> None:
    app = pgqueue.App(dsn)

    @app.task()
    def record(ctx: pgqueue.JobContext) -> None:
        ctx.conn.execute(
            "insert into business values (%s, %s)", [ctx.job.id, ctx.worker_id]
        )

    ids = record.enqueue_many(business, [{}] * 400)
    with running_worker(app, concurrency=8), running_worker(app, concurrency=8):
        wait_until(lambda: all(finished(business, i) for i in ids))
    done = rows(business)
    assert sorted(r[0] for r in done) == ids
    assert len({r[1] for r in done}) == 2  # both workers took part


def test_listen_wakes_an_idle_worker_before_the_poll(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn)
    started: list[float] = []

    @app.task(transactional=False)
    async def ping(ctx: pgqueue.JobContext) -> None:
        started.append(time.monotonic())

    with running_worker(app, poll_interval=60) as worker:
        wait_until(lambda: worker.counters.lease_calls > 0)
        time.sleep(0.2)
        t0 = time.monotonic()
        ping.enqueue(conn)
        wait_until(lambda: started, timeout=10)
    # With a 60 s poll, only the NOTIFY can have woken the worker this soon.
    assert started[0] - t0 < 30


def test_scheduled_job_runs_when_due_without_polling(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn)
    started: list[float] = []

    @app.task(transactional=False)
    async def later(ctx: pgqueue.JobContext) -> None:
        started.append(time.monotonic())

    with running_worker(app, poll_interval=60) as worker:
        wait_until(lambda: worker.counters.lease_calls > 0)
        t0 = time.monotonic()
        later.options(delay=1.0).enqueue(conn)
        wait_until(lambda: started, timeout=20)
    assert started[0] - t0 >= 0.9


def test_graceful_stop_hands_back_unfinished_jobs_without_counting(
    dsn: str, conn: Conn
) -> None:
    app = pgqueue.App(dsn)
    started = threading.Event()

    @app.task(transactional=False)
    async def forever(ctx: pgqueue.JobContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    job_id = forever.enqueue(conn)
    with running_worker(app, shutdown_grace=0.2):
        started.wait(10)
    row = conn.execute(
        "select state::text, attempts from pgqueue.jobs where id = %s", [job_id]
    ).fetchone()
    assert row == ("queued", 0)


def test_until_empty_drains_and_returns(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    def noop(ctx: pgqueue.JobContext) -> None:
        pass

    noop.enqueue_many(conn, [{}] * 300)
    worker = pgqueue.Worker(app, until_empty=True, handle_signals=False, concurrency=16)
    worker.run()
    assert worker.counters.succeeded == 300
    depth = conn.execute(
        "select queued, running, succeeded from pgqueue.queue_depth"
    ).fetchone()
    assert depth == (0, 0, 300)


@pytest.mark.parametrize("transactional", [False, True])
def test_until_empty_returns_after_the_last_completion_not_at_the_next_poll(
    dsn: str, conn: Conn, transactional: bool
) -> None:
    """Fewer jobs than free slots: the one lease takes them all and finds the
    queue drained while their completions are still unwritten. The worker must
    look again once they are written, not sleep its poll interval (an hour here:
    a worker that waits for it does not return)."""
    app = pgqueue.App(dsn)

    @app.task(transactional=transactional)
    async def noop(ctx: pgqueue.JobContext) -> None:
        pass

    noop.enqueue_many(conn, [{}] * 10)
    worker = run_until_empty(app, concurrency=50, poll_interval=3600)
    assert worker.counters.succeeded == 10


def test_until_empty_runs_a_retry_it_scheduled_for_now(dsn: str, conn: Conn) -> None:
    """A failure is buffered and written by the flusher: while that write is on
    its way the worker has nothing running, yet it must not stop before the
    retry it is scheduling (Retry(after=0)) has run."""
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def once_more(ctx: pgqueue.JobContext) -> None:
        if ctx.job.attempts == 0:
            raise pgqueue.Retry("again at once", after=0)

    job_id = once_more.enqueue(conn)
    run_until_empty(app, poll_interval=3600)
    assert conn.execute(
        "select state::text, attempts from pgqueue.jobs_overview where id = %s",
        [job_id],
    ).fetchone() == ("succeeded", 1)


def test_failures_the_database_cannot_store_as_given_are_recorded_and_hold_up_none(
    dsn: str, conn: Conn
) -> None:
    """A message with a lone surrogate (no UTF-8 for it), a retry delay no
    timestamp can hold, and an ordinary failure, written in one batch: each is
    recorded (the text escaped, the delay capped), and the worker stops."""
    app = pgqueue.App(dsn)

    @app.task(transactional=False, max_attempts=1)
    async def unencodable(ctx: pgqueue.JobContext) -> None:
        raise ValueError("half a pair: \ud800")

    @app.task(transactional=False, max_attempts=2)
    async def forever(ctx: pgqueue.JobContext) -> None:
        raise pgqueue.Retry("in a very long time", after=float("inf"))

    @app.task(transactional=False, max_attempts=1)
    async def plain(ctx: pgqueue.JobContext) -> None:
        raise RuntimeError("plain")

    ids = [unencodable.enqueue(conn), forever.enqueue(conn), plain.enqueue(conn)]
    worker = run_until_empty(app)
    rows = conn.execute(
        "select task, state::text, attempts, errors -> 0 ->> 'error',"
        " run_at > now() + interval '99 years'"
        " from pgqueue.jobs_overview where id = any(%s) order by id",
        [ids],
    ).fetchall()
    assert rows == [
        ("unencodable", "dead", 1, "ValueError: half a pair: \\ud800", None),
        ("forever", "queued", 1, "Retry: in a very long time", True),
        ("plain", "dead", 1, "RuntimeError: plain", None),
    ]
    assert worker.counters.failed == 3


def test_tx_batch_rolls_back_only_the_failing_job(dsn: str, business: Conn) -> None:
    """Jobs sharing a transaction (savepoints): a failure or a lost lease undoes
    only that job's writes; the others commit with their completions."""
    app = pgqueue.App(dsn)

    @app.task(max_attempts=2, retry=FAST_RETRY)
    def record(ctx: pgqueue.JobContext, n: int) -> None:
        ctx.conn.execute(
            "insert into business values (%s, %s)", [ctx.job.id, f"n{n} a{ctx.attempt}"]
        )
        if n % 5 == 0 and ctx.attempt == 1:
            raise ValueError("every fifth job fails once")
        if n == 7 and ctx.attempt == 1:
            # Another worker reaped this job meanwhile: the completion is fenced.
            reap_now(dsn, ctx.job.id)

    ids = record.enqueue_many(business, [{"n": n} for n in range(40)])
    with running_worker(app, concurrency=16, prefetch=16, tx_batch=8) as worker:
        wait_until(lambda: all(finished(business, i) for i in ids), timeout=60)
    assert worker.counters.lease_lost >= 1
    done = rows(business)
    assert [r[0] for r in done] == ids  # one row per job
    assert all(
        r[1].endswith("a2")
        == (int(r[1].split()[0][1:]) % 5 == 0 or r[1].startswith("n7 "))
        for r in done
    )
    states = business.execute(
        "select state::text, count(*) from pgqueue.jobs_overview group by 1"
    ).fetchall()
    assert states == [("succeeded", 40)]


def test_a_lease_sent_ahead_is_handed_back_when_the_worker_stops(
    dsn: str, conn: Conn
) -> None:
    """A busy worker sends its next lease before it starts the jobs that just
    arrived (each lease takes half the slots: 10 here). A stop requested by job
    25 arrives while the lease of jobs 30-39 is on its way: those jobs must not
    start, nor wait out their lease; they are handed back untouched."""
    app = pgqueue.App(dsn)
    calls: list[int] = []
    worker: pgqueue.Worker | None = None

    @app.task(transactional=False)
    async def step(ctx: pgqueue.JobContext, n: int) -> None:
        calls.append(n)
        if n == 25:
            assert worker is not None
            worker.stop()

    step.enqueue_many(conn, [{"n": n} for n in range(200)])
    worker = pgqueue.Worker(app, concurrency=10, prefetch=10, handle_signals=False)
    worker.run()
    assert worker.counters.leases_ahead >= 3
    assert calls == list(range(30))
    assert states_with_most_attempts(conn) == [
        ("queued", 170, 0),
        ("succeeded", 30, 0),
    ]


def test_stop_with_only_prefetched_jobs_left_writes_the_finished_ones(
    dsn: str, conn: Conn
) -> None:
    """The running job finishes within the grace period, and only prefetched
    jobs (never started) are left: they are handed back, and the finished
    job's buffered completion is still written before the worker exits."""
    app = pgqueue.App(dsn)
    started = threading.Event()

    @app.task(transactional=False)
    async def slow(ctx: pgqueue.JobContext) -> None:
        started.set()
        await asyncio.sleep(0.3)

    ids = slow.enqueue_many(conn, [{}] * 3)
    with running_worker(app, concurrency=1, prefetch=2, shutdown_grace=10):
        started.wait(10)
    states = conn.execute(
        "select id, state::text, attempts from pgqueue.jobs_overview order by id"
    ).fetchall()
    assert states == [
        (ids[0], "succeeded", 0),
        (ids[1], "queued", 0),
        (ids[2], "queued", 0),
    ]


def test_a_handler_sees_its_jobs_times_as_utc_whatever_the_servers_zone(
    dsn: str, conn: Conn
) -> None:
    """The lease connection reads timestamps in UTC (worker.py: a faster
    conversion); the instants are the database's, whatever its time zone."""
    conn.execute(f"alter database {conn.info.dbname} set timezone = 'Asia/Tokyo'")
    app = pgqueue.App(dsn)
    seen: list[tuple[Any, Any]] = []

    @app.task(transactional=False)
    async def when(ctx: pgqueue.JobContext) -> None:
        seen.append((ctx.job.run_at, ctx.job.created_at))

    job_id = when.enqueue(conn)
    stored = conn.execute(
        "select run_at, created_at from pgqueue.jobs where id = %s", [job_id]
    ).fetchone()
    worker = pgqueue.Worker(app, until_empty=True, handle_signals=False)
    worker.run()
    assert seen == [stored]
    for moment in seen[0]:
        assert moment.utcoffset() == timedelta(0)


def test_cancelling_the_worker_hands_back_a_lease_sent_ahead(
    dsn: str, conn: Conn
) -> None:
    """As above, but the worker's task is cancelled (an application that runs
    run_async and cancels it): the cancellation lands while the lease of jobs
    30-39 is on its way; the lease is not cancelled with it, and its jobs are
    handed back rather than left running until their lease expires."""
    app = pgqueue.App(dsn)
    calls: list[int] = []
    worker = pgqueue.Worker(app, concurrency=10, prefetch=10, handle_signals=False)
    running: list[asyncio.Task[None]] = []

    @app.task(transactional=False)
    async def step(ctx: pgqueue.JobContext, n: int) -> None:
        calls.append(n)
        if n == 25:
            running[0].cancel()

    async def main() -> None:
        running.append(asyncio.create_task(worker.run_async()))
        with pytest.raises(asyncio.CancelledError):
            await running[0]

    step.enqueue_many(conn, [{"n": n} for n in range(200)])
    asyncio.run(main())
    assert calls == list(range(30))
    assert states_with_most_attempts(conn) == [
        ("queued", 170, 0),
        ("succeeded", 30, 0),
    ]


def test_cancelling_the_worker_hands_back_the_lease_it_waits_for(
    dsn: str, conn: Conn
) -> None:
    """The worker's task is cancelled while the lease it waits for (not one
    sent ahead) is done on the server but not yet read: its rows used to be
    dropped with the cancelled call (and the cancellation was lost: the worker
    ran on). Now the call runs on, its jobs are handed back, and the worker
    stops."""
    # The lease of the later jobs takes half a second on the server.
    conn.execute(
        "create function slow_lease() returns trigger language plpgsql as $$"
        " begin perform pg_sleep(0.05); return new; end $$;"
        " create trigger slow_lease before update on pgqueue.jobs for each row"
        " when (new.task = 'later' and new.state = 'running')"
        " execute function slow_lease()"
    )
    app = pgqueue.App(dsn)
    worker = pgqueue.Worker(
        app, concurrency=20, poll_interval=0.2, handle_signals=False
    )
    running: list[asyncio.Task[None]] = []

    @app.task(transactional=False)
    async def first(ctx: pgqueue.JobContext) -> None:
        with psycopg.connect(dsn, autocommit=True) as other:
            later.enqueue_many(other, [{}] * 10)
            deadline = time.monotonic() + 30
            while other.execute(
                "select count(*) from pg_stat_activity"
                " where wait_event = 'PgSleep' and query like %s",
                ["%lease(%"],
            ).fetchone() != (1,):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
        time.sleep(1)  # noqa: ASYNC251 (holds the loop: the lease ends unread)
        running[0].cancel()

    @app.task(transactional=False)
    async def later(ctx: pgqueue.JobContext) -> None:
        raise AssertionError("the worker was cancelled before these started")

    first.enqueue(conn)

    async def main() -> None:
        running.append(asyncio.create_task(worker.run_async()))
        done, _ = await asyncio.wait(running, timeout=60)
        if not done:  # the cancellation was lost (so it was, before)
            worker.stop()
            await running[0]
            pytest.fail("the cancelled worker ran on")
        assert running[0].cancelled()

    asyncio.run(main())
    assert states_with_most_attempts(conn) == [
        ("queued", 10, 0),  # handed back, not left running
        ("succeeded", 1, 0),
    ]


async def _until_running(dsn: str, jobs: int) -> None:
    """From inside a handler: wait until ``jobs`` jobs are leased (30 s at most)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
        deadline = time.monotonic() + 30
        while True:
            cur = await other.execute(
                "select count(*) from pgqueue.jobs where state = 'running'"
            )
            if await cur.fetchone() == (jobs,):
                return
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)


def test_a_cancelled_worker_starts_no_job_while_it_drains(dsn: str, conn: Conn) -> None:
    """run_async cancelled from outside drains like stop(): the job running
    finishes within the grace, and the job leased behind it does not start
    when a slot frees up (it used to, and was then handed back while it ran);
    it is handed back."""
    app = pgqueue.App(dsn)
    worker = pgqueue.Worker(
        app, concurrency=1, prefetch=1, shutdown_grace=10, handle_signals=False
    )
    running: list[asyncio.Task[None]] = []
    started: list[str] = []

    @app.task(transactional=False)
    async def step(ctx: pgqueue.JobContext, name: str) -> None:
        started.append(name)
        if name != "first":
            return
        await _until_running(dsn, 2)  # the second is leased, waiting for a slot
        running[0].cancel()
        await asyncio.sleep(0.3)  # still running as the worker drains

    first = step.options(priority=1).enqueue(conn, name="first")
    second = step.enqueue(conn, name="second")

    async def main() -> None:
        running.append(asyncio.create_task(worker.run_async()))
        await asyncio.wait(running, timeout=60)
        assert running[0].cancelled()

    asyncio.run(main())
    assert started == ["first"]
    states = dict(
        conn.execute("select id, state::text from pgqueue.jobs_overview").fetchall()
    )
    assert states == {first: "succeeded", second: "queued"}


def test_a_second_cancel_in_the_grace_ends_it_and_still_hands_back(
    dsn: str, conn: Conn
) -> None:
    """stop(), then run_async's Task cancelled while a job runs in the grace
    (a host that waits less than the grace): the grace ends at once, the
    running job and the one leased behind it are handed back, the heartbeat
    and every other task of the worker end, and the cancel reaches the host.
    It used to cut the shutdown short: both jobs stayed leased, and the
    heartbeat, still running, kept their leases alive for as long as the
    host's loop ran."""
    app = pgqueue.App(dsn)
    worker = pgqueue.Worker(
        app,
        concurrency=1,
        prefetch=1,
        shutdown_grace=30,
        lease_seconds=1.5,
        handle_signals=False,
    )
    in_grace = asyncio.Event()

    @app.task(transactional=False)
    async def step(ctx: pgqueue.JobContext, name: str) -> None:
        await _until_running(dsn, 2)  # the second is leased, waiting for a slot
        worker.stop()
        in_grace.set()
        await asyncio.sleep(20)  # runs on in the grace

    first = step.options(priority=1).enqueue(conn, name="first")
    second = step.enqueue(conn, name="second")

    async def main() -> list[asyncio.Task[Any]]:
        running = asyncio.create_task(worker.run_async())
        await asyncio.wait_for(in_grace.wait(), 30)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        running.cancel()
        await asyncio.wait({running}, timeout=30)
        assert running.cancelled() and time.monotonic() - started < 10
        await asyncio.sleep(2.0)  # longer than the lease: nothing renews it
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    left = asyncio.run(main())
    assert left == []
    states = dict(conn.execute("select id, state::text from pgqueue.jobs").fetchall())
    assert states == {first: "queued", second: "queued"}


@pytest.mark.parametrize("after", [0, 0.5])
def test_an_idle_worker_runs_the_retry_it_scheduled_when_due(
    dsn: str, conn: Conn, after: float
) -> None:
    """A retry this worker scheduled (Retry(after=...), or a backoff) runs when
    it is due, not at the next poll: no NOTIFY announces it (fail_many sends
    none), so an idle worker used to wait out its poll interval (5 s here)."""
    app = pgqueue.App(dsn)
    starts: list[float] = []

    @app.task(transactional=False)
    async def flaky(ctx: pgqueue.JobContext) -> None:
        starts.append(time.monotonic())
        if len(starts) == 1:
            raise pgqueue.Retry("again", after=after)

    with running_worker(app, poll_interval=5.0):
        time.sleep(0.3)  # idle: waiting for a NOTIFY
        flaky.enqueue(conn)
        wait_until(lambda: len(starts) >= 2, timeout=20)
    assert after <= starts[1] - starts[0] < after + 2.0


def test_a_stopped_worker_leaves_no_signal_handler_in_a_loop_that_lives_on(
    dsn: str, conn: Conn
) -> None:
    """A host whose event loop outlives the worker: the worker's SIGTERM and
    SIGINT handlers go with it (a signal reaching them afterwards found the
    worker stopped and ended the process at once)."""
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def noop(ctx: pgqueue.JobContext) -> None:
        return None

    noop.enqueue(conn)

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        await pgqueue.Worker(app, until_empty=True).run_async()
        return [loop.remove_signal_handler(s) for s in (signal.SIGTERM, signal.SIGINT)]

    assert asyncio.run(main()) == [False, False]


def test_a_worker_that_fails_to_start_closes_what_it_opened(
    dsn: str, conn: Conn
) -> None:
    """register_worker fails (here: the function is gone): run_async raises,
    and the pool, the threads, the background tasks and the signal handlers
    it had started are gone too."""
    app = pgqueue.App(dsn)

    @app.task()
    def noop(ctx: pgqueue.JobContext) -> None:
        return None

    conn.execute("drop function pgqueue.register_worker")
    worker = pgqueue.Worker(app)

    async def main() -> tuple[list[asyncio.Task[Any]], list[bool]]:
        loop = asyncio.get_running_loop()
        with pytest.raises(psycopg.errors.UndefinedFunction):
            await worker.run_async()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        handlers = [
            loop.remove_signal_handler(s) for s in (signal.SIGTERM, signal.SIGINT)
        ]
        return left, handlers

    left, handlers = asyncio.run(main())
    assert left == [] and handlers == [False, False]
    assert worker._pool is not None and worker._pool.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("pgqueue-job")]


def test_a_paused_queue_waits_and_resuming_it_wakes_the_worker(
    dsn: str, conn: Conn
) -> None:
    """No lease from a paused queue, however often the worker looks; resuming
    notifies, so the jobs run at once, not at the next poll (an hour here)."""
    app = pgqueue.App(dsn)
    ran: list[int] = []

    @app.task(transactional=False)
    async def noop(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

    conn.execute("select pgqueue.pause_queue('default')")
    with running_worker(app, poll_interval=3600) as worker:
        wait_until(lambda: worker.counters.lease_calls > 0)
        ids = noop.enqueue_many(conn, [{}] * 3)  # the NOTIFY wakes it: still paused
        wait_until(lambda: worker.counters.lease_calls > 1)
        time.sleep(0.5)
        assert ran == []
        conn.execute("select pgqueue.resume_queue('default')")
        wait_until(lambda: len(ran) == 3, timeout=10)
    assert sorted(ran) == ids


def test_pausing_a_queue_hands_back_its_jobs_leased_ahead(dsn: str, conn: Conn) -> None:
    """Jobs a worker leased ahead (--prefetch) of a queue that is then paused
    are handed back at once, not started (0024): before, they all ran after
    the pause, the job running finishes, and another queue's jobs still run.
    Resuming runs them."""
    app = pgqueue.App(dsn)
    release = threading.Event()
    ran: list[int] = []

    @app.task(transactional=False)
    async def long(ctx: pgqueue.JobContext) -> None:
        await asyncio.to_thread(release.wait, 30)
        ran.append(ctx.job.id)

    @app.task(transactional=False)
    async def short(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

    @app.task(transactional=False, queue="other")
    async def elsewhere(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

    first = long.enqueue(conn)
    try:
        with (
            structlog.testing.capture_logs() as events,
            running_worker(
                app, queues=["default", "other"], concurrency=1, prefetch=6
            ) as worker,
        ):
            wait_until(lambda: worker.counters.leased == 1)
            waiting = short.enqueue_many(conn, [{}] * 4)
            other = elsewhere.enqueue_many(conn, [{}] * 2)
            wait_until(lambda: worker.counters.leased == 7)  # all behind the slot
            conn.execute("select pgqueue.pause_queue('default')")
            wait_until(lambda: all(job_state(conn, i) == "queued" for i in waiting))
            assert any(e["event"] == "jobs_handed_back" for e in events)
            release.set()
            wait_until(lambda: all(finished(conn, i) for i in [first, *other]))
            time.sleep(0.3)
            assert sorted(ran) == sorted([first, *other])
            attempts = conn.execute(
                "select array_agg(attempts) from pgqueue.jobs where id = any(%s)",
                [waiting],
            ).fetchone()
            assert attempts == ([0, 0, 0, 0],)  # handed back, not counted
            conn.execute("select pgqueue.resume_queue('default')")
            wait_until(lambda: all(finished(conn, i) for i in waiting))
    finally:
        release.set()


def test_jobs_a_lease_brings_back_after_their_queue_was_paused_are_handed_back(
    dsn: str, conn: Conn
) -> None:
    """A lease on its way as the pause commits (its snapshot from before it)
    returns the queue's jobs after the worker heard of the pause: they are
    handed back, not started. A busy worker always has a lease on its way;
    before, up to half its slots of the paused queue's jobs started. A
    trigger holds the lease a moment, as a slow server would."""
    conn.execute("create table hold_lease (x int)")
    conn.execute(
        "create function hold_lease() returns trigger language plpgsql as $$"
        " begin if exists (select from hold_lease) then delete from hold_lease;"
        " perform pg_sleep(1.5); end if; return new; end $$"
    )
    conn.execute(
        "create trigger hold_lease before update on pgqueue.jobs"
        " for each row execute function hold_lease()"
    )
    app = pgqueue.App(dsn)
    ran: list[int] = []

    @app.task(transactional=False)
    async def short(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

    try:
        with (
            structlog.testing.capture_logs() as events,
            running_worker(app, concurrency=2, prefetch=2) as worker,
        ):
            wait_until(lambda: worker.counters.lease_calls > 0)
            conn.execute("insert into hold_lease values (1)")
            ids = short.enqueue_many(conn, [{}] * 4)  # its NOTIFY wakes the lease
            wait_until(
                lambda: (
                    conn.execute(
                        "select count(*) from pg_stat_activity where wait_event = 'PgSleep'"
                    ).fetchone()
                    == (1,)
                )
            )
            conn.execute("select pgqueue.pause_queue('default')")
            wait_until(lambda: any(e["event"] == "jobs_handed_back" for e in events))
            wait_until(lambda: all(job_state(conn, i) == "queued" for i in ids))
            time.sleep(0.3)
            assert ran == []
            conn.execute("select pgqueue.resume_queue('default')")
            wait_until(lambda: sorted(ran) == ids)
    finally:
        conn.execute("drop trigger hold_lease on pgqueue.jobs")


def test_a_quiet_queue_is_served_by_polling(dsn: str, conn: Conn) -> None:
    """A quiet queue's enqueues send no NOTIFY; a listening worker still runs
    its jobs, found at its next poll."""
    conn.execute("select pgqueue.set_queue_notify('quiet', false)")
    app = pgqueue.App(dsn)
    ran: list[int] = []

    @app.task(queue="quiet", transactional=False)
    async def hush(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        running_worker(app, queues=["quiet"], poll_interval=0.2),
    ):
        listener.execute("listen pgqueue")
        ids = [hush.enqueue(conn) for _ in range(3)]
        wait_until(lambda: sorted(ran) == ids)
        assert list(listener.notifies(timeout=0.1)) == []


def _old_finished_jobs(conn: Conn, n: int) -> None:
    conn.execute(
        "insert into pgqueue.finished_jobs (id, queue, task, args, priority, state,"
        " attempts, max_attempts, created_at, finished_at)"
        " select -g, 'default', 'gone', '{}', 0, 'succeeded', 0, 25,"
        " now() - interval '9 days', now() - interval '8 days'"
        " from generate_series(1, %s) g",
        [n],
    )


def test_a_worker_prunes_all_the_history_past_retention_in_one_round(
    dsn: str, conn: Conn
) -> None:
    # Before, a round deleted at most one batch of 10,000, every five minutes:
    # a history that grew faster than 33 jobs/s was never caught up.
    _old_finished_jobs(conn, 25_000)
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def noop(ctx: pgqueue.JobContext) -> None:
        pass

    young = noop.enqueue(conn)
    with (
        structlog.testing.capture_logs() as events,
        running_worker(app, reap_interval=0.2, retention=timedelta(days=7)),
    ):
        wait_until(lambda: any(e["event"] == "jobs_pruned" for e in events), timeout=30)
    assert [e["count"] for e in events if e["event"] == "jobs_pruned"] == [25_000]
    left = conn.execute("select id, state::text from pgqueue.finished_jobs").fetchall()
    assert left == [(young, "succeeded")]


def test_a_worker_without_retention_prunes_nothing(dsn: str, conn: Conn) -> None:
    _old_finished_jobs(conn, 10)
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def noop(ctx: pgqueue.JobContext) -> None:
        pass

    with running_worker(app, reap_interval=0.1, retention=None) as worker:
        noop.enqueue(conn)
        wait_until(lambda: worker.counters.succeeded == 1)
        time.sleep(0.5)  # five reap intervals: a pruning worker would have pruned
    count = "select count(*) from pgqueue.finished_jobs where task = 'gone'"
    assert conn.execute(count).fetchone() == (10,)


def test_a_worker_refuses_a_negative_retention(dsn: str) -> None:
    with pytest.raises(pgqueue.errors.ConfigurationError, match="retention"):
        pgqueue.Worker(pgqueue.App(dsn), retention=timedelta(hours=-1))


def _listening_locks(conn: Conn) -> int:
    """Listening locks held in this database (0016): 16 per waiting worker."""
    row = conn.execute(
        "select count(*) from pg_locks where locktype = 'advisory'"
        " and classid = 1885827446 and objsubid = 2 and granted and mode = 'ShareLock'"
        " and database = (select oid from pg_database"
        " where datname = current_database())"
    ).fetchone()
    assert row is not None
    return int(row[0])


def _slow_jobs(dsn: str) -> tuple[pgqueue.App, pgqueue.Task, list[int]]:
    """An app whose task takes 20 ms, and the ids of the jobs it ran."""
    app = pgqueue.App(dsn)
    ran: list[int] = []

    @app.task(transactional=False)
    async def slow(ctx: pgqueue.JobContext) -> None:
        await asyncio.sleep(0.02)
        ran.append(ctx.job.id)

    return app, slow, ran


def test_a_waiting_worker_holds_the_listening_locks_and_a_busy_one_lets_go(
    dsn: str, conn: Conn
) -> None:
    """Enqueues NOTIFY only while a worker waits: it takes the listening locks
    before it waits, lets them go while full leases show a backlog, and takes
    them again when the queue runs dry."""
    app, slow, ran = _slow_jobs(dsn)
    with running_worker(app, concurrency=1, prefetch=0, poll_interval=60):
        wait_until(lambda: _listening_locks(conn) == 16)
        ids = slow.enqueue_many(conn, [{}] * 40)
        wait_until(lambda: _listening_locks(conn) == 0, every=0.005)
        assert len(ran) < len(ids)
        wait_until(lambda: len(ran) == len(ids))
        wait_until(lambda: _listening_locks(conn) == 16)


def test_a_job_whose_enqueue_sent_no_notify_runs_without_waiting_for_the_poll(
    dsn: str, conn: Conn
) -> None:
    """The lost wake-up that the listening locks rule out: a producer enqueues
    while the worker is busy (no NOTIFY) and keeps its transaction open while
    the worker runs dry. The worker cannot start waiting until that
    transaction ends, so the job runs soon after the commit, not at the next
    poll (a minute here)."""
    app, slow, ran = _slow_jobs(dsn)
    with (
        running_worker(app, concurrency=1, prefetch=0, poll_interval=60),
        psycopg.connect(dsn) as producer,
    ):
        wait_until(lambda: _listening_locks(conn) == 16)
        backlog = slow.enqueue_many(conn, [{}] * 20)
        wait_until(lambda: _listening_locks(conn) == 0, every=0.005)
        late = slow.enqueue(producer)  # no worker waits: no NOTIFY
        wait_until(lambda: len(ran) == len(backlog))
        time.sleep(0.3)
        assert _listening_locks(conn) == 0  # the open transaction holds it off
        assert late not in ran
        producer.commit()
        committed = time.monotonic()
        wait_until(lambda: late in ran, timeout=10)
        assert time.monotonic() - committed < 5
        wait_until(lambda: _listening_locks(conn) == 16)


def test_a_waiting_worker_whose_lease_backend_dies_is_still_woken(
    dsn: str, conn: Conn
) -> None:
    """The listening locks live on the lease connection: when its backend is
    terminated while the worker waits, the locks go and enqueues stop
    NOTIFYing. The worker notices the connection's end, reconnects and takes
    them again, so a job enqueued afterwards runs at once, not at the poll."""
    app = pgqueue.App(dsn)
    ran: list[int] = []

    @app.task(transactional=False)
    async def quick(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

    def holder() -> int | None:
        row = conn.execute(
            "select pid from pg_locks where locktype = 'advisory'"
            " and classid = 1885827446 and objsubid = 2 and granted"
            " and mode = 'ShareLock' limit 1"
        ).fetchone()
        return None if row is None else int(row[0])

    with running_worker(app, poll_interval=60):
        first = wait_until(holder)
        conn.execute("select pg_terminate_backend(%s)", [first])
        wait_until(lambda: holder() not in (None, first))  # taken again
        assert _listening_locks(conn) == 16
        job = quick.enqueue(conn)
        enqueued = time.monotonic()
        wait_until(lambda: job in ran, timeout=15)
        assert time.monotonic() - enqueued < 5
