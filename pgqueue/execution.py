"""Running one job: call its handler, then complete or fail it.

`JobExecution` is the part of :class:`pgqueue.worker.Worker` that runs a leased
job: transactional handlers inside a transaction that also completes the job
(fenced by the lease token), non-transactional ones with a buffered
completion, sync handlers in threads, and per-task timeouts. Failures are
recorded in a separate transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from pgqueue import _sql, serialization, tracebacks
from pgqueue.app import App
from pgqueue.context import JobContext, new_context
from pgqueue.errors import (
    ArgumentsNotSerializable,
    HandlerCancelled,
    JobTimeout,
    LeaseLost,
    Retry,
)
from pgqueue.handler_conn import BEGIN, HandlerConnection, lent
from pgqueue.jobs import Job, UnreadableArgs
from pgqueue.retry import ExponentialBackoff
from pgqueue.tasks import Task, check_args
from pgqueue.txbatch import BatchItem, TxBatcher, check_left_open
from pgqueue.txbatch_async import AsyncBatchItem, AsyncTxBatcher

_DEFAULT_RETRY = ExponentialBackoff()
_ASYNCIO_TIMEOUT = sys.version_info >= (3, 11)
FLUSH_MAX = 2000  # completions per statement
FAIL_FLUSH_MAX = 500  # failures per statement (each carries a traceback)
FAIL_TRIES = 3  # writes of one failure before it is left to lease expiry
MAX_RETRY_DELAY = 100 * 366 * 86400.0  # seconds, as far as enqueue schedules
_MAX_ERROR_CHARS = 2000
_MAX_TRACEBACK_CHARS = 8000
_BIG_INT = 10**18  # smaller ints skip the JSON encoder (a result of 1 is common)


def _lease_error(exc: BaseException, job: Job) -> LeaseLost | None:
    """complete_one's PQ004 as LeaseLost; None for any other error."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate == "PQ004":
        return LeaseLost(str(exc.diag.message_primary), job_id=job.id)
    return None


def _job_fields(job: Job) -> dict[str, Any]:
    """The keys every job log event carries."""
    return {
        "job_id": job.id,
        "task": job.task,
        "queue": job.queue,
        "attempt": job.attempts + 1,
    }


def _array_literal(items: Iterable[str | None]) -> str:
    """A PostgreSQL array literal of quoted elements (None is NULL).

    The worker sends its batch arrays as one text parameter each: psycopg's
    list dumper cost about 3 us a job for the three completion arrays, this
    about 0.5 us. Inside double quotes only backslash and quote need escaping.
    """
    return (
        "{"
        + ",".join(
            "NULL"
            if item is None
            else '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for item in items
        )
        + "}"
    )


def completions(
    batch: Sequence[tuple[Attempt, str | None]], lock_wait_ms: int
) -> dict[str, str | int | None]:
    """Parameters of the batch completion statement for ``batch``."""
    tokens: dict[uuid.UUID, str] = {}  # one token per lease call: str() it once
    token_texts = []
    for attempt, _ in batch:
        token = attempt.job.lease_token
        text = tokens.get(token)
        if text is None:
            text = tokens[token] = str(token)
        token_texts.append(text)
    results = [payload for _, payload in batch]
    return {
        "ids": "{" + ",".join([str(a.job.id) for a, _ in batch]) + "}",
        "tokens": "{" + ",".join(token_texts) + "}",
        "results": None if not any(results) else _array_literal(results),
        "lock_wait_ms": lock_wait_ms,
    }


@dataclass(eq=False, slots=True)
class Attempt:
    """One job in flight in this worker."""

    job: Job
    started: float
    future: asyncio.Future[Any] | None = None
    sync_conn: psycopg.Connection[Any] | None = None
    # Held while a timeout cancels sync_conn's query, and while the handler's
    # thread lets go of sync_conn: a late cancel cannot reach the statement
    # that thread sends next (a batch mate's, or the next job's).
    conn_lock: threading.Lock = field(default_factory=threading.Lock)
    timed_out: bool = False
    abandoned: bool = False  # handed back at shutdown: must not complete
    lease_lost: bool = False
    completing: bool = False  # completed in a batch transaction not yet committed
    failing: bool = False  # its failure is being recorded (requeued or dead)
    refused: int = 0  # completion writes the database refused (worker.py)
    # A write of its completion or failure lost its connection (or got no
    # answer): that write may have committed, so the next one finding no lease
    # proves nothing about the lease (worker._write_completions and
    # _write_failures).
    unconfirmed: bool = False
    # Its completion or failure met a row lock another session holds (55P03,
    # 0020): set aside until then (time.monotonic()), longer each time
    # (worker.py).
    parked_until: float = 0.0
    parks: int = 0

    def in_flight(self) -> bool:
        """Neither ending (completing, failing, handler done) nor given up
        (timed out, handed back): then, and only then, a job row missing from
        the table means this attempt's lease was lost."""
        return not (
            self.completing
            or self.failing
            or self.timed_out
            or self.abandoned
            or (self.future is not None and self.future.done())
        )


@dataclass(eq=False, slots=True)
class Failure:
    """A failed attempt waiting to be written (JobExecution._write_failures)."""

    attempt: Attempt
    error: str  # "Kind: message", for the log
    payload: str  # the error history entry, JSON
    delay: float  # seconds until the retry, if attempts remain
    tries: int = 0  # writes that failed; after FAIL_TRIES the reaper counts it


def _storable(text: str, limit: int) -> str:
    """``text`` as jsonb can hold it: at most ``limit`` characters (its head
    and its tail when longer), no NUL, and lone surrogates (which UTF-8 cannot
    encode) written as escapes."""
    if len(text) > limit:
        half = (limit - 5) // 2
        text = text[:half] + " ... " + text[-half:]
    text = text.replace("\x00", "")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded_delay(delay: object) -> float:
    """A retry delay the database takes: a number of seconds from 0 to
    MAX_RETRY_DELAY (a delay that is no number, or NaN, is 0)."""
    try:
        seconds = float(delay)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # 10**400 overflows a float
        return MAX_RETRY_DELAY if isinstance(delay, int) and delay > 0 else 0.0
    if not seconds >= 0:  # negative or NaN
        return 0.0
    return min(seconds, MAX_RETRY_DELAY)


def _call_sync_handler(task: Task, ctx: JobContext, args: dict[str, Any]) -> Any:
    """Call a sync handler. A StopIteration it lets out becomes a RuntimeError,
    as one leaving a generator does (PEP 479): a Future refuses StopIteration,
    and the job would never end."""
    try:
        return task.func(ctx, **args)
    except StopIteration as exc:
        raise RuntimeError("the handler raised StopIteration") from exc


def _set_completing(attempt: Attempt, value: bool) -> None:
    attempt.completing = value


@dataclass(eq=False, slots=True)
class RunClock:
    """When the current run of a sync batch job's handler started, or the last
    one ended, as the event loop saw it. A job may run more than once in its
    batch (txbatch.py): each run is timed on its own."""

    changed: asyncio.Event
    running_since: float | None = None
    ended_at: float | None = None
    thread: threading.Thread | None = None  # the batch thread of the last run


def _run_began(clock: RunClock, loop: asyncio.AbstractEventLoop) -> None:
    clock.running_since = loop.time()
    clock.changed.set()


def _run_ended(clock: RunClock, loop: asyncio.AbstractEventLoop) -> None:
    clock.running_since = None
    clock.ended_at = loop.time()
    clock.changed.set()


_HANDLERS_OWN = "_pgqueue_handlers_own"  # marks a handler's own TimeoutError


async def _own_timeouts_marked(coro: Any) -> Any:  # pragma: no cover (3.10)
    """Await a handler; a TimeoutError it raises itself leaves marked, so that
    wait_for's own (the timeout firing) can be told from it."""
    try:
        return await coro
    except asyncio.TimeoutError as exc:
        with contextlib.suppress(AttributeError):  # an exception with __slots__
            setattr(exc, _HANDLERS_OWN, True)
        raise


async def _complete_and_commit(
    conn: psycopg.AsyncConnection[Any],
    stmts: _sql.Statements,
    job: Job,
    payload: str | None,
) -> None:
    """The job's fenced completion and the COMMIT, in one round trip.

    complete_one raises when the lease was lost: the COMMIT is then not run,
    and the caller rolls back. A result goes as a parameter (a pipeline of
    the two), so that it never enters the statement's text.
    """
    if payload is None:
        cur = psycopg.AsyncClientCursor(conn)
        await cur.execute(stmts.complete_one_commit, [job.id, job.lease_token])
        return
    async with conn.pipeline():
        await conn.execute(stmts.complete_one, [job.id, job.lease_token, payload])
        await conn.execute("commit")


def _complete_and_commit_sync(
    conn: psycopg.Connection[Any],
    stmts: _sql.Statements,
    job: Job,
    payload: str | None,
) -> None:
    """_complete_and_commit for a sync handler's connection."""
    if payload is None:
        cur = psycopg.ClientCursor(conn)
        cur.execute(stmts.complete_one_commit, [job.id, job.lease_token])
        return
    with conn.pipeline():
        conn.execute(stmts.complete_one, [job.id, job.lease_token, payload])
        conn.execute("commit")


def _ran_too_long_error(task: Task) -> JobTimeout:
    return JobTimeout(_ran_too_long(task))


def _ran_too_long(task: Task) -> str:
    return f"{task.name} ran longer than its timeout of {task.timeout} s"


def _cancel_query(attempt: Attempt) -> None:
    """Cancel the query a timed-out sync attempt may be running (in a thread:
    the cancel request takes a connection of its own)."""
    with attempt.conn_lock:
        if attempt.sync_conn is not None:
            with contextlib.suppress(Exception):
                attempt.sync_conn.cancel_safe(timeout=1.0)


async def _wait_batched(
    future: asyncio.Future[str | None], clock: RunClock | None, task: Task
) -> str | None:
    """Wait for a job run in a sync batch. Returns why it timed out, if it did:
    a run of its handler lasted longer than the task's timeout (from its start
    to its return: not its wait for a batch thread), or, after its run, its
    batch did not commit within twice the timeout and a second (a batch mate
    hangs where a cancel cannot reach it)."""
    timeout = task.timeout
    if clock is None or timeout is None:
        await asyncio.wait({future})
        return None
    loop = asyncio.get_running_loop()
    while not future.done():
        clock.changed.clear()
        left = None
        if clock.running_since is not None:
            left = timeout - (loop.time() - clock.running_since)
            if left <= 0:
                return _ran_too_long(task)
        elif clock.ended_at is not None:
            # A batch mate may still run for up to its own timeout, and the
            # batch then run again without it: only past that is it hung.
            patience = 2 * timeout + 1.0
            left = patience - (loop.time() - clock.ended_at)
            if left <= 0:
                return (
                    f"{task.name} finished, but its batch did not commit within"
                    f" {patience} s (twice its timeout and a second)"
                )
        changed = asyncio.ensure_future(clock.changed.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {changed, future}
            await asyncio.wait(
                waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            changed.cancel()
    return None


@dataclass(slots=True)
class Counters:
    """What this worker has done so far (read by tests and the final log line)."""

    succeeded: int = 0
    failed: int = 0
    lease_lost: int = 0
    # Completions and failures written again after an earlier write lost its
    # answer, which found no lease: that write may have committed (succeeded
    # or failed as it said), or the lease was lost. Neither is counted above.
    unconfirmed: int = 0
    leased: int = 0
    lease_calls: int = 0
    leases_ahead: int = 0  # sent before the previous batch started (worker.py)
    heartbeats: int = 0


class JobExecution:
    """Run leased jobs; mixed into Worker, whose state it uses."""

    app: App
    worker_id: str
    counters: Counters
    _dsn: str  # the app's, with keepalives (liveness.with_liveness_defaults)
    _stmts: _sql.Statements
    _log: Any
    _log_info: bool  # info events are kept (log.is_info_enabled)
    _loop: asyncio.AbstractEventLoop | None
    _pool: AsyncConnectionPool | None
    _executor: ThreadPoolExecutor | None
    _local: threading.local
    _thread_conns: list[psycopg.Connection[Any]]
    _thread_conns_lock: threading.Lock
    _done: list[tuple[Attempt, str | None]]
    # How long a completion or failure waits for a row lock (0020): a quarter
    # of the worker's deadline, at most 2 s, so that its own cancel (at half
    # the deadline) never comes first.
    _lock_wait_ms: int
    _failed: list[Failure]
    _flush: asyncio.Event | None
    # Each handler runs in a copy of this (worker.run_async): the context
    # variables one job sets do not reach the next.
    _job_context: contextvars.Context
    _tx_batcher: TxBatcher | None
    _async_batcher: AsyncTxBatcher | None
    # Worker's: run one statement on a pooled connection and return its rows.
    _fetch: Callable[[str, list[Any]], Awaitable[list[tuple[Any, ...]]]]

    def _context(self, job: Job, conn: Any) -> JobContext:
        return new_context(job, conn, self.worker_id, self._log)

    def _bind_args(self, task: Task, job: Job) -> dict[str, Any]:
        """The job's arguments as keywords, checked against the handler."""
        if type(job.args) is UnreadableArgs:
            raise ArgumentsNotSerializable(
                f"job {job.id} has arguments Python cannot read: {job.args.reason}"
            )
        if type(job.args) is not dict:
            raise ArgumentsNotSerializable(
                f"job {job.id} has arguments of JSON type {type(job.args).__name__}; "
                "a task takes a JSON object of keyword arguments"
            )
        check_args(task, job.args)
        return job.args

    async def _run(self, attempt: Attempt) -> None:
        job = self._log_started(attempt)
        task: Task | None = None
        try:
            task = self.app.get_task(job.task)
            args = self._bind_args(task, job)
            if task.is_async:
                await self._run_async(attempt, task, args)
            else:
                await self._run_sync(attempt, task, args)
        except asyncio.CancelledError:
            if attempt.abandoned:  # shutdown cancelled it
                raise
            # The handler's own: it fails its job, like any other exception.
            self._fail(attempt, task, HandlerCancelled())
        except LeaseLost:
            self._lease_was_lost(attempt)
        except BaseException as exc:
            # Any exception a handler lets out fails its job only, SystemExit
            # and KeyboardInterrupt from inside a handler included (a command
            # line tool it called, say): they are not the worker's signals,
            # which it handles itself, and the attempt must be counted.
            self._fail(attempt, task, exc)

    def _log_started(self, attempt: Attempt) -> Job:
        job = attempt.job
        if self._log_info:
            self._log.info("job_started", **_job_fields(job))
        return job

    async def _run_async(
        self, attempt: Attempt, task: Task, args: dict[str, Any]
    ) -> None:
        job = attempt.job
        if not task.transactional:
            result = await self._within_timeout(
                task, task.func(self._context(job, None), **args)
            )
            self._completed_later(attempt, self._result_json(result))
            return
        if self._async_batcher is not None:
            await self._run_async_batched(attempt, task, args)
            return
        assert self._pool is not None
        async with self._pool.connection() as conn:
            await conn.execute(BEGIN)
            try:
                with lent(conn):
                    result = await self._within_timeout(
                        task, task.func(self._context(job, conn), **args)
                    )
                check_left_open(conn.info.transaction_status)
                payload = self._result_json(result)
                # Completion and COMMIT in one round trip: complete_one raises
                # when the lease was lost, the COMMIT is then not run, and the
                # except below rolls back. Until the COMMIT the row is locked,
                # and the heartbeat skips it.
                attempt.completing = True
                await _complete_and_commit(conn, self._stmts, job, payload)
            except BaseException as exc:
                attempt.completing = False
                if not conn.closed:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("rollback")
                lost = _lease_error(exc, job)
                if lost is not None:
                    raise lost from exc
                raise
        self._log_succeeded(attempt)

    async def _run_async_batched(
        self, attempt: Attempt, task: Task, args: dict[str, Any]
    ) -> None:
        """Hand the job to a lane (txbatch_async.py), which runs it in a shared
        transaction and completes it with the COMMIT."""
        assert self._async_batcher is not None and self._loop is not None
        future: asyncio.Future[str | None] = self._loop.create_future()
        self._async_batcher.submit(
            AsyncBatchItem(
                job_id=attempt.job.id,
                lease_token=attempt.job.lease_token,
                run=functools.partial(self._run_async_in_batch, attempt, task, args),
                is_dropped=lambda: attempt.timed_out or attempt.abandoned,
                set_completing=functools.partial(_set_completing, attempt),
                future=future,
            )
        )
        try:
            await future
        except psycopg.Error as exc:  # the batch's fenced completion
            lost = _lease_error(exc, attempt.job)
            if lost is not None:
                raise lost from exc
            raise
        self._log_succeeded(attempt)

    async def _run_async_in_batch(
        self,
        attempt: Attempt,
        task: Task,
        args: dict[str, Any],
        conn: psycopg.AsyncConnection[Any],
    ) -> str | None:
        """Run an async handler in a lane's open transaction; the lane completes
        the job. Returns the result's JSON."""
        result = await self._within_timeout(
            task, task.func(self._context(attempt.job, conn), **args)
        )
        payload = self._result_json(result)
        if attempt.timed_out or attempt.abandoned:
            raise JobTimeout("the attempt was abandoned; rolled back")
        return payload

    async def _within_timeout(self, task: Task, coro: Any) -> Any:
        """Await a handler's coroutine; JobTimeout if its timeout fired.

        Only the timeout firing is JobTimeout: a TimeoutError the handler
        raised itself (a socket's, an HTTP client's) is its own failure. On
        3.11 and later the handler stays in the Task that awaits this (its
        job's own, in a batch too: asyncio.timeout); on 3.10,
        wait_for runs it in a Task of its own and raises asyncio.TimeoutError,
        which there is not the builtin TimeoutError.
        """
        if task.timeout is None:
            return await coro
        if _ASYNCIO_TIMEOUT:
            scope = asyncio.timeout(task.timeout)  # type: ignore[attr-defined,unused-ignore]
            try:
                async with scope:
                    return await coro
            except TimeoutError:
                if scope.expired():
                    raise _ran_too_long_error(task) from None
                raise
        try:  # pragma: no cover (Python 3.10)
            return await asyncio.wait_for(_own_timeouts_marked(coro), task.timeout)
        except asyncio.TimeoutError as exc:  # pragma: no cover (Python 3.10)
            if getattr(exc, _HANDLERS_OWN, False):
                raise
            raise _ran_too_long_error(task) from None

    async def _run_sync(
        self, attempt: Attempt, task: Task, args: dict[str, Any]
    ) -> None:
        assert self._loop is not None and self._executor is not None
        future: asyncio.Future[str | None]
        batcher = self._tx_batcher if task.transactional else None
        clock: RunClock | None = None
        if batcher is not None:
            future = self._loop.create_future()
            # The timeout counts each run of the handler (from its start to its
            # return), not its wait for a batch thread or for its batch's
            # COMMIT: a slow batch mate is not this job's fault.
            if task.timeout is not None:
                clock = RunClock(asyncio.Event())
            batcher.submit(
                BatchItem(
                    job_id=attempt.job.id,
                    lease_token=attempt.job.lease_token,
                    run=functools.partial(
                        self._run_in_batch, attempt, task, args, clock
                    ),
                    is_dropped=lambda: attempt.timed_out or attempt.abandoned,
                    set_completing=functools.partial(_set_completing, attempt),
                    future=future,
                    loop=self._loop,
                )
            )
            timed_out = await _wait_batched(future, clock, task)
        else:
            future = self._loop.run_in_executor(
                self._executor, self._call_sync, attempt, task, args
            )
            done, _ = await asyncio.wait({future}, timeout=task.timeout)
            timed_out = None if done else _ran_too_long(task)
        hung = None if clock is None else clock.thread
        if timed_out and batcher is not None and hung is not None:
            # Its batch thread is held until this handler (or a batch mate,
            # with no timeout of its own or a longer one) returns, and the
            # jobs queued to it with it: another thread takes them.
            batcher.spare(hung)
        if timed_out and attempt.completing:
            # Too late to fail it: its completion is written in its batch's
            # open transaction, which holds its row until the COMMIT decides
            # (succeeded; or rolled back, and its lease lapses and reap counts
            # the attempt). Recording a failure would wait on that row lock,
            # and every completion and failure of this worker with it (they
            # are written one statement at a time).
            await asyncio.wait({future})
        elif timed_out:
            # A thread cannot be killed: fail the attempt now, interrupt its query,
            # and keep its slot until it returns. Its transaction never commits:
            # the timed_out flag stops the completion, and fencing would too.
            attempt.timed_out = True
            await asyncio.to_thread(_cancel_query, attempt)
            self._fail(attempt, task, JobTimeout(timed_out))
            with contextlib.suppress(BaseException):
                await future
            return
        try:
            payload = future.result()
        except psycopg.Error as exc:  # a batch's fenced completion (txbatch.py)
            lost = _lease_error(exc, attempt.job)
            if lost is not None:
                raise lost from exc
            raise
        if task.transactional:
            self._log_succeeded(attempt)
        else:
            self._completed_later(attempt, payload)

    def _call_sync(
        self, attempt: Attempt, task: Task, args: dict[str, Any]
    ) -> str | None:
        """Run a sync handler (in a pool thread). Returns the result's JSON."""
        job = attempt.job
        if not task.transactional:
            return self._result_json(
                self._job_context.copy().run(
                    _call_sync_handler, task, self._context(job, None), args
                )
            )
        conn = self._thread_connection()
        attempt.sync_conn = conn
        try:
            conn.execute(BEGIN)
            with lent(conn):
                result = self._job_context.copy().run(
                    _call_sync_handler, task, self._context(job, conn), args
                )
            check_left_open(conn.info.transaction_status)
            payload = self._result_json(result)
            if attempt.timed_out or attempt.abandoned:
                raise JobTimeout("the attempt was abandoned; rolled back")
            # As in _run_async: completion and COMMIT in one round trip.
            attempt.completing = True
            _complete_and_commit_sync(conn, self._stmts, job, payload)
            return payload
        except BaseException as exc:
            attempt.completing = False
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("rollback")
            lost = _lease_error(exc, job)
            if lost is not None:
                raise lost from exc
            raise
        finally:
            with attempt.conn_lock:
                attempt.sync_conn = None

    def _run_in_batch(
        self,
        attempt: Attempt,
        task: Task,
        args: dict[str, Any],
        clock: RunClock | None,
        conn: psycopg.Connection[Any],
    ) -> str | None:
        """Run a sync handler in a batch's open transaction (a batch thread).

        The batch completes the job (txbatch.py); this returns the result's JSON.
        ``clock`` (when the task has a timeout) tells _run_sync when this run
        started and returned.
        """
        job = attempt.job
        attempt.sync_conn = conn
        loop = self._loop
        assert loop is not None
        if clock is not None:
            clock.thread = threading.current_thread()
            loop.call_soon_threadsafe(_run_began, clock, loop)
        try:
            result = self._job_context.copy().run(
                _call_sync_handler, task, self._context(job, conn), args
            )
            payload = self._result_json(result)
            if attempt.timed_out or attempt.abandoned:
                raise JobTimeout("the attempt was abandoned; rolled back")
            return payload
        finally:
            with attempt.conn_lock:
                attempt.sync_conn = None
            if clock is not None:
                loop.call_soon_threadsafe(_run_ended, clock, loop)

    def _new_connection(self) -> psycopg.Connection[Any]:
        conn = HandlerConnection.connect(
            self._dsn, autocommit=True, application_name="pgqueue-worker"
        )
        with self._thread_conns_lock:
            self._thread_conns.append(conn)
        return conn

    def _thread_connection(self) -> psycopg.Connection[Any]:
        """This pool thread's own connection, opened on first use.

        Each handler thread keeps one connection rather than borrowing from a
        pool: a checkout and return per job cost more than the job's own SQL.
        """
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None:
            if (
                not conn.closed
                and not conn.broken
                and conn.info.transaction_status == TransactionStatus.IDLE
            ):
                return conn
            # Broken, or the last job's ROLLBACK failed (a timeout's cancel can
            # land on it): a transaction left open must not become this job's.
            with contextlib.suppress(Exception):
                conn.close()
            with self._thread_conns_lock, contextlib.suppress(ValueError):
                self._thread_conns.remove(conn)
        conn = self._local.conn = self._new_connection()
        return conn

    def _result_json(self, result: Any) -> str | None:
        if result is None:
            return None
        if type(result) is int and -_BIG_INT < result < _BIG_INT:
            return str(result)  # JSON's own spelling (a bool is not type int)
        return serialization.dumps(
            result, what="result", max_bytes=self.app.max_payload_bytes
        )

    def _completed_later(self, attempt: Attempt, payload: str | None) -> None:
        """Buffer a non-transactional completion; the flusher writes it."""
        assert self._flush is not None
        self._done.append((attempt, payload))
        self._flush.set()

    def _log_succeeded(self, attempt: Attempt) -> None:
        job = attempt.job
        self.counters.succeeded += 1
        if not self._log_info:
            return
        self._log.info(
            "job_succeeded",
            **_job_fields(job),
            duration_ms=round((time.perf_counter() - attempt.started) * 1000, 3),
        )

    def _lease_was_lost(self, attempt: Attempt) -> None:
        job = attempt.job
        self.counters.lease_lost += 1
        self._log.warning(
            "job_lease_lost",
            **_job_fields(job),
            detail="the lease expired or moved; this attempt's result was discarded",
        )

    def _fail(self, attempt: Attempt, task: Task | None, exc: BaseException) -> None:
        """Buffer a failed attempt (retry or dead); the flusher writes it."""
        job = attempt.job
        if attempt.abandoned:
            return
        attempt.failing = True  # from here on the row may leave (heartbeat)
        number = job.attempts + 1
        if isinstance(exc, Retry) and exc.after is not None:
            delay = _bounded_delay(exc.after)
        else:
            try:
                delay = _bounded_delay(
                    (task.retry if task else _DEFAULT_RETRY).delay(number)
                )
            except Exception:  # a retry policy of the user's that raised
                delay = _bounded_delay(_DEFAULT_RETRY.delay(number))
        kind = type(exc).__name__
        try:
            text = str(exc)
        except Exception as str_failed:  # its __str__ is broken
            text = f"<str() of the exception raised {type(str_failed).__name__}>"
        message = _storable(f"{kind}: {text}", _MAX_ERROR_CHARS)
        error = {
            "error": message,
            "kind": kind,
            "traceback": _storable(
                tracebacks.format_exception(exc), _MAX_TRACEBACK_CHARS
            ),
        }
        payload = serialization.dumps(error, what="error")
        assert self._flush is not None
        self._failed.append(Failure(attempt, message, payload, delay))
        self._flush.set()

    def _retries_scheduled(self, delays: list[float]) -> None:
        """Failed jobs went back to the queue, due in these many seconds
        (worker.py looks again when the first is due)."""

    async def _write_failures(
        self, batch: Sequence[Failure], *, quiet: bool = False
    ) -> Exception | None:
        """Record a batch of failures in one statement; the error if that
        failed (the flusher keeps them and tries again, see
        worker._flush_failures). Quiet: no warning when it fails (the flusher
        warns when it gives one up)."""
        try:
            rows = await self._fetch(
                self._stmts.fail_many,
                [
                    [f.attempt.job.id for f in batch],
                    [f.attempt.job.lease_token for f in batch],
                    [f.payload for f in batch],
                    [f.delay for f in batch],
                    self._lock_wait_ms,
                ],
            )
        except Exception as exc:
            if not quiet:
                self._log.warning("fail_not_recorded", error=repr(exc), jobs=len(batch))
            return exc
        # By (id, token): a job reaped and leased again may have two failures here.
        states = {(job_id, token): state for job_id, token, state in rows}
        self._retries_scheduled(
            [
                f.delay
                for f in batch
                if states.get((f.attempt.job.id, f.attempt.job.lease_token)) == "queued"
            ]
        )
        for failure in batch:
            attempt = failure.attempt
            state = states.get((attempt.job.id, attempt.job.lease_token))
            if state is None:
                if attempt.unconfirmed:  # an earlier write may have recorded it
                    self.counters.unconfirmed += 1
                    self._log.warning(
                        "job_failure_unconfirmed",
                        job_id=attempt.job.id,
                        detail="an earlier write of this failure lost its"
                        " connection and may have committed; else the lease"
                        " was lost",
                    )
                else:
                    self._lease_was_lost(attempt)
                continue
            self.counters.failed += 1
            self._log.warning(
                "job_failed",
                **_job_fields(attempt.job),
                duration_ms=round((time.perf_counter() - attempt.started) * 1000, 3),
                error=failure.error,
                state=state,
                retry_in_s=round(failure.delay, 3) if state == "queued" else None,
            )
        return None
