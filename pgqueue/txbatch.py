"""Several transactional jobs in one transaction, each in its own savepoint.

Opt-in (``Worker(tx_batch=N)``, ``pgqueue worker --tx-batch N``) for sync
transactional tasks. Each handler thread keeps a transaction open while more
jobs are waiting (up to N jobs or ``max_seconds``): every job runs inside a
savepoint, and its fenced completion is pipelined with the savepoint's
release, so a job that fails or lost its lease rolls back only its own writes.
One COMMIT then makes every job's writes and completion durable together:
guarantees are the same as one job per transaction (a job's effect commits
exactly once, with its completion), but the commit, its fsync and the BEGIN
are shared.

The price: a job's completion commits with the batch, so a handler that runs
long delays the commit of the jobs before it in the same batch (at most
``max_seconds`` of short jobs precede it). Keep it off for long handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from pgqueue.errors import JobTimeout


@dataclass(eq=False, slots=True)
class BatchItem:
    """One job handed to a batching thread."""

    # Runs the handler and its fenced completion in the open savepoint, then
    # starts the next savepoint; returns the result's JSON.
    run: Callable[[psycopg.Connection[Any]], str | None]
    is_dropped: Callable[[], bool]  # timed out or handed back before it started
    future: asyncio.Future[str | None]
    loop: asyncio.AbstractEventLoop


class _Broken(Exception):
    """The connection failed: the whole open transaction is gone."""


def _settle(
    future: asyncio.Future[str | None], payload: str | None, error: BaseException | None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(payload)


class TxBatcher:
    """Threads that each run jobs in shared transactions, one savepoint a job."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        threads: int,
        max_jobs: int,
        max_seconds: float = 0.05,
    ) -> None:
        self._connect = connect
        self._max_jobs = max_jobs
        self._max_seconds = max_seconds
        self._queue: queue.SimpleQueue[BatchItem | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._main, name=f"pgqueue-tx-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: BatchItem) -> None:
        """Queue a job; a free thread runs it, possibly in an open batch."""
        self._queue.put(item)

    def stop(self) -> None:
        """Let each thread finish its batch and exit (does not wait)."""
        for _ in self._threads:
            self._queue.put(None)

    def _main(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self._connect()
                self._batch(conn, item)
            except BaseException as exc:
                # Only connection failures get here; the items were settled.
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                if not isinstance(exc, (_Broken, psycopg.Error)):
                    raise
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _next(self) -> BatchItem | None:
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is None:  # a stop request: leave it for the loop
            self._queue.put(None)
        return item

    def _batch(self, conn: psycopg.Connection[Any], first: BatchItem) -> None:
        pending: list[tuple[BatchItem, str | None]] = []
        item: BatchItem | None = first
        try:
            with conn.pipeline():
                conn.execute("begin")
                conn.execute("savepoint job")
        except psycopg.Error as exc:
            first.loop.call_soon_threadsafe(_settle, first.future, None, exc)
            raise _Broken() from exc
        started = time.monotonic()
        count = 0
        try:
            while item is not None:
                count += 1
                payload, error = self._one(conn, item)
                if error is None:
                    pending.append((item, payload))
                else:
                    item.loop.call_soon_threadsafe(_settle, item.future, None, error)
                if (
                    count >= self._max_jobs
                    or time.monotonic() - started > self._max_seconds
                ):
                    break
                item = self._next()
            conn.execute("commit")
        except BaseException as exc:
            for done, _ in pending:
                done.loop.call_soon_threadsafe(_settle, done.future, None, exc)
            if item is not None and all(item is not p for p, _ in pending):
                item.loop.call_soon_threadsafe(_settle, item.future, None, exc)
            raise _Broken() from exc
        for done, payload in pending:
            done.loop.call_soon_threadsafe(_settle, done.future, payload, None)

    def _one(
        self, conn: psycopg.Connection[Any], item: BatchItem
    ) -> tuple[str | None, BaseException | None]:
        """Run one job in the open savepoint; roll back only its own writes."""
        if item.is_dropped():
            return None, JobTimeout("the attempt was abandoned before it started")
        try:
            return item.run(conn), None
        except BaseException as exc:
            try:
                conn.execute("rollback to savepoint job")
            except psycopg.Error as broken:
                raise _Broken() from broken
            return None, exc
