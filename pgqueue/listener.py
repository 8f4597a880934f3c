"""A dedicated LISTEN connection that wakes the worker, and reconnects.

While the connection is down the worker keeps serving by polling, so a lost
notification delays a job by at most one poll interval. Through a pooler in
transaction mode, where LISTEN does not work, run with ``listen=False``.

A LISTEN connection that went silent (pgqueue/liveness.py) would wait for
notifications forever: every CHECK_EVERY seconds the listener asks the server
something, with a deadline, and reconnects when no answer comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import psycopg
from psycopg import sql

from pgqueue.liveness import fetch_within
from pgqueue.log import get_logger

# Seconds between two looks at the LISTEN connection. Notifications that
# arrive meanwhile wait in psycopg's backlog (3.2.4 and later) for the next
# notifies() call.
CHECK_EVERY = 10.0
# pause_queue's payload (0024) before the queue's name: a space, which no
# queue name holds.
PAUSED = "paused "


class Listener:
    """LISTEN on the schema's channel; call ``on_wake`` for our queues, and
    ``on_pause`` with the name of one of them that was paused."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        queues: Collection[str],
        on_wake: Callable[[], None],
        *,
        on_pause: Callable[[str], None] | None = None,
        log: Any = None,
        db_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._queues = frozenset(queues)
        self._on_wake = on_wake
        self._on_pause = on_pause
        self._log = log or get_logger()
        self._db_timeout = db_timeout
        self.connected = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff when the link drops."""
        backoff = 0.05
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, application_name="pgqueue-listener"
                ) as conn:
                    self._conn = conn
                    listen = sql.SQL("listen {}").format(sql.Identifier(self._channel))
                    await fetch_within(
                        conn, self._db_timeout, listen.as_string(conn), rows=False
                    )
                    self.connected.set()
                    backoff = 0.05
                    self._log.debug("listener_connected")
                    # We may have missed notifications while down: look once.
                    self._on_wake()
                    while True:
                        async for note in conn.notifies(timeout=CHECK_EVERY):
                            self._received(note.payload)
                        # Still there? A connection gone silent never says.
                        await fetch_within(
                            conn, self._db_timeout, "select 1", rows=False
                        )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                self._log.warning(
                    "listener_disconnected", error=repr(exc), retry_in_s=backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self._conn = None

    def _received(self, payload: str) -> None:
        if payload in self._queues:
            self._on_wake()
        elif self._on_pause is not None and payload.startswith(PAUSED):
            queue = payload[len(PAUSED) :]
            if queue in self._queues:
                self._on_pause(queue)
