"""Transaction batches (--tx-batch): many jobs, one transaction, one completion.

The guarantees are those of one job per transaction: every job's writes commit
exactly once, together with its own fenced completion, whatever else happens
in its batch. Each test runs with sync handlers (txbatch.py, threads) and with
async ones (txbatch_async.py, lanes on the event loop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any

import psycopg
import psycopg.sql
import pytest

import pgqueue
from pgqueue.retry import ExponentialBackoff

from .worker_helpers import reap_now, run_until_empty, running_worker, wait_until

Conn = psycopg.Connection[Any]
FAST_RETRY = ExponentialBackoff(base=0.01, max_delay=0.05)
KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


def finished(conn: Conn, ids: list[int]) -> bool:
    row = conn.execute(
        "select count(*) from pgqueue.finished_jobs where id = any(%s)", [ids]
    ).fetchone()
    return row is not None and row[0] == len(ids)


def business_rows(conn: Conn) -> list[tuple[int, int]]:
    rows = conn.execute("select job_id, n from business order by job_id").fetchall()
    return [(int(job_id), int(n)) for job_id, n in rows]


@KINDS
def test_a_batch_commits_every_job_once_with_its_completion(
    dsn: str, conn: Conn, kind: str
) -> None:
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = pgqueue.App(dsn)
    runs: collections.Counter[int] = collections.Counter()
    batches: set[int] = set()
    # txid of the batch: jobs that share one are committed together
    insert = "insert into business values (%s, %s) returning txid_current()"

    if kind == "sync":

        @app.task()
        def record(ctx: pgqueue.JobContext, n: int) -> int:
            runs[n] += 1
            row = ctx.conn.execute(insert, [ctx.job.id, n]).fetchone()
            batches.add(row[0])
            return n

    else:

        @app.task()
        async def record(ctx: pgqueue.JobContext, n: int) -> int:
            runs[n] += 1
            row = await (await ctx.conn.execute(insert, [ctx.job.id, n])).fetchone()
            batches.add(row[0])
            return n

    ids = record.enqueue_many(conn, [{"n": n} for n in range(200)])
    with running_worker(app, concurrency=32, prefetch=32, tx_batch=16):
        wait_until(lambda: finished(conn, ids), timeout=60)
    assert runs == {n: 1 for n in range(200)}  # no failure, no rerun
    assert business_rows(conn) == [(job_id, n) for n, job_id in enumerate(ids)]
    results = conn.execute(
        "select id, result, attempts from pgqueue.finished_jobs"
        " where state = 'succeeded' order by id"
    ).fetchall()
    assert results == [(job_id, n, 0) for n, job_id in enumerate(ids)]
    assert len(batches) < 200  # jobs did share transactions


@KINDS
def test_a_failing_job_fails_alone_and_its_batch_mates_commit_once(
    dsn: str, conn: Conn, kind: str
) -> None:
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = pgqueue.App(dsn)
    runs: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    insert = "insert into business values (%s, %s)"

    def counted(ctx: pgqueue.JobContext, n: int) -> None:
        with lock:
            runs[n] += 1

    def fail_first(ctx: pgqueue.JobContext, n: int) -> None:
        if n % 7 == 3 and ctx.attempt == 1:
            raise ValueError(f"job {n} fails its first attempt")

    if kind == "sync":

        @app.task(max_attempts=3, retry=FAST_RETRY)
        def record(ctx: pgqueue.JobContext, n: int) -> None:
            counted(ctx, n)
            ctx.conn.execute(insert, [ctx.job.id, n])
            fail_first(ctx, n)

    else:

        @app.task(max_attempts=3, retry=FAST_RETRY)
        async def record(ctx: pgqueue.JobContext, n: int) -> None:
            counted(ctx, n)
            await ctx.conn.execute(insert, [ctx.job.id, n])
            fail_first(ctx, n)

    ids = record.enqueue_many(conn, [{"n": n} for n in range(100)])
    with running_worker(app, concurrency=16, prefetch=16, tx_batch=8):
        wait_until(lambda: finished(conn, ids), timeout=60)
    # Every job's row exactly once, whatever ran twice.
    assert business_rows(conn) == [(job_id, n) for n, job_id in enumerate(ids)]
    failing = {n for n in range(100) if n % 7 == 3}
    attempts = dict(
        conn.execute(
            "select id, attempts from pgqueue.finished_jobs where state = 'succeeded'"
        ).fetchall()
    )
    for n, job_id in enumerate(ids):
        # Only the failing jobs count a failed attempt; a rerun forced by a
        # batch mate is not an attempt of their own.
        assert attempts[job_id] == (1 if n in failing else 0), n
        assert runs[n] >= (2 if n in failing else 1)


@KINDS
def test_a_handler_that_swallows_a_database_error_fails_only_itself(
    dsn: str, conn: Conn, kind: str
) -> None:
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = pgqueue.App(dsn)
    insert = "insert into business values (%s, %s)"

    if kind == "sync":

        @app.task(max_attempts=1)
        def record(ctx: pgqueue.JobContext, n: int) -> None:
            ctx.conn.execute(insert, [ctx.job.id, n])
            if n == 5:
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    ctx.conn.execute("select 1 / 0")  # leaves the transaction aborted

    else:

        @app.task(max_attempts=1)
        async def record(ctx: pgqueue.JobContext, n: int) -> None:
            await ctx.conn.execute(insert, [ctx.job.id, n])
            if n == 5:
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    await ctx.conn.execute("select 1 / 0")

    ids = record.enqueue_many(conn, [{"n": n} for n in range(20)])
    with running_worker(app, concurrency=20, prefetch=20, tx_batch=20):
        wait_until(lambda: finished(conn, ids), timeout=60)
    assert business_rows(conn) == [
        (job_id, n) for n, job_id in enumerate(ids) if n != 5
    ]
    dead = conn.execute(
        "select id, errors -> -1 ->> 'kind' from pgqueue.dead_jobs"
    ).fetchall()
    assert dead == [(ids[5], "HandlerLeftTransactionAborted")]


@KINDS
def test_a_lease_lost_in_a_batch_rolls_back_only_that_job(
    dsn: str, conn: Conn, kind: str
) -> None:
    """The batch's completion finds one lease gone: nothing commits at first,
    then every job runs again fenced alone; the lost one commits nothing."""
    conn.execute("create table business (job_id bigint, n int, attempt int)")
    app = pgqueue.App(dsn)
    insert = "insert into business values (%s, %s, %s)"
    reaped = threading.Event()

    def reap_once(ctx: pgqueue.JobContext, n: int) -> None:
        if n == 4 and not reaped.is_set():
            # Another worker reaps this job while the batch runs: once. (The
            # batch runs attempt 1 again when its completion fails; by then the
            # reap's NOTIFY may have got attempt 2 leased, which a second reap
            # would take away as well.)
            reaped.set()
            reap_now(dsn, ctx.job.id, due_now=True)

    if kind == "sync":

        @app.task(retry=FAST_RETRY)
        def record(ctx: pgqueue.JobContext, n: int) -> None:
            ctx.conn.execute(insert, [ctx.job.id, n, ctx.attempt])
            reap_once(ctx, n)

    else:

        @app.task(retry=FAST_RETRY)
        async def record(ctx: pgqueue.JobContext, n: int) -> None:
            await ctx.conn.execute(insert, [ctx.job.id, n, ctx.attempt])
            await asyncio.to_thread(reap_once, ctx, n)

    ids = record.enqueue_many(conn, [{"n": n} for n in range(10)])
    with running_worker(app, concurrency=10, prefetch=10, tx_batch=10) as worker:
        wait_until(lambda: finished(conn, ids), timeout=60)
    assert worker.counters.lease_lost >= 1
    rows = conn.execute(
        "select job_id, n, attempt from business order by job_id"
    ).fetchall()
    # One row per job; job 4's first attempt left none, its second did.
    assert rows == [(job_id, n, 2 if n == 4 else 1) for n, job_id in enumerate(ids)]


@KINDS
def test_a_handler_that_times_out_mid_query_fails_alone(
    dsn: str, conn: Conn, kind: str
) -> None:
    """A handler whose query outlives the task's timeout: the query is
    cancelled, that job fails with JobTimeout and writes nothing, and its batch
    mates commit once: a timeout counts the handler's own run, not the time a
    job waits behind a slow batch mate."""
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = pgqueue.App(dsn)
    insert = "insert into business values (%s, %s)"
    nap = "select pg_sleep(case when %s = 3 then 30 else 0 end)"

    if kind == "sync":

        @app.task(max_attempts=3, retry=FAST_RETRY, timeout=0.5)
        def record(ctx: pgqueue.JobContext, n: int) -> None:
            ctx.conn.execute(insert, [ctx.job.id, n])
            ctx.conn.execute(nap, [n])

    else:

        @app.task(max_attempts=3, retry=FAST_RETRY, timeout=0.5)
        async def record(ctx: pgqueue.JobContext, n: int) -> None:
            await ctx.conn.execute(insert, [ctx.job.id, n])
            await ctx.conn.execute(nap, [n])

    ids = record.enqueue_many(conn, [{"n": n} for n in range(8)])
    started = time.monotonic()
    with running_worker(app, concurrency=8, prefetch=8, tx_batch=8):
        wait_until(lambda: finished(conn, ids), timeout=60)
    assert time.monotonic() - started < 20  # not the 30 s sleep
    assert business_rows(conn) == [
        (job_id, n) for n, job_id in enumerate(ids) if n != 3
    ]
    dead = conn.execute(
        "select id, errors -> -1 ->> 'kind' from pgqueue.dead_jobs"
    ).fetchall()
    assert dead == [(ids[3], "JobTimeout")]
    # None of the others timed out waiting behind it: each succeeded at once.
    assert conn.execute(
        "select count(*) from pgqueue.finished_jobs"
        " where state = 'succeeded' and attempts = 0"
    ).fetchone() == (7,)


def test_jobs_queued_behind_a_hung_sync_handler_run_on_a_spare_thread(
    dsn: str, conn: Conn
) -> None:
    """A sync handler hung where no query cancel reaches it (a socket read
    without a timeout) holds its batch thread for good. With 2 slots and
    batches of 2 there is one thread: the jobs queued to it never started, and
    the heartbeat kept their leases. Past the hung handler's timeout another
    thread takes them."""
    app = pgqueue.App(dsn)
    release = threading.Event()

    @app.task(timeout=0.5, max_attempts=1)
    def hang(ctx: pgqueue.JobContext) -> None:
        release.wait(60)

    @app.task(timeout=0.5)
    def quick(ctx: pgqueue.JobContext) -> None:
        ctx.conn.execute("select 1")

    hung = hang.enqueue(conn)
    try:
        with running_worker(app, concurrency=2, tx_batch=2, lease_seconds=3):
            wait_until(lambda: finished(conn, [hung]))  # failed at its timeout
            ids = [quick.enqueue(conn) for _ in range(3)]
            wait_until(lambda: finished(conn, ids), timeout=10)
            release.set()
        states = conn.execute(
            "select state::text, attempts, count(*) from pgqueue.finished_jobs"
            " where id = any(%s) group by 1, 2",
            [ids],
        ).fetchall()
        assert states == [("succeeded", 0, 3)]
    finally:
        release.set()


def test_jobs_queued_behind_a_hung_batch_mate_without_a_timeout_go_on(
    dsn: str, conn: Conn
) -> None:
    """A handler with no timeout hangs after a batch mate that has one: the
    mate's wait for the batch's COMMIT runs out (twice its timeout and a
    second), and a new thread takes the jobs queued behind them."""
    app = pgqueue.App(dsn)
    release = threading.Event()

    @app.task(max_attempts=1)
    def hang(ctx: pgqueue.JobContext) -> None:
        release.wait(60)

    @app.task(timeout=0.5)
    def quick(ctx: pgqueue.JobContext) -> None:
        ctx.conn.execute("select 1")

    first = quick.enqueue(conn)
    hang.enqueue(conn)
    try:
        # One thread for batches of 4; two slots stay free for the jobs below.
        with running_worker(app, concurrency=4, tx_batch=4, lease_seconds=30):
            wait_until(lambda: finished(conn, [first]), timeout=10)
            ids = [quick.enqueue(conn) for _ in range(3)]
            wait_until(lambda: finished(conn, ids), timeout=15)
            release.set()
        states = conn.execute(
            "select state::text, count(*) from pgqueue.finished_jobs"
            " where id = any(%s) group by 1",
            [ids],
        ).fetchall()
        assert states == [("succeeded", 3)]
    finally:
        release.set()


def test_a_batch_whose_row_another_session_locks_runs_each_handler_once(
    dsn: str, conn: Conn
) -> None:
    """The batch's completion waits for a row lock as long as it takes (the
    worker's briefer lock wait, 0020, is for its own batched writes only): a
    lock error would roll the batch back and run its handlers again."""
    app = pgqueue.App(dsn)
    go = threading.Event()
    runs: list[int] = []

    @app.task()
    def record(ctx: pgqueue.JobContext) -> None:
        runs.append(ctx.job.id)
        go.wait(30)

    ids = record.enqueue_many(conn, [{}, {}])
    locker = psycopg.connect(dsn)
    try:
        with running_worker(app, concurrency=2, tx_batch=2, lease_seconds=30):
            wait_until(lambda: len(runs) == 1)
            locker.execute(
                "select 1 from pgqueue.jobs where id = %s for update", [ids[0]]
            )
            go.set()
            time.sleep(3)
            locker.rollback()
            wait_until(lambda: finished(conn, ids), timeout=15)
        assert sorted(runs) == sorted(ids)
    finally:
        go.set()
        locker.close()


@pytest.mark.parametrize("how", ["awaits-a-cancelled-task", "cancels-its-task"])
def test_a_handler_that_lets_a_cancellation_out_fails_alone_and_the_lane_goes_on(
    dsn: str, conn: Conn, how: str
) -> None:
    """An async handler awaits a task it cancelled itself, or cancels its own
    Task (the lane's: a home-made deadline), so CancelledError leaves it though
    nobody cancelled the worker: that job fails, and the one lane (concurrency
    2, batches of 2) keeps running the others, timed ones included. A
    self-cancel used to end the lane for good, stranding every later job."""
    app = pgqueue.App(dsn)

    @app.task(max_attempts=1, timeout=5)
    async def job(ctx: pgqueue.JobContext, n: int) -> int:
        await ctx.conn.execute("select 1")
        if n == 0 and how == "cancels-its-task":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        elif n == 0:
            doomed = asyncio.ensure_future(asyncio.sleep(10))
            doomed.cancel()
            await doomed
        await asyncio.sleep(0.01)
        return n

    with running_worker(app, concurrency=2, prefetch=0, tx_batch=2):
        bad = job.enqueue(conn, n=0)
        wait_until(lambda: finished(conn, [bad]), timeout=10)
        ids = job.enqueue_many(conn, [{"n": n} for n in range(1, 5)])
        wait_until(lambda: finished(conn, ids), timeout=15)
    assert conn.execute(
        "select state::text, errors -> -1 ->> 'kind' from pgqueue.finished_jobs"
        " where id = %s",
        [bad],
    ).fetchone() == ("dead", "HandlerCancelled")


@KINDS
def test_a_handlers_own_savepoint_does_not_keep_its_writes(
    dsn: str, conn: Conn, kind: str
) -> None:
    """Job 2 fails, so the batch runs jobs 0 and 1 again, each in a savepoint;
    job 1 now fails after making savepoints of its own, named as the batch
    names its own: nothing of job 1 commits (a shared name rolled back to the
    handler's savepoint only, and job 1's first write committed with job 0)."""
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = pgqueue.App(dsn)
    runs: collections.Counter[int] = collections.Counter()
    names = [
        psycopg.sql.SQL("savepoint {}").format(psycopg.sql.Identifier(n))
        for n in ("job", "pgqueue_job")
    ]
    if kind == "async":

        @app.task(max_attempts=1)
        async def write(ctx: pgqueue.JobContext, n: int) -> None:
            runs[n] += 1
            await ctx.conn.execute(
                "insert into business values (%s, %s)", [ctx.job.id, n]
            )
            if n == 1 and runs[n] == 2:
                for name in names:
                    await ctx.conn.execute(name)
                raise ValueError("after savepoints of its own")
            if n == 2:
                raise ValueError("send the batch down its careful path")

    else:

        @app.task(max_attempts=1)
        def write(ctx: pgqueue.JobContext, n: int) -> None:
            runs[n] += 1
            ctx.conn.execute("insert into business values (%s, %s)", [ctx.job.id, n])
            if n == 1 and runs[n] == 2:
                for name in names:
                    ctx.conn.execute(name)
                raise ValueError("after savepoints of its own")
            if n == 2:
                raise ValueError("send the batch down its careful path")

    ids = app.tasks["write"].enqueue_many(conn, [{"n": n} for n in range(3)])
    run_until_empty(app, concurrency=3, prefetch=0, tx_batch=3)
    assert runs[1] == 2, "job 1 ran again in the careful path"
    assert business_rows(conn) == [(ids[0], 0)]
    assert conn.execute(
        "select array_agg(state::text order by id) from pgqueue.finished_jobs"
    ).fetchone() == (["succeeded", "dead", "dead"],)


@KINDS
def test_a_rerun_in_a_batch_is_timed_too(dsn: str, conn: Conn, kind: str) -> None:
    """Job 0 runs quickly, job 1 fails, so job 0 runs again (in a savepoint),
    this time past its timeout: that run times out like any other."""
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = pgqueue.App(dsn)
    runs: collections.Counter[int] = collections.Counter()
    insert = "insert into business values (%s, %s)"
    nap = "select pg_sleep(case when %s then 30 else 0 end)"

    def fail_one(n: int) -> None:
        if n == 1:
            raise ValueError("job 1 fails")

    if kind == "sync":

        @app.task(max_attempts=1, timeout=1.0)
        def record(ctx: pgqueue.JobContext, n: int) -> None:
            runs[n] += 1
            ctx.conn.execute(insert, [ctx.job.id, n])
            ctx.conn.execute(nap, [n == 0 and runs[0] == 2])
            fail_one(n)

    else:

        @app.task(max_attempts=1, timeout=1.0)
        async def record(ctx: pgqueue.JobContext, n: int) -> None:
            runs[n] += 1
            await ctx.conn.execute(insert, [ctx.job.id, n])
            await ctx.conn.execute(nap, [n == 0 and runs[0] == 2])
            fail_one(n)

    ids = record.enqueue_many(conn, [{"n": 0}, {"n": 1}])
    with running_worker(app, concurrency=2, prefetch=2, tx_batch=2):
        wait_until(lambda: finished(conn, ids), timeout=20)
    assert runs[0] == 2  # it ran again after its batch mate failed
    assert conn.execute(
        "select id, state::text, errors -> -1 ->> 'kind' from pgqueue.finished_jobs"
        " order by id"
    ).fetchall() == [(ids[0], "dead", "JobTimeout"), (ids[1], "dead", "ValueError")]
    assert business_rows(conn) == []


@KINDS
def test_a_batch_that_cannot_connect_fails_its_job_which_runs_again(
    dsn: str, conn: Conn, server_dsn: str, kind: str
) -> None:
    """When the first job arrives the database refuses new connections for a
    moment, so the batch thread (or lane) cannot connect: that job fails, and
    runs again once connections are allowed. Its retries come a few tenths of
    a second apart: the worker runs a retry when it is due, and with retries
    milliseconds apart every attempt could fail before connections return."""
    app = pgqueue.App(dsn)
    slow_retry = ExponentialBackoff(base=0.3, max_delay=0.5, jitter=0)

    if kind == "sync":

        @app.task(max_attempts=5, retry=slow_retry)
        def record(ctx: pgqueue.JobContext, n: int) -> int:
            ctx.conn.execute("select 1")
            return n

    else:

        @app.task(max_attempts=5, retry=slow_retry)
        async def record(ctx: pgqueue.JobContext, n: int) -> int:
            await ctx.conn.execute("select 1")
            return n

    database = psycopg.sql.Identifier(conn.info.dbname)
    with (
        running_worker(app, concurrency=2, tx_batch=2) as worker,
        psycopg.connect(server_dsn, autocommit=True) as admin,
    ):
        # Registered, and its lease connection open (a lease has come back):
        # only the batch's own connection is still to be made.
        wait_until(
            lambda: (
                conn.execute("select count(*) from pgqueue.workers").fetchone() == (1,)
                and worker.counters.lease_calls > 0
            )
        )
        admin.execute(
            psycopg.sql.SQL("alter database {} allow_connections false").format(
                database
            )
        )
        try:
            job = record.enqueue(conn, n=1)
            wait_until(
                lambda: (
                    conn.execute(
                        "select attempts >= 1 from pgqueue.jobs where id = %s", [job]
                    ).fetchone()
                    == (True,)
                )
            )
        finally:
            admin.execute(
                psycopg.sql.SQL("alter database {} allow_connections true").format(
                    database
                )
            )
        wait_until(lambda: finished(conn, [job]), timeout=20)
    assert conn.execute(
        "select state::text, result from pgqueue.finished_jobs where id = %s", [job]
    ).fetchone() == ("succeeded", 1)


@KINDS
def test_a_deferred_constraint_that_fails_at_commit_fails_only_its_job(
    dsn: str, conn: Conn, kind: str
) -> None:
    """Job 3 breaks a deferred foreign key, which only the COMMIT checks: the
    batch's COMMIT fails, then the careful one; each job then commits on its
    own, and job 3 alone fails."""
    conn.execute("create table parent (id int primary key)")
    conn.execute("insert into parent values (1)")
    conn.execute(
        "create table business (job_id bigint primary key, n int,"
        " p int references parent deferrable initially deferred)"
    )
    app = pgqueue.App(dsn)
    insert = "insert into business values (%s, %s, %s)"

    if kind == "sync":

        @app.task(max_attempts=1)
        def record(ctx: pgqueue.JobContext, n: int) -> None:
            ctx.conn.execute(insert, [ctx.job.id, n, 999 if n == 3 else 1])

    else:

        @app.task(max_attempts=1)
        async def record(ctx: pgqueue.JobContext, n: int) -> None:
            await ctx.conn.execute(insert, [ctx.job.id, n, 999 if n == 3 else 1])

    ids = record.enqueue_many(conn, [{"n": n} for n in range(8)])
    with running_worker(app, concurrency=8, prefetch=8, tx_batch=8):
        wait_until(lambda: finished(conn, ids), timeout=60)
    states = dict(
        conn.execute("select id, state::text from pgqueue.finished_jobs").fetchall()
    )
    assert states == {
        job_id: ("dead" if n == 3 else "succeeded") for n, job_id in enumerate(ids)
    }
    assert [n for _, n in business_rows(conn)] == [0, 1, 2, 4, 5, 6, 7]


def test_a_timed_out_jobs_cancel_does_not_reach_its_batch_mate(
    dsn: str, conn: Conn
) -> None:
    """Job A (odd n) returns just past its timeout, as its cancel is on its
    way; its batch mate B then runs again on the same connection. The cancel
    must not land on B's statements: B never fails."""
    app = pgqueue.App(dsn)
    runs: collections.Counter[int] = collections.Counter()

    @app.task(max_attempts=2, retry=FAST_RETRY, timeout=0.3)
    def record(ctx: pgqueue.JobContext, n: int, delta: float) -> None:
        runs[n] += 1
        ctx.conn.execute("select 1")
        if n % 2:
            if ctx.attempt == 1:
                time.sleep(0.3 + delta)
        elif runs[n] == 2:
            ctx.conn.execute("select pg_sleep(0.2)")

    mates = []
    with running_worker(app, concurrency=2, prefetch=2, tx_batch=2):
        for k in range(16):
            delta = k * 0.0005
            ids = record.enqueue_many(
                conn, [{"n": 2 * k, "delta": delta}, {"n": 2 * k + 1, "delta": delta}]
            )
            mates.append(ids[0])
            wait_until(lambda: finished(conn, ids), timeout=20)  # noqa: B023
    failed = conn.execute(
        "select id, errors -> 0 ->> 'error' from pgqueue.finished_jobs"
        " where id = any(%s) and attempts > 0",
        [mates],
    ).fetchall()
    assert failed == []


def test_a_batch_mate_hung_past_its_timeout_does_not_hold_the_others(
    dsn: str, conn: Conn
) -> None:
    """One batch thread; job 1 hangs where no query cancel reaches it
    (time.sleep past its timeout) after job 0 ran in the same batch. Job 1
    fails at its timeout; job 0, whose batch cannot commit, fails too after
    waiting twice its timeout and a second, rather than for as long as job 1
    hangs, and both run again once the thread is free."""
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = pgqueue.App(dsn)
    gate = threading.Event()

    @app.task(max_attempts=2, retry=FAST_RETRY, timeout=0.5)
    def record(ctx: pgqueue.JobContext, n: int) -> None:
        ctx.conn.execute("insert into business values (%s, %s)", [ctx.job.id, n])
        if n == 1 and ctx.attempt == 1:
            gate.wait(10)

    def attempts(job_id: int) -> Any:
        return conn.execute(
            "select attempts from pgqueue.jobs_overview where id = %s", [job_id]
        ).fetchone()

    ids = record.enqueue_many(conn, [{"n": 0}, {"n": 1}])
    try:
        with running_worker(app, concurrency=2, prefetch=0, tx_batch=2):
            started = time.monotonic()
            wait_until(lambda: attempts(ids[0]) == (1,), timeout=9)
            waited = time.monotonic() - started
            gate.set()
            wait_until(lambda: finished(conn, ids), timeout=20)
    finally:
        gate.set()
    assert waited < 5, f"job 0 waited {waited:.1f} s behind its hung batch mate"
    assert business_rows(conn) == [(ids[0], 0), (ids[1], 1)]


def test_a_completed_job_waiting_on_a_hung_batch_mate_does_not_block_the_worker(
    dsn: str, conn: Conn
) -> None:
    """A batch goes down its careful path (a mate raised); job "a" runs again
    and its completion is written in the open transaction, which holds its row;
    then mate "hang" hangs where no cancel reaches. When a's patience ends, its
    failure used to be written anyway: that statement waited on a's row lock,
    and every other completion and failure of the worker queued behind it.
    Now a waits for its batch's COMMIT: no statement of the worker waits on a
    lock, and a ends succeeded once the mate returns."""
    app = pgqueue.App(dsn)
    runs: collections.Counter[str] = collections.Counter()
    release = threading.Event()

    @app.task(max_attempts=3, timeout=0.3, retry=FAST_RETRY)
    def step(ctx: pgqueue.JobContext, name: str) -> None:
        runs[name] += 1
        ctx.conn.execute("select 1")
        if name == "hang" and runs[name] == 2:
            release.wait(15)  # its rerun, in the careful path
        if name == "fail":
            raise ValueError("send the batch down its careful path")

    @app.task(max_attempts=1)
    def gate(ctx: pgqueue.JobContext) -> None:
        # Holds the batch open until the three steps are leased with it.
        with psycopg.connect(dsn, autocommit=True) as other:
            wait_until(
                lambda: (
                    other.execute(
                        "select count(*) from pgqueue.jobs where state = 'running'"
                    ).fetchone()
                    == (4,)
                ),
                timeout=10,
            )

    gate.enqueue(conn)
    ids = step.enqueue_many(conn, [{"name": n} for n in ("a", "hang", "fail")])
    try:
        with running_worker(app, concurrency=4, prefetch=0, tx_batch=4):
            wait_until(lambda: runs["hang"] == 2, timeout=10)
            time.sleep(2.5)  # a's patience (twice 0.3 s and a second) passes
            blocked = conn.execute(
                "select query from pg_stat_activity where wait_event_type = 'Lock'"
                " and datname = current_database() and pid <> pg_backend_pid()"
            ).fetchall()
            release.set()
            wait_until(lambda: finished(conn, ids[:1]), timeout=20)
    finally:
        release.set()
    assert blocked == []
    assert conn.execute(
        "select state::text from pgqueue.finished_jobs where id = %s", [ids[0]]
    ).fetchone() == ("succeeded",)


ENDINGS = pytest.mark.parametrize("ending", ["commit", "rollback", "close", "with"])


def _end_sync(conn: Conn, ending: str) -> None:
    if ending == "with":
        with conn:  # psycopg commits and closes on the way out
            pass
    else:
        getattr(conn, ending)()


async def _end_async(conn: psycopg.AsyncConnection[Any], ending: str) -> None:
    if ending == "with":
        async with conn:
            pass
    else:
        await getattr(conn, ending)()


@KINDS
@ENDINGS
@pytest.mark.parametrize("tx_batch", [1, 16])
def test_a_handler_cannot_end_the_workers_transaction(
    dsn: str, conn: Conn, kind: str, ending: str, tx_batch: int
) -> None:
    """commit(), rollback(), close() and ``with ctx.conn:`` are refused while a
    handler holds the connection: that job fails with nothing of it written,
    and in a batch its mates' writes commit exactly once, with their
    completions (a commit used to commit the mates' writes without them, so
    they ran again and wrote twice; a close failed them)."""
    # No key: a row written twice shows as two rows.
    conn.execute("create table business (job_id bigint, n int)")
    app = pgqueue.App(dsn)
    insert = "insert into business values (%s, %s)"
    misbehaving = 5

    if kind == "sync":

        @app.task(max_attempts=1)
        def record(ctx: pgqueue.JobContext, n: int) -> None:
            ctx.conn.execute(insert, [ctx.job.id, n])
            if n == misbehaving:
                _end_sync(ctx.conn, ending)

    else:

        @app.task(max_attempts=1)
        async def record(ctx: pgqueue.JobContext, n: int) -> None:
            await ctx.conn.execute(insert, [ctx.job.id, n])
            if n == misbehaving:
                await _end_async(ctx.conn, ending)

    ids = record.enqueue_many(conn, [{"n": n} for n in range(12)])
    with running_worker(app, concurrency=16, prefetch=16, tx_batch=tx_batch):
        wait_until(lambda: finished(conn, ids), timeout=60)
    rows = conn.execute(
        "select n, count(*) from business group by n order by n"
    ).fetchall()
    assert rows == [(n, 1) for n in range(12) if n != misbehaving]
    states = conn.execute(
        "select id, state::text, errors -> -1 ->> 'kind'"
        " from pgqueue.finished_jobs order by id"
    ).fetchall()
    assert states == [
        (job_id, "dead", "TransactionOwnedByWorker")
        if n == misbehaving
        else (job_id, "succeeded", None)
        for n, job_id in enumerate(ids)
    ]


@KINDS
def test_shutdown_does_not_wait_for_a_batch_mate_behind_a_completion(
    dsn: str, conn: Conn, kind: str
) -> None:
    """In a batch's careful path a job's fenced completion holds its row lock
    until the batch commits, after the handlers behind it. Handing that job
    back waited for the lock, so a stopping worker waited for the slowest
    handler, past its grace. Now the worker stops within its grace, hands back
    the job still running, and leaves the completing one to its transaction."""
    app = pgqueue.App(dsn)
    runs: collections.Counter[str] = collections.Counter()
    rerun_started, release = threading.Event(), threading.Event()

    def before(name: str) -> float:
        """The handler's sync part; returns how long it should then wait."""
        runs[name] += 1
        if name == "gate":
            # Holds its batch thread until the three others are leased and
            # queued behind it, so that they share the next batch.
            with psycopg.connect(dsn, autocommit=True) as other:
                wait_until(
                    lambda: (
                        other.execute(
                            "select count(*) = 4 from pgqueue.jobs"
                            " where state = 'running'"
                        ).fetchone()
                        == (True,)
                    ),
                    timeout=10,
                )
            return 0.2
        if name == "slow" and runs[name] == 2:  # run again, in the careful path
            rerun_started.set()
            return 30
        if name == "failing":
            raise ValueError("this failure sends the batch down its careful path")
        return 0

    if kind == "sync":

        @app.task(max_attempts=1)
        def step(ctx: pgqueue.JobContext, name: str) -> None:
            wait = before(name)
            if wait == 30:
                release.wait(wait)
            else:
                time.sleep(wait)

    else:

        @app.task(max_attempts=1)
        async def step(ctx: pgqueue.JobContext, name: str) -> None:
            wait = before(name)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not release.is_set():
                await asyncio.sleep(0.01)

    # Leased, and batched, in this order.
    names = ["gate", "completing", "slow", "failing"]
    ids = dict(
        (name, step.options(priority=10 - i).enqueue(conn, name=name))
        for i, name in enumerate(names)
    )
    worker = pgqueue.Worker(
        app,
        concurrency=4,
        prefetch=4,
        tx_batch=4,
        shutdown_grace=1,
        lease_seconds=600,
        handle_signals=False,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert rerun_started.wait(30)
        worker.stop()
        thread.join(20)
        stopped_while_a_mate_ran = not thread.is_alive() and not release.is_set()
    finally:
        worker.stop()
        release.set()
        thread.join(60)
    assert runs == {"gate": 1, "completing": 2, "slow": 2, "failing": 1}
    assert stopped_while_a_mate_ran
    states = dict(
        conn.execute(
            "select id, state::text from pgqueue.jobs union all"
            " select id, state::text from pgqueue.finished_jobs"
        ).fetchall()
    )
    assert states[ids["slow"]] == "queued"  # handed back, for the next worker
    assert states[ids["failing"]] == "dead"
    # Handed back once the worker closed its batch's transaction (or completed
    # by it): not left running until its lease expires.
    assert states[ids["completing"]] in ("queued", "succeeded")
