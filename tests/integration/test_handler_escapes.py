"""Handlers that let out exceptions the event loop treats specially.

``CancelledError`` and ``StopIteration`` mean something to asyncio: a stray
one must fail its own job, like any other exception, and leave the worker
running the jobs after it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

import pgqueue

from .worker_helpers import reap_now, run_until_empty, running_worker, wait_until

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


# -- found by review: each failed (hung, killed the worker, or lost a job) before


def test_two_attempts_of_one_job_done_at_once_do_not_stop_the_completions(
    dsn: str, conn: Conn
) -> None:
    """Attempt 1 loses its lease and is reaped; this worker leases attempt 2;
    both finish in the same turn. One completion statement holding the job
    twice used to fail for ever (a duplicate history row) and hold up every
    completion after it."""
    app = pgqueue.App(dsn)
    started = threading.Event()
    first: dict[str, asyncio.Event] = {}

    @app.task(transactional=False, max_attempts=5)
    async def slow(ctx: pgqueue.JobContext) -> int:
        if ctx.attempt == 1:
            first["event"] = asyncio.Event()
            started.set()
            await first["event"].wait()
            return 1
        first["event"].set()
        return 2

    @app.task(transactional=False)
    async def fine(ctx: pgqueue.JobContext) -> int:
        await asyncio.sleep(0)
        return 1

    job_id = slow.enqueue(conn)
    with running_worker(app, concurrency=2, lease_seconds=600, poll_interval=0.05):
        assert started.wait(10)
        reap_now(dsn, job_id, due_now=True)
        fine.enqueue_many(conn, [{}] * 3)
        wait_until(lambda: all_finished(conn), timeout=10)
    assert [row[:3] for row in outcomes(conn)] == [
        ("slow", "succeeded", 1),
        ("fine", "succeeded", 0),
        ("fine", "succeeded", 0),
        ("fine", "succeeded", 0),
    ]


@pytest.mark.parametrize("tx_batch", [0, 1, 8], ids=["plain", "tx", "tx-batch"])
def test_a_result_utf8_cannot_encode_fails_that_job_only(
    dsn: str, conn: Conn, tx_batch: int
) -> None:
    """A lone surrogate in a result (os.listdir's spelling of a name that is
    not UTF-8) is that job's failure, said clearly; its batch mates and the
    completions after it go through."""
    app = pgqueue.App(dsn)
    transactional = tx_batch > 0

    @app.task(transactional=transactional, max_attempts=1)
    def odd(ctx: pgqueue.JobContext) -> str:
        return "file-\udcff"

    @app.task(transactional=transactional)
    def fine(ctx: pgqueue.JobContext) -> int:
        return 1

    fine.enqueue(conn)
    odd.enqueue(conn)
    fine.enqueue_many(conn, [{}] * 2)
    with running_worker(
        app, concurrency=8, tx_batch=max(tx_batch, 1), lease_seconds=600
    ):
        wait_until(lambda: all_finished(conn), timeout=10)
    assert outcomes(conn) == [
        ("fine", "succeeded", 0, None),
        ("odd", "dead", 1, "ArgumentsNotSerializable"),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
    ]


class Unprintable(Exception):
    def __init__(self, code: int) -> None:
        super().__init__()

    def __str__(self) -> str:
        return f"error {self.code}"  # type: ignore[attr-defined]  # no such attribute


class Fatal(BaseException):
    pass


@pytest.mark.parametrize(
    ("error", "when", "tx_batch"),
    [
        (Unprintable, "at once", 1),
        (Unprintable, "after an await", 1),
        (Fatal, "at once", 1),
        (Fatal, "after an await", 1),
        (SystemExit, "at once", 1),
        (GeneratorExit, "after an await", 1),
        (Fatal, "after an await", 4),
        (SystemExit, "after an await", 4),
        (KeyboardInterrupt, "after an await", 4),
    ],
    ids=[
        "unprintable-at-once",
        "unprintable-after-await",
        "base-exception-at-once",
        "base-exception-after-await",
        "system-exit",
        "generator-exit",
        "base-exception-async-tx-batch",
        "system-exit-async-tx-batch",
        "keyboard-interrupt-async-tx-batch",
    ],
)
def test_any_exception_a_handler_lets_out_fails_its_job_only(
    dsn: str, conn: Conn, error: type[BaseException], when: str, tx_batch: int
) -> None:
    app = pgqueue.App(dsn)
    transactional = tx_batch > 1

    @app.task(transactional=transactional, max_attempts=1)
    async def bad(ctx: pgqueue.JobContext) -> None:
        if when == "after an await":
            await asyncio.sleep(0.01)
        raise error(3)

    @app.task(transactional=transactional)
    async def fine(ctx: pgqueue.JobContext) -> int:
        await asyncio.sleep(0.01)
        return 1

    bad.enqueue(conn)
    with running_worker(
        app, concurrency=1, prefetch=2, tx_batch=tx_batch, lease_seconds=600
    ) as worker:
        wait_until(lambda: worker.counters.failed == 1, timeout=10)
        fine.enqueue_many(conn, [{}] * 3)
        wait_until(lambda: all_finished(conn), timeout=10)
    kind = "HandlerRaisedBaseException" if tx_batch > 1 else error.__name__
    assert outcomes(conn) == [
        ("bad", "dead", 1, kind),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
        ("fine", "succeeded", 0, None),
    ]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
@pytest.mark.parametrize("prefetch", [0, 2], ids=["from-the-lease", "from-a-slot"])
def test_a_handler_runs_in_a_task_of_its_own(
    dsn: str, conn: Conn, prefetch: int
) -> None:
    """asyncio.timeout (and TaskGroup, anyio, httpx) need the handler's own
    Task to be current: started in the lease loop's frame, the handler's
    timeout cancelled the lease loop; started from a slot that freed up, it
    had no Task at all."""
    app = pgqueue.App(dsn)
    tasks: list[asyncio.Task[Any] | None] = []

    @app.task(transactional=False, max_attempts=1)
    async def fetch(ctx: pgqueue.JobContext) -> str:
        tasks.append(asyncio.current_task())
        try:
            async with asyncio.timeout(0.2):
                await asyncio.sleep(2)
        except TimeoutError:
            return "gave up"
        return "slept through its timeout"

    @app.task(transactional=False)
    async def warmup(ctx: pgqueue.JobContext) -> int:
        await asyncio.sleep(0.05)
        return 1

    if prefetch:
        warmup.enqueue(conn)
    fetch.enqueue_many(conn, [{}] * 2)
    with running_worker(app, concurrency=1, prefetch=prefetch, lease_seconds=600):
        wait_until(lambda: all_finished(conn), timeout=10)
    assert [row[1:] for row in outcomes(conn) if row[0] == "fetch"] == [
        ("succeeded", 0, None),
        ("succeeded", 0, None),
    ]
    assert conn.execute(
        "select array_agg(result::text) from pgqueue.finished_jobs where task = 'fetch'"
    ).fetchone() == (['"gave up"', '"gave up"'],)
    assert len(set(map(id, tasks))) == 2 and None not in tasks


@pytest.mark.parametrize(
    "args_sql",
    [
        "('{\"a\": ' || repeat('[', 3000) || repeat(']', 3000) || '}')::jsonb",
        "('{\"n\": 1' || repeat('0', 5000) || '}')::jsonb",
    ],
    ids=["nested-3000-deep", "integer-of-5000-digits"],
)
def test_args_python_cannot_read_fail_that_job_only(
    dsn: str, conn: Conn, args_sql: str
) -> None:
    app = pgqueue.App(dsn)

    @app.task(transactional=False, max_attempts=1)
    async def takes(ctx: pgqueue.JobContext, **kwargs: Any) -> None:
        return None

    @app.task(transactional=False)
    async def fine(ctx: pgqueue.JobContext) -> int:
        return 1

    fine.enqueue(conn)
    conn.execute(f"select pgqueue.enqueue('takes', {args_sql}, p_max_attempts => 1)")
    fine.enqueue(conn)
    with running_worker(app, concurrency=4, lease_seconds=600):
        wait_until(lambda: all_finished(conn), timeout=10)
    assert outcomes(conn) == [
        ("fine", "succeeded", 0, None),
        ("takes", "dead", 1, "ArgumentsNotSerializable"),
        ("fine", "succeeded", 0, None),
    ]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_handler_that_ends_the_workers_transaction_fails(
    dsn: str, conn: Conn, is_async: bool
) -> None:
    """A ROLLBACK sent as SQL (ctx.conn.rollback() is refused, see
    test_txbatch.py) took its write away: the job must not be recorded as
    succeeded (a transaction batch already said so)."""
    conn.execute("create table effects (id int)")
    app = pgqueue.App(dsn)
    if is_async:

        @app.task(max_attempts=1)
        async def writes(ctx: pgqueue.JobContext) -> int:
            assert ctx.conn is not None
            await ctx.conn.execute("insert into effects values (1)")
            await ctx.conn.execute("rollback")
            return 1

    else:

        @app.task(max_attempts=1)
        def writes(ctx: pgqueue.JobContext) -> int:
            assert ctx.conn is not None
            ctx.conn.execute("insert into effects values (1)")
            ctx.conn.execute("rollback")
            return 1

    writes.enqueue(conn)
    with running_worker(app, concurrency=4, lease_seconds=600):
        wait_until(lambda: all_finished(conn), timeout=10)
    assert outcomes(conn) == [("writes", "dead", 1, "HandlerLeftTransactionAborted")]


def test_a_failure_is_written_while_completions_keep_coming(
    dsn: str, conn: Conn
) -> None:
    """Failures used to wait until no completion was pending: one failing job
    ahead of a long drain was recorded near its end."""
    app = pgqueue.App(dsn)

    @app.task(transactional=False, max_attempts=1)
    async def fails(ctx: pgqueue.JobContext) -> None:
        raise RuntimeError("down")

    @app.task(transactional=False)
    async def quick(ctx: pgqueue.JobContext) -> None:
        return None

    fails.enqueue(conn)
    with conn.transaction():
        quick.enqueue_many(conn, [{}] * 20_000)
    with running_worker(app, concurrency=50, prefetch=50, lease_seconds=600):
        wait_until(lambda: all_finished(conn), timeout=60)
    before = conn.execute(
        "select count(*) from pgqueue.finished_jobs q, pgqueue.finished_jobs f"
        " where f.task = 'fails' and q.task = 'quick'"
        " and q.finished_at < f.finished_at"
    ).fetchone()
    assert before is not None and before[0] < 10_000


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("how", ["with_block_raises", "rollback"])
def test_a_handler_that_catches_the_refusal_fails_all_the_same(
    dsn: str, conn: Conn, is_async: bool, how: str
) -> None:
    """A handler that catches the refused rollback, or the error that ends its
    ``with ctx.conn:`` block, believes its write was rolled back: the job fails
    and the write does not commit (it did, with the completion, when only the
    block's own error was let through)."""
    conn.execute("create table effects (id int)")
    app = pgqueue.App(dsn)
    insert = "insert into effects values (1)"
    if is_async:

        @app.task(max_attempts=1)
        async def writes(ctx: pgqueue.JobContext) -> None:
            assert ctx.conn is not None
            try:
                if how == "rollback":
                    await ctx.conn.execute(insert)
                    await ctx.conn.rollback()
                else:
                    async with ctx.conn:
                        await ctx.conn.execute(insert)
                        raise LookupError("abort this block")
            except Exception:
                pass

    else:

        @app.task(max_attempts=1)
        def writes(ctx: pgqueue.JobContext) -> None:
            assert ctx.conn is not None
            try:
                if how == "rollback":
                    ctx.conn.execute(insert)
                    ctx.conn.rollback()
                else:
                    with ctx.conn:
                        ctx.conn.execute(insert)
                        raise LookupError("abort this block")
            except Exception:
                pass

    writes.enqueue(conn)
    with running_worker(app, concurrency=4):
        wait_until(lambda: all_finished(conn), timeout=10)
    assert outcomes(conn) == [("writes", "dead", 1, "TransactionOwnedByWorker")]
    assert conn.execute("select count(*) from effects").fetchone() == (0,)
