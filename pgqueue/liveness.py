"""How the worker notices a database that stopped answering.

A connection can die without a word: a failover, a firewall or NAT that
forgets an idle flow, a network partition. The server's side is gone while
the worker's socket stays open, and a statement sent on it waits for an
answer that never comes: nothing is retransmitted once the request was
acknowledged, and no error arrives. A worker stuck so leases nothing,
completes nothing, and does not react to a stop until the second signal.

Two guards, both on by default:

* Every connection the worker opens gets TCP keepalives and a connect
  timeout, unless its DSN (or ``PGCONNECT_TIMEOUT``) sets them: the kernel
  ends a dead idle connection (the listener's, a pooled one, a handler's
  between two statements) within about 30 s. No TCP user timeout: it would
  also end a healthy connection whose server stops reading for that long (a
  handler's COPY into a locked table).
* Each statement the worker sends on its own behalf (lease, completions,
  failures, heartbeat, reap, prune, hand back) has a deadline. Halfway to
  it the worker asks the server to cancel the statement (a request on a
  connection of its own); at the deadline, if the statement has not ended,
  it shuts the socket down. Either way the statement fails as on a lost
  connection (:class:`NoAnswer`), the connection is closed, and the usual
  paths take over: a new connection, the write tried again, the lease loop
  backing off. The cancel comes first
  because a statement that is only held up (a lease waiting behind a
  migration's lock) would otherwise still run once the lock is free, and
  lease jobs nobody hears of: they would wait out their lease and be reaped,
  an attempt counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Idle 15 s, then a probe every 5 s, 3 unanswered: a dead idle connection is
# closed after about 30 s.
LIVENESS_DEFAULTS: Mapping[str, str] = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


class NoAnswer(psycopg.OperationalError):
    """The database did not answer one of the worker's statements in time;
    the worker closed that connection (a lost connection, for every retry
    path). ``cancelled``: the server answered that it cancelled the statement
    (alive, only slow; nothing of the statement was kept)."""

    cancelled: bool = False


def with_liveness_defaults(dsn: str) -> str:
    """``dsn`` with :data:`LIVENESS_DEFAULTS` added where it names none.

    Nothing is added to a DSN that names a service (or with ``PGSERVICE``
    set): what the service file says would not be known, and a value given
    here would override it.
    """
    given = conninfo_to_dict(dsn)
    if "service" in given or "PGSERVICE" in os.environ:
        return dsn
    missing = {k: v for k, v in LIVENESS_DEFAULTS.items() if k not in given}
    if "PGCONNECT_TIMEOUT" in os.environ:
        missing.pop("connect_timeout", None)
    return make_conninfo(dsn, **missing) if missing else dsn


RECHECK = 0.5  # seconds: see fetch_within


def _readable(conn: psycopg.AsyncConnection[Any]) -> bool:
    """True if the connection's socket has bytes waiting to be read."""
    try:
        poller = select.poll()  # select.select refuses descriptors over 1023
        poller.register(conn.pgconn.socket, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return False


def shut_down(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut the connection's socket down in both directions: whatever waits
    on it wakes with end-of-file, and the connection is broken. Through a
    duplicate of the descriptor, which alone is closed: the connection's own
    stays valid until psycopg closes it."""
    with contextlib.suppress(OSError, psycopg.Error):
        dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


async def fetch_within(
    conn: psycopg.AsyncConnection[Any],
    seconds: float,
    query: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    binary: bool = False,
    rows: bool = True,
) -> list[tuple[Any, ...]]:
    """Run ``query`` and return its rows (none if ``rows`` is False), or
    raise :class:`NoAnswer` if the database has not answered in ``seconds``:
    half of them in, the statement is cancelled; at their end, if it has not
    ended, the socket is shut down.

    The deadline is not kept to the letter when an answer is arriving as it
    passes (the socket has bytes to read: after an event loop that was held
    up, say); it is then looked at again a moment later.
    """
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []  # the one armed now
    ending: list[asyncio.Task[None]] = []  # cancel, then shut down
    half = seconds / 2

    def expire() -> None:
        if _readable(conn):
            timer[0] = loop.call_later(min(half, RECHECK), expire)
            return
        ending.append(loop.create_task(_cancel_then_shut(conn, half)))

    timer.append(loop.call_later(half, expire))
    try:
        cur = await conn.execute(query, params, binary=binary)
        return await cur.fetchall() if rows else []
    except psycopg.OperationalError as exc:
        if ending:
            cancelled = isinstance(exc, psycopg.errors.QueryCanceled)
            error = NoAnswer(
                f"no answer from the database within {seconds:g} s; "
                + (
                    "the statement was cancelled and the connection closed"
                    if cancelled
                    else "the connection was closed"
                )
            )
            error.cancelled = cancelled
            raise error from exc
        raise
    finally:
        timer[0].cancel()
        if ending:
            # Whatever the outcome (the cancelled statement's error, an answer
            # as the deadline ran out, the caller cancelled), a cancel request
            # may still be on its way and hit the next statement: this
            # connection is done.
            await _close(conn, ending)


async def _cancel_then_shut(conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
    """Ask the server to cancel the statement, and shut the socket down if it
    has not ended ``seconds`` later."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.cancel_safe(timeout=seconds), seconds)
    await asyncio.sleep(max(0.0, until - loop.time()))
    shut_down(conn)


async def _close(
    conn: psycopg.AsyncConnection[Any], ending: list[asyncio.Task[None]]
) -> None:
    # Closed first: a second cancel of the caller during the wait below must
    # not leave it open (a pooled one would go back to the pool).
    with contextlib.suppress(Exception):
        await conn.close()
    ending[0].cancel()
    await asyncio.wait(ending)
