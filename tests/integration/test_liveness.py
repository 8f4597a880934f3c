"""A worker whose connections go silent (no answer, no error) carries on."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue.errors import ConfigurationError
from pgqueue.liveness import LIVENESS_DEFAULTS, with_liveness_defaults

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


def succeeded(conn: Conn, job_id: int) -> bool:
    row = conn.execute(
        "select state::text from pgqueue.jobs_overview where id = %s", [job_id]
    ).fetchone()
    return row is not None and row[0] == "succeeded"


def test_worker_replaces_connections_that_went_silent(
    proxy: SilentProxy, conn: Conn
) -> None:
    app = pgqueue.App(proxy.dsn())
    ran: list[int] = []

    @app.task(transactional=False)
    def note(ctx: pgqueue.JobContext) -> None:
        ran.append(ctx.job.id)

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


def keepalive_options(conn: Conn) -> tuple[int, int, int]:
    """TCP keepalive idle, interval and user timeout of the connection's socket."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return (
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )
    finally:
        sock.close()


@pytest.mark.skipif(
    not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options"
)
def test_worker_connections_get_keepalives_unless_the_dsn_sets_its_own(
    proxy: SilentProxy,
) -> None:
    # Through the proxy: TCP, whatever the test server's own DSN is.
    with psycopg.connect(with_liveness_defaults(proxy.dsn())) as conn:
        assert keepalive_options(conn) == (
            int(LIVENESS_DEFAULTS["keepalives_idle"]),
            int(LIVENESS_DEFAULTS["keepalives_interval"]),
            int(LIVENESS_DEFAULTS["tcp_user_timeout"]),
        )
    own = psycopg.conninfo.make_conninfo(proxy.dsn(), keepalives_idle=120)
    with psycopg.connect(with_liveness_defaults(own)) as conn:
        assert keepalive_options(conn)[0] == 120


def test_db_timeout_must_be_positive(dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="db_timeout"):
        pgqueue.Worker(pgqueue.App(dsn), db_timeout=0)
