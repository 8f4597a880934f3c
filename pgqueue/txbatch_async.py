"""Transaction batches for async transactional tasks, on the event loop.

The design of txbatch.py, for handlers that are coroutines: ``--tx-batch N``
gives each of ceil(concurrency / N) lanes one AsyncConnection. A lane runs
the handlers of the jobs waiting for it one after the other in one open
transaction (up to N jobs or ``max_seconds``), then completes them all with
``complete_all`` pipelined with the COMMIT. The guarantees, the fallback to one
savepoint per job when a handler fails or a lease was lost, and the price (a
handler may run again, its first run rolled back, when a batch mate failed;
handlers of one lane run one at a time) are those described in txbatch.py.

A lane is a Task, not a thread: handlers run on the worker's event loop and
their timeouts cancel them there (the query in flight is cancelled on the
server, which leaves the transaction aborted: the batch rolls back).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from pgqueue.errors import HandlerCancelled, HandlerRaisedBaseException, JobTimeout
from pgqueue.handler_conn import BEGIN, lent
from pgqueue.txbatch import check_left_open, savepoint_statements


@dataclass(eq=False, slots=True)
class AsyncBatchItem:
    """One job handed to a lane."""

    job_id: int
    lease_token: Any  # uuid.UUID
    # Runs the handler (with its timeout) on the lane's connection and returns
    # the result's JSON; raises JobTimeout if the attempt was abandoned.
    run: Callable[[psycopg.AsyncConnection[Any]], Awaitable[str | None]]
    is_dropped: Callable[[], bool]  # timed out or handed back before it started
    set_completing: Callable[[bool], None]  # see txbatch.BatchItem
    future: asyncio.Future[str | None]


Outcome = tuple[AsyncBatchItem, "str | None", "BaseException | None"]


class _Broken(Exception):
    """The connection failed: the whole open transaction is gone."""


def _settle(outcomes: Sequence[Outcome]) -> None:
    for item, payload, error in outcomes:
        if item.future.done():  # the worker gave up on it (shutdown)
            continue
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(payload)


def _dropped(item: AsyncBatchItem) -> bool:
    return item.future.done() or item.is_dropped()


class AsyncTxBatcher:
    """Lanes that each run async transactional jobs in shared transactions."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]],
        lanes: int,
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
        self._queue: asyncio.Queue[AsyncBatchItem | None] = asyncio.Queue()
        self._closing = False  # stop() is cancelling the lanes
        self._lanes = [asyncio.create_task(self._lane()) for _ in range(lanes)]

    def submit(self, item: AsyncBatchItem) -> None:
        """Queue a job; a free lane runs it, possibly in an open batch."""
        self._queue.put_nowait(item)

    async def stop(self, timeout: float = 5.0) -> None:
        """Let each lane finish its batch and close its connection; cancel the
        lanes still busy after ``timeout`` seconds (their jobs roll back)."""
        for _ in self._lanes:
            self._queue.put_nowait(None)
        _, busy = await asyncio.wait(self._lanes, timeout=timeout)
        self._closing = True
        for lane in busy:
            lane.cancel()
        await asyncio.gather(*self._lanes, return_exceptions=True)

    async def _lane(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        taken: list[AsyncBatchItem] = []  # this batch's items, to settle if cancelled
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    break
                taken = [item]
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = await self._connect()
                    await self._batch(conn, item, taken)
                except Exception as exc:
                    # The connection failed (or connecting did): every job of
                    # the batch not settled yet gets the error, and the lane
                    # goes on with a new connection.
                    error = exc.__cause__ if isinstance(exc, _Broken) else exc
                    _settle([(it, None, error or exc) for it in taken])
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
        finally:
            for item in taken:
                if not item.future.done():
                    item.future.cancel()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    def _next(self, taken: list[AsyncBatchItem]) -> AsyncBatchItem | None:
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if item is None:  # a stop request: leave it for the lane's loop
            self._queue.put_nowait(None)
            return None
        taken.append(item)
        return item

    # -- the fast path: no savepoints ------------------------------------------

    async def _batch(
        self,
        conn: psycopg.AsyncConnection[Any],
        first: AsyncBatchItem,
        taken: list[AsyncBatchItem],
    ) -> None:
        try:
            await conn.execute(BEGIN)
        except psycopg.Error as exc:
            raise _Broken() from exc
        loop = asyncio.get_running_loop()
        outcomes: list[Outcome] = []
        ran: list[tuple[AsyncBatchItem, str | None]] = []
        failed: tuple[AsyncBatchItem, BaseException] | None = None
        started = loop.time()
        item: AsyncBatchItem | None = first
        while item is not None:
            if _dropped(item):
                outcomes.append(
                    (item, None, JobTimeout("the attempt was abandoned before it ran"))
                )
            else:
                try:
                    ran.append((item, await self._run(conn, item)))
                except Exception as exc:
                    failed = (item, exc)
                    break
            if (
                len(ran) + len(outcomes) >= self._max_jobs
                or loop.time() - started > self._max_seconds
            ):
                break
            item = self._next(taken)
        if failed is None:
            _settle(outcomes + await self._commit(conn, ran))
            return
        # The failed handler's writes cannot be told apart from its batch's:
        # roll all back, fail that job alone, run the others again carefully.
        try:
            await conn.execute("rollback")
        except psycopg.Error as exc:
            _settle([*outcomes, (failed[0], None, failed[1])])
            raise _Broken() from exc
        _settle([*outcomes, (failed[0], None, failed[1])])
        if ran:
            await self._careful(conn, [it for it, _ in ran])

    async def _commit(
        self,
        conn: psycopg.AsyncConnection[Any],
        ran: list[tuple[AsyncBatchItem, str | None]],
    ) -> list[Outcome]:
        """Complete every job that ran and COMMIT, in one round trip."""
        if not ran:
            try:
                await conn.execute("commit")
            except psycopg.Error as exc:
                raise _Broken() from exc
            return []
        if any(_dropped(item) for item, _ in ran):
            # One was handed back (shutdown) since it ran: its writes must not
            # commit. The others again, without it.
            await conn.execute("rollback")
            await self._careful(conn, [it for it, _ in ran])
            return []
        for item, _ in ran:
            item.set_completing(True)
        try:
            async with conn.pipeline():
                await conn.execute(
                    self._complete_all,
                    [
                        [it.job_id for it, _ in ran],
                        [it.lease_token for it, _ in ran],
                        [payload for _, payload in ran],
                    ],
                )
                await conn.execute("commit")
        except psycopg.Error as exc:
            for item, _ in ran:
                item.set_completing(False)
            if conn.broken or conn.closed:
                raise _Broken() from exc
            # A lease was lost (PQ004) or the statement was cancelled: the
            # COMMIT rolled back. Each job again, fenced alone.
            if conn.info.transaction_status != TransactionStatus.IDLE:
                await conn.execute("rollback")
            await self._careful(conn, [it for it, _ in ran])
            return []
        return [(it, payload, None) for it, payload in ran]

    # -- the careful path: one savepoint a job -----------------------------------

    async def _careful(
        self, conn: psycopg.AsyncConnection[Any], items: list[AsyncBatchItem]
    ) -> None:
        """Run ``items`` in one transaction, each in its own savepoint."""
        outcomes: list[Outcome] = []
        completed: list[tuple[AsyncBatchItem, str | None]] = []
        try:
            async with conn.pipeline():
                await conn.execute(BEGIN)
                await conn.execute(self._savepoint)
        except psycopg.Error as exc:
            raise _Broken() from exc
        for item in items:
            if _dropped(item):
                outcomes.append(
                    (item, None, JobTimeout("the attempt was abandoned before it ran"))
                )
                continue
            try:
                # complete_one raises PQ004 when the lease was lost, which skips
                # the rest of the pipeline; the job's savepoint then rolls back.
                payload = await self._run_and_complete(
                    conn,
                    item,
                    (self._release, self._savepoint),
                )
                completed.append((item, payload))
            except Exception as exc:
                item.set_completing(False)
                outcomes.append((item, None, exc))
                try:
                    await conn.execute(self._rollback_to)
                except psycopg.Error as broken:
                    raise _given_up(outcomes, completed) from broken
        try:
            await conn.execute("commit")
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise _given_up(outcomes, completed) from exc
            # The COMMIT itself failed (a deferred constraint of one job): each
            # job that succeeded here once more, in a transaction of its own.
            _given_up(outcomes, completed)
            await self._solo(conn, [it for it, _ in completed])
            return
        _settle(outcomes + [(it, payload, None) for it, payload in completed])

    # -- the last resort: one transaction a job ---------------------------------

    async def _solo(
        self, conn: psycopg.AsyncConnection[Any], items: list[AsyncBatchItem]
    ) -> None:
        """Run each job in a transaction of its own, completed with its COMMIT."""
        for item in items:
            if _dropped(item):
                error = JobTimeout("the attempt was abandoned before it ran")
                _settle([(item, None, error)])
                continue
            try:
                await conn.execute(BEGIN)
                payload = await self._run_and_complete(conn, item, ("commit",))
            except Exception as exc:
                item.set_completing(False)
                if conn.broken or conn.closed:
                    raise _Broken() from exc
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    await conn.execute("rollback")
                _settle([(item, None, exc)])
                continue
            _settle([(item, payload, None)])

    async def _run_and_complete(
        self,
        conn: psycopg.AsyncConnection[Any],
        item: AsyncBatchItem,
        then: tuple[str, ...],
    ) -> str | None:
        """Run one job's handler, then send its fenced completion and ``then``
        in one round trip; returns the result's JSON."""
        payload = await self._run(conn, item)
        item.set_completing(True)
        async with conn.pipeline():
            await conn.execute(
                self._complete_one, [item.job_id, item.lease_token, payload]
            )
            for statement in then:
                await conn.execute(statement)
        return payload

    async def _run(
        self, conn: psycopg.AsyncConnection[Any], item: AsyncBatchItem
    ) -> str | None:
        """Run one handler in the open transaction and check it left it usable.

        Each handler runs in a Task of its own, made from the lane's context
        (the worker's, when it started): the context variables it sets stay
        its own, and a handler that cancels its Task cancels only itself. A
        cancel of the lane reaches the handler through its Task. A
        CancelledError out of a handler that nobody cancelled (it awaited a
        task it had cancelled itself, or cancelled its own) is that job's
        failure, not the lane's end.
        """
        try:
            with lent(conn):
                payload = await asyncio.ensure_future(_contained(item.run(conn)))
        except asyncio.CancelledError:
            if self._closing or _cancelling():
                raise
            raise HandlerCancelled() from None
        except Exception:
            raise
        except BaseException as exc:  # SystemExit, GeneratorExit, its own...
            # An Exception, so that the lane fails this job alone (the job's
            # error names the original) and lives on.
            raise HandlerRaisedBaseException(
                f"the handler raised {type(exc).__name__}"
            ) from exc
        check_left_open(conn.info.transaction_status)
        return payload


async def _contained(handler: Awaitable[str | None]) -> str | None:
    """``handler``, with SystemExit and KeyboardInterrupt turned into this
    job's failure inside its Task: a Task that lets either out also raises it
    into the event loop, which stopped the worker (the README promises that
    they fail the job alone, as they do outside a batch)."""
    try:
        return await handler
    except (SystemExit, KeyboardInterrupt) as exc:
        raise HandlerRaisedBaseException(
            f"the handler raised {type(exc).__name__}"
        ) from exc


def _given_up(
    outcomes: Sequence[Outcome], completed: list[tuple[AsyncBatchItem, str | None]]
) -> _Broken:
    """The connection broke in the careful path: settle the failures known so
    far; the completions did not commit, and the lane settles those jobs (and
    the ones not run yet) with the connection's error."""
    _settle(outcomes)
    for item, _ in completed:
        item.set_completing(False)
    return _Broken()


def _cancelling() -> bool:
    """True while the running task (the lane) is being cancelled (Python
    3.11+; on 3.10 the batcher's own flag says when its lanes are)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling is not None and cancelling())
