"""How the worker notices a database that stopped answering.

A connection can die without a word: a failover, a firewall or NAT that
forgets an idle flow, a network partition. The server's side is gone while
the worker's socket stays open, and a statement sent on it waits for an
answer that never comes: nothing is retransmitted once the request was
acknowledged, and no error arrives. A worker stuck so leases nothing,
completes nothing, and does not react to a stop until the second signal.

Two guards, both on by default:

* Every connection the worker opens gets TCP keepalives, a TCP user timeout
  and a connect timeout, unless its DSN (or ``PGCONNECT_TIMEOUT``) sets them:
  the kernel ends a dead connection within about 30 s, idle (the listener's,
  a pooled one, a handler's) or not.
* Each statement the worker sends on its own behalf (lease, completions,
  failures, heartbeat, reap, prune, hand back) has a deadline. Past it the
  worker shuts the socket down, the statement fails as on a lost connection
  (:class:`NoAnswer`), and the usual paths take over: the connection is
  dropped and a new one opened, the write is tried again, the lease loop
  backs off. Shutting the socket down ends the wait at once; cancelling
  the statement instead would first ask the server to cancel it, over a
  network that may be as silent, and then wait for the statement's answer
  (psycopg 3.3 gives up on that after 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Idle 15 s, then a probe every 5 s, 3 unanswered: a dead idle connection is
# closed after about 30 s. Unacknowledged data for 30 s closes it too.
LIVENESS_DEFAULTS: Mapping[str, str] = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",  # ms; libpq 12 and later
}


class NoAnswer(psycopg.OperationalError):
    """The database did not answer one of the worker's statements in time;
    the worker closed that connection (a lost connection, for every retry
    path)."""


def with_liveness_defaults(dsn: str) -> str:
    """``dsn`` with :data:`LIVENESS_DEFAULTS` added where it names none."""
    given = conninfo_to_dict(dsn)
    missing = {k: v for k, v in LIVENESS_DEFAULTS.items() if k not in given}
    if "PGCONNECT_TIMEOUT" in os.environ:
        missing.pop("connect_timeout", None)
    if psycopg.pq.version() < 120000:
        missing.pop("tcp_user_timeout", None)
    return make_conninfo(dsn, **missing) if missing else dsn


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
    raise :class:`NoAnswer` if the database has not answered in ``seconds``.
    """
    loop = asyncio.get_running_loop()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        shut_down(conn)

    timer = loop.call_later(seconds, expire)
    try:
        cur = await conn.execute(query, params, binary=binary)
        return await cur.fetchall() if rows else []
    except psycopg.OperationalError as exc:
        if expired:
            raise NoAnswer(
                f"no answer from the database within {seconds:g} s;"
                " the connection was closed"
            ) from exc
        raise
    finally:
        timer.cancel()
