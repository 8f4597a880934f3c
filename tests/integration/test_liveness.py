"""A worker whose connections go silent (no answer, no error) carries on."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog.testing

import pgqueue
from pgqueue.errors import ConfigurationError
from pgqueue.liveness import (
    LIVENESS_DEFAULTS,
    NoAnswer,
    fetch_within,
    with_liveness_defaults,
)

from ..proxy import SilentProxy
from .worker_helpers import running_worker, wait_until

Conn = psycopg.Connection[Any]


@pytest.fixture
def proxy(dsn: str) -> Iterator[SilentProxy]:
    silent = SilentProxy(dsn).start()
    try:
        yield silent
    finally:
        silent.close()


def recording_app(dsn: str) -> tuple[pgqueue.App, pgqueue.Task, list[int]]:
    """An app with one non-transactional task that notes the ids it ran."""
    app = pgqueue.App(dsn)
    ran: list[int] = []

    @app.task(transactional=False)
    def note(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

    return app, note, ran


def succeeded(conn: Conn, job_id: int) -> bool:
    row = conn.execute(
        "select state::text from pgqueue.jobs_overview where id = %s", [job_id]
    ).fetchone()
    return row is not None and row[0] == "succeeded"


def test_worker_replaces_connections_that_went_silent(
    proxy: SilentProxy, conn: Conn
) -> None:
    app, note, ran = recording_app(proxy.dsn())
    with running_worker(app, db_timeout=1.0, poll_interval=0.2) as worker:
        first = note.enqueue(conn)
        wait_until(lambda: succeeded(conn, first))
        opened = proxy.connections
        # Lease, listener and pooled connections: all silent from now on.
        proxy.freeze()
        second = note.enqueue(conn)
        # The lease on the silent connection gets no answer; after db_timeout
        # the worker opens another, leases the job, runs it, and writes its
        # completion (a pooled connection that also went silent is replaced).
        wait_until(lambda: succeeded(conn, second), timeout=30)
        assert proxy.connections > opened
        assert worker.counters.succeeded == 2
    assert ran == [first, second]


def test_worker_stops_promptly_while_its_lease_gets_no_answer(
    proxy: SilentProxy, conn: Conn
) -> None:
    app = pgqueue.App(proxy.dsn())

    @app.task(transactional=False)
    def idle(ctx: pgqueue.JobContext) -> None:
        pass

    with running_worker(app, db_timeout=1.0, poll_interval=0.2, shutdown_grace=1):
        job = idle.enqueue(conn)
        wait_until(lambda: succeeded(conn, job))
        proxy.freeze()
        # running_worker stops the worker on exit and fails if it has not
        # stopped within a minute: its polls hang on the silent connection
        # without the deadline.


def keepalive_options(conn: Conn) -> tuple[int, int, int, int]:
    """SO_KEEPALIVE, and the TCP keepalive idle, interval and count of the
    connection's socket."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        )
    finally:
        sock.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux socket options")
def test_worker_connections_get_keepalives_unless_the_dsn_sets_its_own(
    proxy: SilentProxy,
) -> None:
    # Through the proxy: TCP, whatever the test server's own DSN is.
    with psycopg.connect(with_liveness_defaults(proxy.dsn())) as conn:
        assert keepalive_options(conn) == (
            1,
            int(LIVENESS_DEFAULTS["keepalives_idle"]),
            int(LIVENESS_DEFAULTS["keepalives_interval"]),
            int(LIVENESS_DEFAULTS["keepalives_count"]),
        )
    own = psycopg.conninfo.make_conninfo(proxy.dsn(), keepalives_idle=120)
    with psycopg.connect(with_liveness_defaults(own)) as conn:
        assert keepalive_options(conn)[:3] == (1, 120, 5)


def test_a_dsn_naming_a_service_is_left_as_it_is() -> None:
    # The service file's settings are not known here: none is overridden.
    assert with_liveness_defaults("service=shop") == "service=shop"


def test_db_timeout_must_be_positive(dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="db_timeout"):
        pgqueue.Worker(pgqueue.App(dsn), db_timeout=0)


def test_heartbeat_renews_completions_whose_statement_got_no_answer(
    proxy: SilentProxy, conn: Conn
) -> None:
    app, once, ran = recording_app(proxy.dsn())
    # Leases of 1.5 s, renewed every 0.5 s; the completion statement is lost
    # on the way and waits 4 s for its deadline before it is sent again.
    # Without the heartbeat renewing it meanwhile, the lease ran out, the
    # worker's own reaper put the job back, and it ran a second time.
    proxy.freeze_when(b"complete_waiting(")
    with running_worker(app, lease_seconds=1.5, db_timeout=4.0) as worker:
        job = once.enqueue(conn)
        wait_until(lambda: succeeded(conn, job), timeout=30)
        assert worker.counters.heartbeats >= 4  # renewed while it waited
    assert ran == [job]
    attempts = conn.execute(
        "select attempts, errors from pgqueue.jobs_overview where id = %s", [job]
    ).fetchone()
    assert attempts == (0, [])  # no attempt lost


def test_an_answer_that_arrived_while_the_loop_was_held_up_is_taken(dsn: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

            async def hold_up() -> None:
                await asyncio.sleep(0.05)  # the statement is on its way
                # Holds the loop up past the deadline; the answer arrives meanwhile.
                time.sleep(0.6)  # noqa: ASYNC251

            holder = asyncio.ensure_future(hold_up())
            rows = await fetch_within(conn, 0.3, "select 1 from pg_sleep(0.1)")
            await holder
            assert rows == [(1,)]
            # Not taken for dead: the connection goes on serving.
            assert not conn.closed and not conn.broken
            cur = await conn.execute("select 2")
            assert await cur.fetchall() == [(2,)]

    asyncio.run(main())


def test_a_statement_without_an_answer_fails_as_a_lost_connection(
    proxy: SilentProxy,
) -> None:
    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(NoAnswer, match=r"within 0\.5 s"):
            await fetch_within(conn, 0.5, "select 1")
        assert time.monotonic() - started < 5
        assert conn.broken
        await conn.close()

    asyncio.run(main())


def test_leases_outlive_a_heartbeat_that_got_no_answer(
    proxy: SilentProxy, conn: Conn
) -> None:
    app = pgqueue.App(proxy.dsn())
    ran: list[int] = []

    @app.task(transactional=False)
    def long(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)
        time.sleep(8)

    # Leases of 6 s, renewed every 2 s; the default deadline is a third of the
    # lease. The heartbeat after the freeze waits 2 s for nothing, and is
    # tried again at once on a new connection: the lease never runs out. (A
    # deadline as long as the lease, and the next try a whole interval
    # later, let it run out: reaped, run again, the first result lost.)
    with running_worker(app, lease_seconds=6) as worker:
        job = long.enqueue(conn)
        wait_until(lambda: ran)
        proxy.freeze()
        # Reaping as the other workers of a fleet would, on a connection of
        # their own.
        wait_until(
            lambda: succeeded(conn, job),
            timeout=30,
            during=lambda: conn.execute("select pgqueue.reap()"),
        )
        assert worker.counters.heartbeats >= 2
    assert ran == [job]
    row = conn.execute(
        "select attempts, errors from pgqueue.jobs_overview where id = %s", [job]
    ).fetchone()
    assert row == (0, [])


def test_a_completion_whose_answer_was_lost_is_not_called_a_lost_lease(
    proxy: SilentProxy, conn: Conn
) -> None:
    app = pgqueue.App(proxy.dsn())

    @app.task(transactional=False)
    def once(ctx: pgqueue.JobContext) -> None:
        pass

    # The completion reaches the server and commits; its answer is lost. The
    # write is sent again after the deadline and finds the job gone: that
    # proves nothing about the lease.
    proxy.freeze_when(b"complete_waiting(", deliver=True)
    with (
        structlog.testing.capture_logs() as logs,
        running_worker(app, db_timeout=1.0) as worker,
    ):
        job = once.enqueue(conn)
        wait_until(lambda: succeeded(conn, job))
        wait_until(
            lambda: any(e["event"] == "job_completion_unconfirmed" for e in logs),
            timeout=10,
        )
        assert worker.counters.lease_lost == 0
        assert worker.counters.unconfirmed == 1
        assert worker.counters.succeeded == 0
    assert not [e for e in logs if e["event"] == "job_lease_lost"]
    [stopped] = [e for e in logs if e["event"] == "worker_stopped"]
    assert (stopped["succeeded"], stopped["unconfirmed"]) == (0, 1)


def test_a_completion_written_alone_whose_answer_was_lost_is_unconfirmed(
    proxy: SilentProxy, conn: Conn
) -> None:
    """A batch the database refuses is written again one completion at a time.
    One of those writes commits and loses its answer: it was counted as a
    refusal, and its next write, finding the job gone, reported a lost lease.
    It is unconfirmed, as after a batch write that lost its answer."""
    # Every completion batch of two jobs or more is refused; one alone is not.
    conn.execute(
        "create function refuse_batches() returns trigger language plpgsql as $$"
        " begin if (select count(*) from fresh) > 1 then"
        " raise exception 'no batches here'; end if; return null; end $$"
    )
    conn.execute(
        "create trigger refuse_batches after insert on pgqueue.finished_jobs"
        " referencing new table as fresh for each statement"
        " execute function refuse_batches()"
    )
    app = pgqueue.App(proxy.dsn())
    together = asyncio.Barrier(2) if hasattr(asyncio, "Barrier") else None
    if together is None:
        pytest.skip("asyncio.Barrier is 3.11+")

    @app.task(transactional=False)
    async def pair(ctx: pgqueue.JobContext) -> None:
        await together.wait()  # both end at once: one completion batch

    first, second = pair.enqueue_many(conn, [{}, {}])
    proxy.freeze_when(f"{{{second}}}".encode(), deliver=True)
    with (
        structlog.testing.capture_logs() as logs,
        running_worker(app, concurrency=2, db_timeout=1.0) as worker,
    ):
        wait_until(lambda: succeeded(conn, first) and succeeded(conn, second))
        wait_until(lambda: worker.counters.unconfirmed == 1, timeout=10)
        assert worker.counters.lease_lost == 0
    refused = [e for e in logs if e["event"] == "complete_failed"]
    assert refused and refused[0]["jobs"] == 2  # the batch was refused
    assert not [
        e for e in logs if e["event"] in ("job_lease_lost", "complete_given_up")
    ]


def test_a_listen_connection_that_went_silent_is_replaced(
    proxy: SilentProxy, conn: Conn
) -> None:
    app, note, ran = recording_app(proxy.dsn())
    # Polling every minute: only a NOTIFY wakes this worker in time. After
    # the freeze its LISTEN connection hears nothing more; its next look
    # (listener.CHECK_EVERY) gets no answer, it reconnects and wakes the
    # worker, whose lease connection, silent too, is replaced in turn.
    with running_worker(app, db_timeout=1.0, poll_interval=60):
        first = note.enqueue(conn)
        wait_until(lambda: succeeded(conn, first))
        proxy.freeze()
        second = note.enqueue(conn)
        wait_until(lambda: succeeded(conn, second), timeout=30)
    assert ran == [first, second]


def test_a_lease_held_up_behind_a_lock_is_cancelled_not_left_to_lease_later(
    dsn: str, conn: Conn
) -> None:
    app, once, ran = recording_app(dsn)
    job = once.enqueue(conn)
    # A migration, say, holds the jobs table for 3 s: each lease waits behind
    # it past the worker's deadline. Cancelled, it leases nothing; abandoned
    # (the socket shut only), it would run once the lock was free, lease the
    # job for nobody, and the job would wait out its lease (30 s) and be
    # reaped with an attempt counted.
    with psycopg.connect(dsn) as migration:
        migration.execute("lock table pgqueue.jobs in access exclusive mode")
        with running_worker(app, db_timeout=1.0):
            time.sleep(3)
            migration.rollback()
            wait_until(lambda: succeeded(conn, job), timeout=15)
    assert ran == [job]
    row = conn.execute(
        "select attempts, errors from pgqueue.jobs_overview where id = %s", [job]
    ).fetchone()
    assert row == (0, [])


@pytest.mark.parametrize("tx_batch", [1, 4], ids=["one-per-transaction", "tx-batch"])
def test_transactional_jobs_complete_where_the_default_isolation_is_stricter(
    dsn: str, conn: Conn, tx_batch: int
) -> None:
    dbname = conn.info.dbname
    conn.execute(
        f"alter database {dbname} set default_transaction_isolation = 'repeatable read'"
    )
    conn.execute("create table business (job_id bigint)")
    app = pgqueue.App(dsn)

    @app.task
    def slow(ctx: pgqueue.JobContext) -> None:
        ctx.conn.execute("insert into business values (%s)", [ctx.job.id])
        time.sleep(1.2)  # past a heartbeat, which updates the job's row

    @app.task
    async def slow_async(ctx: pgqueue.JobContext) -> None:
        await ctx.conn.execute("insert into business values (%s)", [ctx.job.id])
        await asyncio.sleep(1.2)

    jobs = [slow.enqueue(conn), slow_async.enqueue(conn)]
    # Leases of 1.5 s: a heartbeat every 0.5 s. At REPEATABLE READ, the
    # completion's DELETE met the heartbeat's newer row version: could not
    # serialize access, and the job failed every attempt.
    with running_worker(app, lease_seconds=1.5, tx_batch=tx_batch):
        wait_until(lambda: all(succeeded(conn, job) for job in jobs), timeout=30)
    rows = conn.execute(
        "select attempts, errors from pgqueue.jobs_overview where id = any(%s)", [jobs]
    ).fetchall()
    assert rows == [(0, []), (0, [])]
    assert conn.execute("select count(*) from business").fetchone() == (2,)


def test_a_failure_whose_answer_was_lost_is_not_called_a_lost_lease(
    proxy: SilentProxy, conn: Conn
) -> None:
    app = pgqueue.App(proxy.dsn())

    @app.task(transactional=False, max_attempts=1)
    def broken(ctx: pgqueue.JobContext) -> None:
        raise RuntimeError("no")

    # The failure reaches the server and commits (the job is dead); its answer
    # is lost, and the write sent again after the deadline finds no lease.
    proxy.freeze_when(b"fail_many_waiting(", deliver=True)
    with (
        structlog.testing.capture_logs() as logs,
        running_worker(app, db_timeout=1.0) as worker,
    ):
        job = broken.enqueue(conn)
        wait_until(
            lambda: any(e["event"] == "job_failure_unconfirmed" for e in logs),
            timeout=15,
        )
        assert worker.counters.lease_lost == 0
        assert worker.counters.unconfirmed == 1
        assert worker.counters.failed == 0
    assert not [e for e in logs if e["event"] == "job_lease_lost"]
    row = conn.execute(
        "select state::text from pgqueue.jobs_overview where id = %s", [job]
    ).fetchone()
    assert row == ("dead",)


def test_a_completion_batch_too_slow_for_the_deadline_is_split(
    dsn: str, conn: Conn
) -> None:
    # 20 ms a history row (a trigger of the user's, a loaded server): a batch
    # of 50 or more outlasts the half of the 2 s deadline at which the
    # statement is cancelled. Retried whole, it was cancelled again and again;
    # halved after each cancel, it goes through.
    conn.execute(
        "create function slow_row() returns trigger language plpgsql as $$"
        " begin perform pg_sleep(0.02); return null; end $$"
    )
    conn.execute(
        "create trigger slow_row after insert on pgqueue.finished_jobs"
        " for each row execute function slow_row()"
    )
    app, note, ran = recording_app(dsn)
    jobs = note.enqueue_many(conn, [{}] * 150)
    with running_worker(app, concurrency=150, db_timeout=2.0):
        wait_until(lambda: all(succeeded(conn, job) for job in jobs), timeout=60)
    assert sorted(ran) == sorted(jobs)
