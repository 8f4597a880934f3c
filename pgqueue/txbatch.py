"""Several transactional jobs in one transaction, committed together.

Opt-in (``Worker(tx_batch=N)``, ``pgqueue worker --tx-batch N``) for
transactional tasks; this module runs sync handlers, txbatch_async.py async
ones the same way. Each batching thread keeps one connection. While jobs are
waiting (up to N jobs or ``max_seconds``) it runs their handlers one after the
other in one open transaction, then completes them all with one fenced
statement (``complete_all``) pipelined with the COMMIT. A job's writes commit
exactly when its completion does, so the guarantees are those of one job per
transaction; what the jobs share is the BEGIN, the COMMIT and its fsync, and
the completion statement. On a machine where a statement costs a Python
process ~150 us of CPU, that halves the statements per job of a handler that
writes one row (see the commit that added this design for the figures).

When something goes wrong the batch falls back to one savepoint per job:

- a handler raises (or times out, or leaves its transaction aborted, or
  tries to end it: the batch's connection refuses commit, rollback and close
  while a handler holds it, see handler_conn.py): the
  transaction rolls back, that job fails alone, and the jobs that ran before it
  in the batch run again, each in its own savepoint;
- ``complete_all`` finds a lease lost (the worker stalled past its lease): it
  raises, the COMMIT rolls back, and the batch runs again one savepoint per
  job, where each completion (``complete_one``) is fenced alone;
- a job that ran was given up meanwhile (it timed out waiting for the COMMIT,
  or was handed back): the batch rolls back and the others run again, one
  savepoint each.

And when that transaction's COMMIT itself fails on a healthy connection (a
deferred constraint one job broke), each job that succeeded in it runs once
more, in a transaction of its own.

So a handler may run again although it succeeded (at most three times): when
another job of its batch failed. Its earlier runs left no trace in the
database (they were rolled back); keep side effects outside the database
idempotent, as for any retry. A job's timeout counts each run of its
handler; after a run, a job waits for its batch's COMMIT up to twice its
timeout and a second (a batch mate may be hung where no cancel reaches it).

The price of batching: a job's completion commits with the batch, so a long
handler delays the commit of the jobs before it in the same batch (at most
``max_seconds`` of short jobs precede it). Keep it off for long handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from pgqueue.errors import JobTimeout
from pgqueue.handler_conn import BEGIN, lent


def savepoint_statements() -> tuple[str, str, str]:
    """Make, release and roll back to a batch's savepoint, under a name of its
    own: a handler that makes a savepoint of the same name and then fails
    would have the batch roll back to the handler's savepoint only, and its
    writes before it commit with its mates."""
    name = sql.Identifier(f"pgqueue_{secrets.token_hex(8)}")
    make, release, back = (
        sql.SQL(text).format(name).as_string(None)
        for text in ("savepoint {}", "release savepoint {}", "rollback to savepoint {}")
    )
    return make, release, back


@dataclass(eq=False, slots=True)
class BatchItem:
    """One job handed to a batching thread."""

    job_id: int
    lease_token: Any  # uuid.UUID
    # Runs the handler on the batch's connection and returns the result's JSON;
    # raises JobTimeout if the attempt was abandoned while it ran.
    run: Callable[[psycopg.Connection[Any]], str | None]
    is_dropped: Callable[[], bool]  # timed out or handed back before it started
    # True while the job's row is locked by the completion in flight, so the
    # heartbeat (which skips locked rows) does not take the job for lost.
    set_completing: Callable[[bool], None]
    future: asyncio.Future[str | None]
    loop: asyncio.AbstractEventLoop


Outcome = tuple[BatchItem, "str | None", "BaseException | None"]


class HandlerLeftTransactionAborted(Exception):
    """The handler returned with its transaction aborted by a failed statement."""


class _Broken(Exception):
    """The connection failed: the whole open transaction is gone."""


def _settle_all(outcomes: Sequence[Outcome]) -> None:
    for item, payload, error in outcomes:
        if item.future.done():
            continue
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(payload)


def _settle(outcomes: Sequence[Outcome]) -> None:
    """Hand results to the event loop: one wake-up for the whole batch."""
    if outcomes:
        # After the worker stopped, its loop is closed and nobody waits for
        # these jobs any more (they were handed back).
        with contextlib.suppress(RuntimeError):
            outcomes[0][0].loop.call_soon_threadsafe(_settle_all, list(outcomes))


class TxBatcher:
    """Threads that each run jobs in shared transactions."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        threads: int,
        max_jobs: int,
        *,
        complete_all: str,
        complete_one: str,
        max_seconds: float = 0.05,
    ) -> None:
        self._connect = connect
        self._max_jobs = max_jobs
        self._max_seconds = max_seconds
        self._complete_all = complete_all
        self._complete_one = complete_one
        self._savepoint, self._release, self._rollback_to = savepoint_statements()
        self._queue: queue.SimpleQueue[BatchItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0  # threads started, spares included
        # Threads a spare replaced: each exits when its hung handler returns.
        self._retiring: set[threading.Thread] = set()
        for _ in range(threads):
            self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            name = f"pgqueue-tx-{self._started}"
            self._started += 1
        threading.Thread(target=self._main, name=name, daemon=True).start()

    def submit(self, item: BatchItem) -> None:
        """Queue a job; a free thread runs it, possibly in an open batch."""
        self._queue.put(item)

    def spare(self, hung: threading.Thread) -> None:
        """Start a thread in place of ``hung``, which runs a handler past its
        timeout, and let ``hung`` exit once that handler returns.

        A thread cannot be killed, and a handler hung where no cancel reaches it
        (a socket read without a timeout) may never return: the jobs queued
        behind it waited for it, with no timeout of their own (theirs counts
        their run) and their leases renewed by the heartbeat.
        """
        with self._lock:
            if hung in self._retiring:
                return
            self._retiring.add(hung)
        self._start_thread()

    def _retired(self) -> bool:
        with self._lock:
            me = threading.current_thread()
            if me not in self._retiring:
                return False
            self._retiring.discard(me)
            return True

    def stop(self) -> None:
        """Let each thread finish its batch and exit (does not wait)."""
        with self._lock:
            started = self._started
        for _ in range(started):
            self._queue.put(None)

    def _main(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            taken = [item]  # this batch's items, every one settled below
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self._connect()
                self._batch(conn, item, taken)
            except BaseException as exc:
                # The connection failed (or connecting did, or something
                # unforeseen): every job of the batch not settled yet gets the
                # error, and the thread goes on with a new connection.
                error = exc.__cause__ if isinstance(exc, _Broken) else exc
                _settle([(it, None, error or exc) for it in taken])
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            if self._retired():
                break
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _next(self, taken: list[BatchItem]) -> BatchItem | None:
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is None:  # a stop request: leave it for the loop
            self._queue.put(None)
            return None
        taken.append(item)
        return item

    # -- the fast path: no savepoints ------------------------------------------

    def _batch(
        self, conn: psycopg.Connection[Any], first: BatchItem, taken: list[BatchItem]
    ) -> None:
        try:
            conn.execute(BEGIN)
        except psycopg.Error as exc:
            _settle([(first, None, exc)])
            raise _Broken() from exc
        outcomes: list[Outcome] = []
        ran: list[tuple[BatchItem, str | None]] = []
        failed: tuple[BatchItem, BaseException] | None = None
        started = time.monotonic()
        item: BatchItem | None = first
        while item is not None:
            if item.is_dropped():
                outcomes.append(
                    (item, None, JobTimeout("the attempt was abandoned before it ran"))
                )
            else:
                try:
                    ran.append((item, _run(conn, item)))
                except BaseException as exc:
                    failed = (item, exc)
                    break
            if (
                len(ran) + len(outcomes) >= self._max_jobs
                or time.monotonic() - started > self._max_seconds
            ):
                break
            item = self._next(taken)
        if failed is None:
            try:
                outcomes += self._commit(conn, ran)
            finally:
                _settle(outcomes)  # even when the COMMIT broke the connection
            return
        # The failed handler's writes cannot be told apart from its batch's:
        # roll all back, fail that job alone, run the others again carefully.
        try:
            conn.execute("rollback")
        except psycopg.Error as exc:
            _settle(
                [*outcomes, (failed[0], None, failed[1])]
                + [(it, None, exc) for it, _ in ran]
            )
            raise _Broken() from exc
        _settle([*outcomes, (failed[0], None, failed[1])])
        if ran:
            self._careful(conn, [it for it, _ in ran])

    def _commit(
        self, conn: psycopg.Connection[Any], ran: list[tuple[BatchItem, str | None]]
    ) -> list[Outcome]:
        """Complete every job that ran and COMMIT, in one round trip."""
        if not ran:
            conn.execute("commit")
            return []
        if any(item.is_dropped() for item, _ in ran):
            # One timed out (waiting for this COMMIT) or was handed back since it
            # ran: its writes must not commit. The others again, without it.
            conn.execute("rollback")
            self._careful(conn, [it for it, _ in ran])
            return []
        for item, _ in ran:
            item.set_completing(True)
        try:
            with conn.pipeline():
                conn.execute(
                    self._complete_all,
                    [
                        [it.job_id for it, _ in ran],
                        [it.lease_token for it, _ in ran],
                        [payload for _, payload in ran],
                    ],
                )
                conn.execute("commit")
        except psycopg.Error as exc:
            for item, _ in ran:
                item.set_completing(False)
            if conn.broken or conn.closed:
                _settle([(it, None, exc) for it, _ in ran])
                raise _Broken() from exc
            # A lease was lost (PQ004) or the statement was cancelled: the
            # COMMIT rolled back. Each job again, fenced alone.
            if conn.info.transaction_status != TransactionStatus.IDLE:
                conn.execute("rollback")
            self._careful(conn, [it for it, _ in ran])
            return []
        return [(it, payload, None) for it, payload in ran]

    # -- the careful path: one savepoint a job -----------------------------------

    def _careful(self, conn: psycopg.Connection[Any], items: list[BatchItem]) -> None:
        """Run ``items`` in one transaction, each in its own savepoint.

        A job that fails, or whose lease was lost, rolls back only its own
        savepoint; the others commit with their fenced completions.
        """
        outcomes: list[Outcome] = []
        completed: list[tuple[BatchItem, str | None]] = []
        try:
            with conn.pipeline():
                conn.execute(BEGIN)
                conn.execute(self._savepoint)
        except psycopg.Error as exc:
            _settle([(it, None, exc) for it in items])
            raise _Broken() from exc
        for index, item in enumerate(items):
            if item.is_dropped():
                outcomes.append(
                    (item, None, JobTimeout("the attempt was abandoned before it ran"))
                )
                continue
            try:
                # complete_one raises PQ004 when the lease was lost, which skips
                # the rest of the pipeline; the job's savepoint then rolls back.
                payload = self._run_and_complete(
                    conn,
                    item,
                    (self._release, self._savepoint),
                )
                completed.append((item, payload))
            except BaseException as exc:
                item.set_completing(False)
                outcomes.append((item, None, exc))
                try:
                    conn.execute(self._rollback_to)
                except psycopg.Error as broken:
                    self._abandon(items[index + 1 :], completed, outcomes, broken)
                    raise _Broken() from broken
        try:
            conn.execute("commit")
        except psycopg.Error as exc:
            for item, _ in completed:
                item.set_completing(False)
            _settle(outcomes)
            if conn.broken or conn.closed:
                raise _Broken() from exc  # _main settles the completed ones
            # The COMMIT itself failed (a deferred constraint of one job): each
            # job that succeeded here once more, in a transaction of its own.
            self._solo(conn, [it for it, _ in completed])
            return
        _settle(outcomes + [(it, payload, None) for it, payload in completed])

    def _run_and_complete(
        self, conn: psycopg.Connection[Any], item: BatchItem, then: tuple[str, ...]
    ) -> str | None:
        """Run one job's handler, then send its fenced completion and ``then``
        in one round trip; returns the result's JSON."""
        payload = _run(conn, item)
        item.set_completing(True)
        with conn.pipeline():
            conn.execute(self._complete_one, [item.job_id, item.lease_token, payload])
            for statement in then:
                conn.execute(statement)
        return payload

    # -- the last resort: one transaction a job ---------------------------------

    def _solo(self, conn: psycopg.Connection[Any], items: list[BatchItem]) -> None:
        """Run each job in a transaction of its own, completed with its COMMIT."""
        for item in items:
            if item.is_dropped():
                error = JobTimeout("the attempt was abandoned before it ran")
                _settle([(item, None, error)])
                continue
            try:
                conn.execute(BEGIN)
                payload = self._run_and_complete(conn, item, ("commit",))
            except BaseException as exc:
                item.set_completing(False)
                if conn.broken or conn.closed:
                    raise _Broken() from exc
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.execute("rollback")
                _settle([(item, None, exc)])
                continue
            _settle([(item, payload, None)])

    @staticmethod
    def _abandon(
        rest: list[BatchItem],
        completed: list[tuple[BatchItem, str | None]],
        outcomes: list[Outcome],
        exc: BaseException,
    ) -> None:
        """The connection broke: nothing of this transaction committed."""
        for item, _ in completed:
            item.set_completing(False)
        _settle(
            outcomes
            + [(it, None, exc) for it, _ in completed]
            + [(it, None, exc) for it in rest]
        )


def _run(conn: psycopg.Connection[Any], item: BatchItem) -> str | None:
    """Run one handler in the open transaction and check it left it usable."""
    with lent(conn):
        payload = item.run(conn)
    check_left_open(conn.info.transaction_status)
    return payload


def check_left_open(status: TransactionStatus) -> None:
    """Raise unless a handler left the batch's transaction open and usable."""
    if status == TransactionStatus.INERROR:
        raise HandlerLeftTransactionAborted(
            "the handler returned with its transaction aborted (it caught a "
            "database error); its writes are rolled back"
        )
    if status != TransactionStatus.INTRANS:
        raise HandlerLeftTransactionAborted(
            "the handler ended the worker's transaction (a COMMIT or ROLLBACK "
            "sent as SQL on ctx.conn); leave that to the worker"
        )
