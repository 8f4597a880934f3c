"""The worker: lease jobs, run their handlers, complete or fail them, stop well.

One process serves its queues with ``concurrency`` slots. Async handlers run on
the event loop; sync handlers run in a thread pool of the same size. The loop
leases up to half of its free slots in one round trip, when NOTIFY says a queue
got jobs, when slots free while more may be waiting, at the next scheduled
``run_at`` it knows of, or when the poll interval passes. While more jobs are
waiting, the next lease is sent before the jobs just leased start, so the
server leases while the worker starts a batch.

Transactional tasks run inside a transaction on a pooled connection and the
worker completes the job in that same transaction, fenced by the lease token:
if the lease was lost, the completion changes no row and the whole transaction
rolls back. Non-transactional tasks hold no transaction while they run; their
completions are buffered and written in one statement per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.errors import LockNotAvailable
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgqueue import _sql, eager, migrations
from pgqueue.app import App
from pgqueue.errors import (
    ConfigurationError,
)
from pgqueue.execution import (
    FAIL_FLUSH_MAX,
    FAIL_TRIES,
    FLUSH_MAX,
    Attempt,
    Counters,
    Failure,
    JobExecution,
    completions,
)
from pgqueue.handler_conn import AsyncHandlerConnection, close_anyway
from pgqueue.jobs import Job, jobs_from_lease
from pgqueue.limits import MAX_SECONDS, MIN_LEASE
from pgqueue.liveness import NoAnswer, fetch_within, with_liveness_defaults
from pgqueue.log import get_logger, is_info_enabled
from pgqueue.txbatch import TxBatcher
from pgqueue.txbatch_async import AsyncTxBatcher
from pgqueue.wakeup import Wakeup


def _may_have_committed(error: Exception) -> bool:
    """After this error, did the statement perhaps commit all the same? Only
    when its connection was lost (or gave no answer) with the statement sent:
    not when the pool had no connection to give, nor when the server answered
    that it cancelled the statement."""
    if isinstance(error, (PoolTimeout, LockNotAvailable)):  # answered: not done
        return False
    if isinstance(error, NoAnswer):
        return not error.cancelled
    return isinstance(error, psycopg.OperationalError)


def _unsent(attempt: Attempt, error: Exception) -> bool:
    """After a write of this attempt's completion or failure failed alone:
    did it fail on the way (a lost connection, no answer, a row lock another
    session holds) rather than being refused? Then no try counts against it,
    as for a whole batch, and it is marked unconfirmed if it may have
    committed all the same."""
    if not isinstance(error, psycopg.OperationalError):
        return False
    if _may_have_committed(error):
        attempt.unconfirmed = True
    return True


def _due_now(attempts: Iterable[Attempt]) -> bool:
    """Some of these completions or failures is not set aside (_park), or is
    due again."""
    now = time.monotonic()
    return any(attempt.parked_until <= now for attempt in attempts)


def _next_limit(limit: int, sent: int, error: Exception | None, most: int) -> int:
    """The batch size after a batch of ``sent`` ended with ``error``."""
    if isinstance(error, NoAnswer) and error.cancelled:
        return max(1, sent // 2)
    if error is None:
        return min(most, limit * 2)
    return limit


# Seconds before a failed heartbeat is tried again.
HEARTBEAT_RETRY = 0.5

# A batch that falls back to savepoints gives each job that wrote a
# subtransaction id; past 64 in one transaction PostgreSQL's per-backend cache
# of them overflows, and every snapshot on the server gets slower.
MAX_TX_BATCH = 64
PRUNE_BATCH = 10_000  # finished jobs deleted per prune statement
# An enqueue NOTIFYs only while some worker holds the listening locks (0016).
# A worker takes them before it waits, and lets them go after this many full
# leases in a row (a backlog: it leases again without waiting). While a
# producer's transaction that sent no NOTIFY keeps them from being taken, the
# worker leases and tries again, after a pause that grows to LISTEN_RETRY_MAX.
FULL_LEASES_BEFORE_QUIET = 2
LISTEN_RETRY_MAX = 0.1


_EAGER_TASKS = sys.version_info >= (3, 12)


def _new_task(
    coro: Coroutine[Any, Any, None], context: contextvars.Context
) -> asyncio.Task[None]:
    """A Task for ``coro`` that runs in ``context``, started at once (eagerly)
    where Python can."""
    loop = asyncio.get_running_loop()
    if _EAGER_TASKS:
        return asyncio.Task(coro, loop=loop, eager_start=True, context=context)  # type: ignore[call-arg,unused-ignore]
    # A Task made inside a context runs in a copy of it (create_task's context=
    # is 3.11+).
    return context.run(loop.create_task, coro)


class Worker(JobExecution):
    """Runs the tasks of an :class:`App` from the given queues.

    Args:
        app: the tasks and connection settings.
        queues: the queues to serve.
        concurrency: jobs run at once (event-loop tasks and threads).
        prefetch: jobs leased ahead of free slots, started the moment a slot
            frees. Raises the throughput of short jobs; keep it 0 for long ones,
            so that jobs wait in the queue where an idle worker can take them.
        tx_batch: up to this many transactional jobs share one transaction
            and one completion statement; when one fails, the others run again
            each in its own savepoint (see pgqueue/txbatch.py). 1 is off.
        lease_seconds: lease length; heartbeats renew it every third of it. A
            crashed worker's jobs run again this long after its last heartbeat.
        poll_interval: the longest wait between two looks at the queue when no
            notification arrives (LISTEN down, or a pooler without LISTEN).
        shutdown_grace: on SIGTERM/SIGINT, how long in-flight jobs may finish
            before they are handed back.
        until_empty: exit once nothing is due and nothing is running.
        reap_interval: seconds between two reaps of expired leases (default:
            half the lease, at most 15 s).
        prune_interval: seconds from the end of one prune round to the next
            (+-10 %); a round deletes every finished job older than
            ``retention``, in batches.
        retention: how long finished jobs are kept; None: this worker never
            prunes (prune with ``pgqueue prune`` instead).
        listen: use LISTEN/NOTIFY, and hold the listening locks while waiting
            so that enqueues NOTIFY (sql/migrations/0016). False: poll only and
            take no session lock, e.g. behind PgBouncer in transaction mode.
        db_timeout: the longest the worker waits for the answer to one of its
            own statements (lease, completions, failures, heartbeat, reap,
            prune, hand back) before it takes the connection for dead, closes
            it and goes on with a new one (pgqueue/liveness.py); and for a
            pooled connection to run one on. Default: a
            third of the lease, at most 30 s, so that a heartbeat that gets no
            answer is tried again on another connection before the leases it
            was renewing run out. Handlers' statements have no such limit;
            their connections, like all the worker's, get TCP keepalives
            unless the DSN says otherwise.
    """

    def __init__(
        self,
        app: App,
        *,
        queues: list[str] | tuple[str, ...] = ("default",),
        concurrency: int = 10,
        prefetch: int = 0,
        tx_batch: int = 1,
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        shutdown_grace: float = 30.0,
        until_empty: bool = False,
        listen: bool = True,
        reap_interval: float | None = None,
        prune_interval: float = 300.0,
        retention: timedelta | None = timedelta(days=7),
        worker_id: str | None = None,
        handle_signals: bool = True,
        db_timeout: float | None = None,
    ) -> None:
        if concurrency < 1 or prefetch < 0 or not 1 <= tx_batch <= MAX_TX_BATCH:
            raise ConfigurationError(
                f"concurrency must be >= 1, prefetch >= 0, tx_batch 1..{MAX_TX_BATCH}"
            )
        seconds = {
            "lease_seconds": lease_seconds,
            "poll_interval": poll_interval,
            "shutdown_grace": shutdown_grace,
            "prune_interval": prune_interval,
            "reap_interval": reap_interval,
            "db_timeout": db_timeout,
        }
        for name, value in seconds.items():
            # NaN passes every comparison, and the database refuses a lease of
            # 1e300 s at every lease (interval out of range).
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value <= MAX_SECONDS
            ):
                raise ConfigurationError(
                    f"{name} must be a number of seconds from 0 to {MAX_SECONDS:g},"
                    f" got {value!r}"
                )
        if reap_interval is not None and 0 < reap_interval < 0.1:
            raise ConfigurationError(
                "reap_interval must be at least 0.1 s (0: the default),"
                f" got {reap_interval}"
            )
        if retention is not None and retention > timedelta(days=366 * 100):
            raise ConfigurationError(f"retention is over 100 years: {retention}")
        if lease_seconds < MIN_LEASE:
            raise ConfigurationError(
                f"lease_seconds must be at least {MIN_LEASE:g}, got {lease_seconds}"
            )
        if poll_interval <= 0:
            raise ConfigurationError(
                f"poll_interval must be positive, got {poll_interval}"
            )
        if db_timeout is not None and not db_timeout > 0:
            raise ConfigurationError(f"db_timeout must be positive, got {db_timeout}")
        if not queues:
            raise ConfigurationError("give at least one queue")
        if prune_interval <= 0 or (retention is not None and retention < timedelta()):
            raise ConfigurationError(
                "the prune interval must be positive and the retention not negative"
            )
        from pgqueue.producer import check_queue

        self.app = app
        self.queues = [check_queue(q) for q in dict.fromkeys(queues)]
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.tx_batch = tx_batch
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.shutdown_grace = shutdown_grace
        self.until_empty = until_empty
        self.listen = listen
        self.reap_interval = reap_interval or max(0.5, min(lease_seconds / 2, 15.0))
        self.prune_interval = prune_interval
        self.retention = retention
        self.worker_id = worker_id or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.handle_signals = handle_signals
        self.db_timeout = db_timeout or min(lease_seconds / 3, 30.0)
        self._lock_wait_ms = max(1, min(2000, int(self.db_timeout * 250)))
        # The DSN every connection of the worker uses (run_async sets it): the
        # app's, with keepalives and timeouts where it names none.
        self._dsn = ""
        self.counters = Counters()
        self._stmts = _sql.statements(app.schema)
        self._log = get_logger(worker_id=self.worker_id)
        self._log_info = is_info_enabled(self._log)
        # By attempt, not job id: a timed-out attempt keeps its slot until its
        # thread returns, and its job may be leased here again meanwhile.
        self._running: set[Attempt] = set()
        self._ready: deque[Job] = deque()  # leased, waiting for a free slot
        # Taken out of _ready because their queue was paused, being handed
        # back (_on_pause); the heartbeat keeps their leases meanwhile.
        self._pausing: list[Job] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        # Pauses heard of so far, and the count at each queue's last pause: a
        # lease on its way as a pause committed may return the queue's jobs.
        self._pauses = 0
        self._paused_at: dict[str, int] = {}
        self._done: list[tuple[Attempt, str | None]] = []
        # The completions whose statement is on its way: the heartbeat renews
        # their leases too (a statement on a connection gone silent waits up
        # to db_timeout before it is sent again).
        self._writing: list[tuple[Attempt, str | None]] = []
        # Completions and failures per statement: halved after a statement the
        # server cancelled at the deadline (too slow: a trigger on the history,
        # a loaded server), doubled again after each one written, up to the
        # most (a batch that always outlasts the deadline was retried whole).
        self._flush_limit = FLUSH_MAX
        self._fail_limit = FAIL_FLUSH_MAX
        self._failed: list[Failure] = []  # failures the flusher has yet to write
        # Wakes the flusher when the first completion or failure set aside is
        # due (_look_again_when_due).
        self._parked_timer: asyncio.TimerHandle | None = None
        self._dispatching = False  # _dispatch is starting jobs
        # Below this many free slots, wait for more to free before leasing, so
        # a busy worker leases in batches rather than one job per round trip.
        self._batch_min = max(1, min((concurrency + prefetch) // 4, 100))
        # The most one lease takes: half the slots, so that another lease can be
        # on its way while a batch starts (_lease_ahead).
        self._lease_max = -(-(concurrency + prefetch) // 2)
        # (limit, notifications seen when sent, the lease Task): see _lease_ahead.
        self._ahead: tuple[int, int, asyncio.Task[list[tuple[Any, ...]]]] | None = None
        # The lease the loop waits for (not sent ahead), until it has its rows.
        self._leasing: asyncio.Future[list[tuple[Any, ...]]] | None = None
        # NOTIFYs received so far: a lease that comes back short clears _due
        # only if none arrived while it was on its way.
        self._notified = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._job_context = contextvars.Context()
        self._stopping = False
        self._shutting_down = False
        self._registered = False  # its row in workers was written
        self._signals_installed = False
        self._grace_over = asyncio.Event()  # a cancel in the grace ends it
        self._due = True
        self._next_due_at: float | None = None
        self._due_again = 0.0  # seconds: see _plan_next_due
        self._wake: Wakeup | None = None
        # The lease loop's own connection: no pool checkout on the path from a
        # NOTIFY to a leased job, and its prepared lease statement stays warm.
        self._lease_conn: psycopg.AsyncConnection[Any] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        # The lease connection while it holds the listening locks (0016).
        self._listening_on: psycopg.AsyncConnection[Any] | None = None
        self._full_leases = 0  # in a row
        self._listen_failures = 0  # in a row
        self._flush: asyncio.Event | None = None
        self._flush_lock = asyncio.Lock()
        self._pool: AsyncConnectionPool | None = None
        self._local = threading.local()
        self._thread_conns: list[psycopg.Connection[Any]] = []
        self._thread_conns_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._tx_batcher: TxBatcher | None = None
        self._async_batcher: AsyncTxBatcher | None = None

    # -- public control ---------------------------------------------------------

    def run(self) -> None:
        """Run until stopped (signal, :meth:`stop`, or ``until_empty``)."""
        asyncio.run(self.run_async())

    def stop(self) -> None:
        """Ask the worker to stop gracefully; safe from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._request_stop)
        else:
            self._stopping = True

    async def run_async(self) -> None:
        """The worker's main coroutine."""
        self._loop = asyncio.get_running_loop()
        # What every job's Task starts from (a copy each): the context of the
        # code that started the worker. A job's Task is created where a slot
        # frees, inside the job that ended there, and would otherwise inherit
        # the context variables that job set (a tenant, a trace span).
        self._job_context = contextvars.copy_context()
        self._wake = Wakeup(self._loop)
        self._flush = asyncio.Event()
        self._grace_over = asyncio.Event()
        dsn = self._dsn = with_liveness_defaults(self.app.dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.check_up_to_date(conn, self.app.schema)
        tasks = list(self.app.tasks.values())
        # The pool serves completion, heartbeat, failures and maintenance (the
        # lease loop has its own connection); async transactional handlers
        # each hold one more while they run.
        handler_conns = self.tx_batch == 1 and any(
            t.is_async and t.transactional for t in tasks
        )
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=2,
            max_size=4 + (self.concurrency if handler_conns else 0),
            kwargs={"autocommit": True, "application_name": "pgqueue-worker"},
            connection_class=AsyncHandlerConnection,
            open=False,
        )
        # Whatever startup opened is closed again if a later step fails (the
        # database refuses register_worker, say) or run_async is cancelled
        # before the lease loop runs: a host that starts workers again does
        # not pile up pools, threads and signal handlers.
        background: list[asyncio.Task[Any]] = []
        try:
            await self._pool.open(wait=True, timeout=30)
            await self._start_up(tasks, background)
            await self._lease_loop()
        finally:
            await self._shut_down_whole(background)

    async def _start_up(
        self, tasks: list[Any], background: list[asyncio.Task[Any]]
    ) -> None:
        """Threads, batchers, signal handlers, the worker's row, and the
        background tasks (added to ``background`` as they start)."""
        assert self._loop is not None
        dsn = self._dsn
        if any(not t.is_async for t in tasks):
            self._executor = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="pgqueue-job"
            )
        if self.tx_batch > 1 and any(not t.is_async and t.transactional for t in tasks):
            # concurrency slots shared by batches of tx_batch: fewer threads (and
            # connections) than slots, so jobs wait where a batch can take them.
            self._tx_batcher = TxBatcher(
                self._new_connection,
                threads=-(-self.concurrency // self.tx_batch),
                max_jobs=self.tx_batch,
                complete_all=self._stmts.complete_all,
                complete_one=self._stmts.complete_one,
            )
        if self.tx_batch > 1 and any(t.is_async and t.transactional for t in tasks):
            self._async_batcher = AsyncTxBatcher(
                self._new_async_connection,
                lanes=-(-self.concurrency // self.tx_batch),
                max_jobs=self.tx_batch,
                complete_all=self._stmts.complete_all,
                complete_one=self._stmts.complete_one,
            )
        if self.handle_signals:
            self._signals_installed = True
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._on_signal, sig)
        await self._register()
        self._registered = True
        self._log.info(
            "worker_started",
            queues=self.queues,
            concurrency=self.concurrency,
            tasks=sorted(self.app.tasks),
        )
        self._heartbeat_task = asyncio.create_task(self._heartbeater())
        background += [
            asyncio.create_task(self._flusher()),
            self._heartbeat_task,
            asyncio.create_task(self._maintainer()),
        ]
        if self.retention is not None:
            background.append(
                asyncio.create_task(self._pruner(self.retention.total_seconds()))
            )
        if self.listen:
            from pgqueue.listener import Listener

            listener = Listener(
                dsn,
                self.app.schema,
                self.queues,
                self._on_notify,
                on_pause=self._on_pause,
                log=self._log,
                db_timeout=self.db_timeout,
            )
            background.append(asyncio.create_task(listener.run()))

    # -- the lease loop -----------------------------------------------------------

    def _on_notify(self) -> None:
        self._notified += 1
        self._due = True
        self._wake_up()

    def _on_pause(self, queue: str) -> None:
        """``queue`` was paused (0024): hand back its jobs leased ahead, which
        would otherwise start for all the pause. Running jobs finish."""
        self._pauses += 1
        self._paused_at[queue] = self._pauses
        if self._shutting_down:  # shutdown hands back what is in _ready
            return
        paused = [job for job in self._ready if job.queue == queue]
        if not paused:
            return
        self._ready = deque(job for job in self._ready if job.queue != queue)
        self._hand_back_later(paused)

    def _hand_back_later(self, jobs: list[Job]) -> None:
        self._pausing += jobs
        task = asyncio.ensure_future(self._hand_back_paused(jobs))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _without_paused(
        self, rows: list[tuple[Any, ...]], since: int
    ) -> list[tuple[Any, ...]]:
        """The lease's rows but those of queues paused while it was on its way
        (it may have begun before the pause committed): handed back."""
        if self._shutting_down:  # shutdown hands back what is in _ready
            return rows
        paused = {queue for queue, at in self._paused_at.items() if at > since}
        back = [row for row in rows if row[1] in paused]
        if not back:
            return rows
        self.counters.leased += len(back)
        self._hand_back_later(jobs_from_lease(back))
        return [row for row in rows if row[1] not in paused]

    async def _hand_back_paused(self, jobs: list[Job]) -> None:
        try:
            handed = set(await self._hand_back(jobs))
        finally:
            mine = {id(job) for job in jobs}
            self._pausing = [job for job in self._pausing if id(job) not in mine]
        # Not handed back (the database failed, a row locked): they run after
        # all, rather than wait out their leases and be counted as an attempt.
        left = [job for job in jobs if job.id not in handed]
        self._ready.extendleft(reversed(left))
        if self._stopping or self._shutting_down:
            return  # the shutdown hands back what is in _ready
        self._dispatch()
        self._wake_up()  # the slots they held are free: lease from other queues

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_signal(self, sig: int) -> None:
        if self._stopping:
            self._log.warning("worker_killed", signal=signal.Signals(sig).name)
            os._exit(128 + sig)
        self._log.info("worker_stopping", signal=signal.Signals(sig).name)
        self._request_stop()

    def _request_stop(self) -> None:
        self._stopping = True
        self._wake_up()

    def _all_written(self) -> bool:
        """Nothing leased is running, waiting or still to be written."""
        return not (
            self._running or self._ready or self._pausing or self._done or self._failed
        )

    def _free(self) -> int:
        held = len(self._running) + len(self._ready) + len(self._pausing)
        return self.concurrency + self.prefetch - held

    async def _lease_loop(self) -> None:
        assert self._wake is not None and self._loop is not None
        backoff = 0.05
        try:
            while not self._stopping:
                self._wake.clear()
                if self._ahead is not None:
                    limit, notified, sent = self._ahead
                    # asyncio.wait, not await: cancelling this loop must not
                    # cancel the lease, whose jobs the finally below takes.
                    await asyncio.wait({sent})
                    self._ahead = None
                    leasing: asyncio.Future[list[tuple[Any, ...]]] = sent
                    settled = False
                else:
                    free = self._free()
                    now = self._loop.time()
                    if self._next_due_at is not None and now >= self._next_due_at:
                        self._next_due_at = None
                        self._due = True
                    # _batch_min holds back a worker with a backlog (its last
                    # lease came back full, more will come as slots free).
                    # Without one, a due job takes any free slot: with 7 of 8
                    # slots on long jobs, a new job waited for one of them.
                    if not (
                        self._due
                        and free > 0
                        and (
                            free >= self._batch_min
                            or not (self._running or self._ready)
                            or self._full_leases == 0
                        )
                    ):
                        if self.until_empty and self._all_written():
                            # Everything leased has finished and is written: one
                            # more look, and the lease exits if nothing is due.
                            self._due = True
                            continue
                        if self.listen and not self._due and not self._listening():
                            await self._start_listening()
                            continue
                        await self._wait(self._wait_time())
                        if not self._wake.is_set():
                            self._due = True  # the poll interval passed: look again
                        continue
                    limit = min(free, self._lease_max)
                    notified = self._notified
                    # Sent once everything leased was written (a retry for now
                    # included), a lease that comes back empty ends an
                    # until-empty worker: its snapshot is younger than them.
                    settled = self._all_written()
                    # A future, awaited through asyncio.wait as the lease ahead
                    # is: cancelling this loop (run_async cancelled from
                    # outside) must not drop rows the server leased.
                    leasing = self._leasing = eager.future(self._lease_rows(limit))
                    await asyncio.wait({leasing})
                    self._leasing = None
                try:
                    rows = leasing.result()
                    backoff = 0.05
                except Exception as exc:
                    self._log.warning("lease_failed", error=repr(exc))
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                full = len(rows) == limit
                # A backlog: a full lease of at least _batch_min jobs (one of
                # the single free slot, full, says nothing of what waits).
                backlog = full and limit >= self._batch_min
                self._full_leases = self._full_leases + 1 if backlog else 0
                if rows:
                    self._due_again = 0.0
                if full and not self._stopping:
                    self._lease_ahead(len(rows))
                self._ready.extend(self._jobs(rows))
                if self._stopping:
                    break  # shutdown hands them back
                self._dispatch()
                if len(rows) < limit:
                    if self._notified == notified:
                        self._due = False
                    if self.until_empty and settled and self._all_written():
                        return
                    if rows and not _EAGER_TASKS:
                        # Let the Tasks just created take their first step: the
                        # next_run_at call below held them back by 0.3 ms, the
                        # quarter of an idle worker's pickup latency (2 cores).
                        await asyncio.sleep(0)
                    await self._plan_next_due()
        finally:
            # A lease in flight that nobody awaited (sent ahead, or the loop
            # was cancelled): its jobs go to _ready, which shutdown hands back,
            # so none of them waits out its lease.
            for unawaited in self._unawaited_leases():
                with contextlib.suppress(Exception):
                    self._ready.extend(self._jobs(await unawaited))

    def _unawaited_leases(self) -> list[asyncio.Future[list[tuple[Any, ...]]]]:
        sent: list[asyncio.Future[list[tuple[Any, ...]]]] = []
        if self._leasing is not None:
            sent.append(self._leasing)
        if self._ahead is not None:
            sent.append(self._ahead[2])
        self._leasing = self._ahead = None
        return sent

    def _lease_ahead(self, arrived: int) -> None:
        """Send the next lease before starting the jobs that just arrived.

        A full lease means more jobs are waiting. Starting a batch of short jobs
        takes the worker about as long as the server takes to lease the next
        one, so the next lease goes out first (its statement is on the wire when
        this returns) and the two overlap; the loop awaits it next. Only while
        the jobs just leased leave enough slots free: each lease takes at most
        half of them (_lease_max), so a busy worker keeps one batch in hand
        and one on its way.
        """
        free = self._free() - arrived
        if free >= self._batch_min:
            limit = min(free, self._lease_max)
            try:
                sent = eager.start(self._lease_rows(limit))
            except Exception as exc:  # the loop leases again as usual
                self._log.warning("lease_failed", error=repr(exc))
                return
            if sent is not None:  # always: a lease waits for the server
                self._ahead = (limit, self._notified, sent)
                self.counters.leases_ahead += 1

    def _wait_time(self) -> float:
        assert self._loop is not None
        wait = self.poll_interval
        if self._next_due_at is not None:
            wait = min(wait, max(0.0, self._next_due_at - self._loop.time()))
        return wait

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        await self._wake.wait(seconds)

    async def _lease_rows(self, limit: int) -> list[tuple[Any, ...]]:
        if self._full_leases >= FULL_LEASES_BEFORE_QUIET and self._listening():
            await self._stop_listening()
        pauses = self._pauses
        rows = await self._fetch_leasing(
            self._stmts.lease, [self.queues, limit, self.worker_id, self.lease_seconds]
        )
        return rows if self._pauses == pauses else self._without_paused(rows, pauses)

    # -- the listening locks (sql/migrations/0016) --------------------------------

    def _listening(self) -> bool:
        """True while the lease connection holds the listening locks (a new
        connection holds none)."""
        conn = self._listening_on
        return (
            conn is not None
            and conn is self._lease_conn
            and not conn.closed
            and not conn.broken
        )

    async def _start_listening(self) -> None:
        """Take the listening locks before waiting, then look once more.

        Once they are held, every enqueue NOTIFYs; an enqueue that did not has
        committed (start_listening waited for it), and the lease that follows
        sees its job. When a producer's transaction stays open, the lease
        runs anyway and this is tried again after a pause.
        """
        try:
            rows = await self._fetch_leasing(self._stmts.start_listening, [])
            taken = bool(rows and rows[0][0])
        except Exception as exc:
            self._log.warning("start_listening_failed", error=repr(exc))
            await self._drop_lease_conn()  # whatever it took goes with it
            taken = False
        if taken:
            self._listening_on = self._lease_conn
            self._listen_failures = 0
        else:
            self._listen_failures += 1
            await self._sleep(
                min(LISTEN_RETRY_MAX, 0.005 * 2 ** min(self._listen_failures, 5))
            )
        self._due = True

    async def _stop_listening(self) -> None:
        """Let the listening locks go: a backlog, enqueues need not NOTIFY."""
        self._listening_on = None
        try:
            await self._fetch_leasing(self._stmts.stop_listening, [])
        except Exception as exc:
            # Some may still be held: they go with the connection.
            self._log.warning("stop_listening_failed", error=repr(exc))
            await self._drop_lease_conn()

    async def _drop_lease_conn(self) -> None:
        conn, self._lease_conn = self._lease_conn, None
        self._listening_on = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _wait(self, seconds: float) -> None:
        """Sleep until woken, or ``seconds`` pass.

        While the lease connection holds the listening locks, its socket is
        watched too: a backend that goes away (terminated, idle_session_timeout,
        a proxy closing it) takes the locks with it, after which no enqueue
        NOTIFYs; the server's goodbye wakes the loop, which reconnects.
        """
        conn = self._listening_on
        if conn is None or not self._listening():
            await self._sleep(seconds)
            return
        assert self._loop is not None
        fd = conn.pgconn.socket
        self._loop.add_reader(fd, self._lease_conn_stirred, conn, fd)
        try:
            await self._sleep(seconds)
        finally:
            self._loop.remove_reader(fd)

    def _lease_conn_stirred(self, conn: psycopg.AsyncConnection[Any], fd: int) -> None:
        """The server wrote to the idle lease connection: read it; if the
        connection is lost, so are the listening locks."""
        assert self._loop is not None
        self._loop.remove_reader(fd)
        try:
            conn.pgconn.consume_input()
            lost = conn.pgconn.status != ConnStatus.OK
        except psycopg.Error:
            lost = True
        if lost and self._listening_on is conn:
            self._listening_on = None
            self._log.warning("lease_connection_lost")
        self._due = True
        self._wake_up()

    def _jobs(self, rows: list[tuple[Any, ...]]) -> list[Job]:
        self.counters.lease_calls += 1
        self.counters.leased += len(rows)
        return jobs_from_lease(rows)

    async def _plan_next_due(self) -> None:
        """Remember when the next scheduled job of our queues is due."""
        assert self._loop is not None
        try:
            rows = await self._fetch_leasing(self._stmts.next_run_at, [self.queues])
        except Exception as exc:
            self._log.warning("next_run_at_failed", error=repr(exc))
            return
        seconds = rows[0][0] if rows else None
        now = self._loop.time()
        if seconds is None:
            at = None
            self._due_again = 0.0
        elif seconds > 0:
            at = now + float(seconds)
            self._due_again = 0.0
        else:
            # A job is due, yet the lease just now came back short: its row is
            # locked (by a transaction of another session, or a lease on its
            # way), or it fell due in between. Look again soon, but not at
            # once: while a lock is held, that was a lease and a next_run_at
            # per round trip, thousands a second. 10 ms, then twice as long
            # each time, up to the poll interval.
            self._due_again = min(max(0.01, self._due_again * 2), self.poll_interval)
            at = now + self._due_again
        # A retry this worker scheduled a moment ago (_retries_scheduled) may
        # not have been committed when this looked: the earlier time stands.
        # Kept even when it has passed: the loop looks at once, and clears it.
        kept = self._next_due_at
        if kept is not None and (at is None or kept < at):
            at = kept
        self._next_due_at = at

    def _retries_scheduled(self, delays: list[float]) -> None:
        """This worker just put jobs back in the queue for these many seconds
        (their failures are written): look again when the first is due. No
        NOTIFY says so, and an idle worker would wait for its next poll."""
        if not delays or self._loop is None:
            return
        at = self._loop.time() + max(0.0, min(delays))
        if self._next_due_at is None or at < self._next_due_at:
            self._next_due_at = at
        self._wake_up()

    # -- running one job ----------------------------------------------------------

    def _start(self, job: Job) -> None:
        attempt = Attempt(job=job, started=time.perf_counter())
        self._running.add(attempt)
        # Each job runs in a Task of its own, current while its handler runs:
        # asyncio.timeout, TaskGroup, wait_for on 3.12 and anyio (httpx) need
        # one, and a handler started in the lease loop's frame (eager.start)
        # cancelled that loop when its own timeout fired. On 3.12 and later the
        # Task starts eagerly: a handler that never waits finishes here.
        try:
            future = _new_task(self._run_then_finish(attempt), self._job_context.copy())
        except BaseException:
            self._running.discard(attempt)
            raise
        if not future.done():  # else it ran to its end here (3.12's eager start)
            attempt.future = future

    async def _run_then_finish(self, attempt: Attempt) -> None:
        # _finished from inside the Task, not as its done callback: a callback
        # is one more trip through the event loop per job.
        try:
            await self._run(attempt)
        finally:
            self._finished(attempt)

    def _dispatch(self) -> None:
        if self._dispatching:  # a job that ended as it started: the loop goes on
            return
        self._dispatching = True
        try:
            while self._ready and len(self._running) < self.concurrency:
                self._start(self._ready.popleft())
        finally:
            self._dispatching = False

    def _finished(self, attempt: Attempt) -> None:
        self._running.discard(attempt)
        if not (self._stopping or self._shutting_down):
            self._dispatch()
        self._wake_up()

    # -- background loops ---------------------------------------------------------

    async def _flusher(self) -> None:
        """Write buffered completions and failures, a statement per batch."""
        assert self._flush is not None
        while True:
            await self._flush.wait()
            self._flush.clear()
            await self._flush_now()
            if self.until_empty:
                self._wake_up()  # perhaps the last completions: see _lease_loop

    async def _flush_now(self) -> None:
        # One writer at a time: shutdown's final flush waits for a write in
        # progress instead of cancelling it (its jobs would stay leased).
        async with self._flush_lock:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        backoff = 0.05
        while True:
            completions = _due_now(attempt for attempt, _ in self._done)
            failures = _due_now(failure.attempt for failure in self._failed)
            if not (completions or failures):
                break
            # Bounded statements: a backlog (after a database blip) is written
            # in slices rather than one giant array. Completions and failures
            # take turns, so a failure is not kept waiting by a steady stream of
            # completions (its retry or dead-lettering would wait for a lull).
            # Not after a completion write failed, though: a failure's writes
            # are counted (FAIL_TRIES), and while the connection fails they
            # would be given up within a second, each then waiting for reap.
            written = True
            if completions:
                written = await self._flush_completions()
            if failures and written:
                written = await self._flush_failures()
            if not written:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self._look_again_when_due()

    def _look_again_when_due(self) -> None:
        """Wake the flusher when the first write set aside (_park) is due.
        One timer at a time: each flush set one before, thousands of them
        while a completion waited for a lock on a busy worker."""
        parked = [attempt for attempt, _ in self._done]
        parked += [failure.attempt for failure in self._failed]
        if not parked or self._loop is None:
            return
        delay = max(0.0, min(a.parked_until for a in parked) - time.monotonic())
        when = self._loop.time() + delay
        timer = self._parked_timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._parked_timer = self._loop.call_at(when, self._parked_due)

    def _parked_due(self) -> None:
        self._parked_timer = None
        if self._flush is not None:
            self._flush.set()

    def _park(self, attempt: Attempt, event: str) -> None:
        """Set a completion or failure aside whose row another session holds
        locked (55P03 after _lock_wait_ms, 0020): 1 s, then twice as long each
        time, up to 30 s. Written with the others, it held them all up."""
        attempt.parked_until = time.monotonic() + min(30.0, 2.0**attempt.parks)
        attempt.parks += 1
        self._log.warning(
            event,
            job_id=attempt.job.id,
            detail="another session holds the job's row; tried again later",
        )

    async def _flush_completions(self) -> bool:
        """Write the oldest completions; False if some are left to try again.

        One statement holds each job once: a job reaped and leased here again
        can have two attempts done at once, and the one whose lease was lost
        waits for the next statement. A batch the database refuses for what
        it holds (not for a lost connection) is written again one completion
        at a time, and one refused FAIL_TRIES times is given up: its lease
        expires and the job runs again.
        """
        batch: list[tuple[Attempt, str | None]] = []
        later: list[tuple[Attempt, str | None]] = []
        ids: set[int] = set()
        now = time.monotonic()
        for item in self._done:
            job_id = item[0].job.id
            if (
                len(batch) < self._flush_limit
                and job_id not in ids
                and item[0].parked_until <= now
            ):
                ids.add(job_id)
                batch.append(item)
            else:
                later.append(item)
        self._done = later
        # Renewed by the heartbeat until written or back in _done, the one at
        # a time writes below included.
        self._writing = batch
        try:
            return await self._write_completion_batch(batch)
        finally:
            self._writing = []

    async def _write_completion_batch(
        self, batch: list[tuple[Attempt, str | None]]
    ) -> bool:
        error = await self._write_completions(batch)
        self._flush_limit = _next_limit(self._flush_limit, len(batch), error, FLUSH_MAX)
        if error is None:
            return True
        if _may_have_committed(error):
            for attempt, _ in batch:
                attempt.unconfirmed = True
        locked = isinstance(error, LockNotAvailable)
        if isinstance(error, psycopg.OperationalError) and not locked:
            self._done[:0] = batch
            return False
        # Refused, or a row lock met: each written alone, so that one the
        # database refuses or another session holds holds up no other.
        left: list[tuple[Attempt, str | None]] = []
        parked: list[tuple[Attempt, str | None]] = []
        for item in batch:
            alone = (
                error
                if len(batch) == 1
                else await self._write_completions([item], quiet=True)
            )
            if isinstance(alone, LockNotAvailable):
                self._park(item[0], "complete_waits_for_lock")
                parked.append(item)
            elif alone is not None and (
                _unsent(item[0], alone) or self._complete_tried(item[0])
            ):
                left.append(item)
        self._done[:0] = left
        self._done.extend(parked)
        return not left

    def _complete_tried(self, attempt: Attempt) -> bool:
        """Count a refused completion; False once it is given up."""
        attempt.refused += 1
        if attempt.refused < FAIL_TRIES:
            return True
        self._log.warning(
            "complete_given_up",
            job_id=attempt.job.id,
            detail="not recorded; the lease expires and the job runs again",
        )
        return False

    async def _flush_failures(self) -> bool:
        """Write the oldest failures; False if some are left to try again.

        They stay in ``_failed`` until written, so the heartbeat keeps their
        leases and an until-empty worker does not stop before a retry it just
        scheduled. A batch that fails is written again one failure at a time,
        so one that cannot be written does not hold up the others; a failure
        whose write failed FAIL_TRIES times is given up, and its lease expires
        (reap then counts the attempt), as before failures were batched. Not
        when the connection was lost (or gave no answer): the batch is kept
        whole, for the next try, and no write is counted against it. One whose
        row another session holds locked is set aside (_park), as a completion
        is: retried at once, it held up every write of the worker behind it.
        """
        now = time.monotonic()
        batch = [f for f in self._failed if f.attempt.parked_until <= now]
        batch = batch[: self._fail_limit]
        error = await self._write_failures(batch)
        self._fail_limit = _next_limit(
            self._fail_limit, len(batch), error, FAIL_FLUSH_MAX
        )
        if error is None:
            self._forget_failures(batch, [])
            return True
        if isinstance(error, psycopg.OperationalError) and not isinstance(
            error, LockNotAvailable
        ):
            if _may_have_committed(error):
                for failure in batch:
                    failure.attempt.unconfirmed = True
            return False
        left = []
        for failure in batch:
            alone = (
                error
                if len(batch) == 1
                else await self._write_failures([failure], quiet=True)
            )
            if alone is None:
                continue
            if isinstance(alone, LockNotAvailable):
                self._park(failure.attempt, "fail_waits_for_lock")
                left.append(failure)
                continue
            if _unsent(failure.attempt, alone):
                left.append(failure)
                continue
            failure.tries += 1
            if failure.tries < FAIL_TRIES:
                left.append(failure)
            else:
                self._log.warning(
                    "fail_given_up",
                    job_id=failure.attempt.job.id,
                    detail="not recorded; the lease expires and reap counts it",
                )
        self._forget_failures(batch, left)
        return not _due_now(failure.attempt for failure in left)

    def _forget_failures(self, batch: list[Failure], left: list[Failure]) -> None:
        """Take the failures of ``batch`` out of ``_failed``, but ``left``,
        which go first (failures added meanwhile stay behind them)."""
        written = {id(failure) for failure in batch}
        rest = [failure for failure in self._failed if id(failure) not in written]
        self._failed[:] = left + rest

    async def _write_completions(
        self, batch: list[tuple[Attempt, str | None]], *, quiet: bool = False
    ) -> Exception | None:
        """Complete a batch in one statement; the error if it failed (the
        flusher keeps the batch and tries again, see _flush_completions)."""
        try:
            rows = await self._fetch(
                self._stmts.complete, completions(batch, self._lock_wait_ms)
            )
        except Exception as exc:
            if not quiet:
                self._log.warning("complete_failed", error=repr(exc), jobs=len(batch))
            return exc
        lost = set(rows[0][0]) if rows else set()
        for attempt, _ in batch:
            if attempt.job.id not in lost:
                self._log_succeeded(attempt)
            elif attempt.unconfirmed:
                self.counters.unconfirmed += 1
                self._log.warning(
                    "job_completion_unconfirmed",
                    job_id=attempt.job.id,
                    detail="an earlier write of this completion lost its"
                    " connection and may have committed; else the lease was lost",
                )
            else:
                self._lease_was_lost(attempt)
        return None

    async def _heartbeater(self) -> None:
        interval = self.lease_seconds / 3
        wait = interval
        while True:
            await asyncio.sleep(wait)
            wait = interval
            # Jobs completed in a batch not yet committed hold their row locks;
            # they are skipped (the reaper skips locked rows too).
            running = [a for a in self._running if not a.timed_out and not a.completing]
            held = [a.job for a in running]
            held += [a.job for a, _ in self._done]
            held += [a.job for a, _ in self._writing]
            held += [f.attempt.job for f in self._failed]
            held += self._ready
            held += self._pausing
            try:
                rows = await self._fetch(
                    self._stmts.heartbeat,
                    [
                        self.worker_id,
                        [job.id for job in held],
                        [job.lease_token for job in held],
                        self.lease_seconds,
                    ],
                )
            except Exception as exc:
                self._log.warning("heartbeat_failed", error=repr(exc))
                # Again soon, on another connection: after a deadline that
                # ran out, a whole interval more could outlast the leases.
                wait = min(interval, HEARTBEAT_RETRY)
                continue
            self.counters.heartbeats += 1
            alive = {row[0] for row in rows}
            # A job that ended while the heartbeat was on its way left the
            # table (or holds its row lock) and is not in ``alive``: only one
            # still in flight here may have lost its lease.
            missed = [
                a
                for a in running
                if a.job.id not in alive
                and not a.lease_lost
                and a in self._running
                and a.in_flight()
            ]
            if missed and await self._leases_lost(missed):
                wait = min(interval, HEARTBEAT_RETRY)

    async def _leases_lost(self, missed: list[Attempt]) -> bool:
        """Report the jobs among ``missed`` (running, not renewed by the last
        heartbeat) whose lease is gone; True if some still hold theirs.

        The heartbeat skips locked rows, and a row is locked by more than a
        completion: a concurrent lease whose FOR UPDATE met the row as this
        worker leased it keeps the lock it took, though its recheck dropped
        the row, until its transaction ends. Such a job kept its lease (a plain
        read shows its token) and is renewed by the next heartbeat, which
        comes sooner. True too when the read fails: nothing is reported then.
        """
        try:
            held = set(
                await self._job_ids(self._stmts.still_leased, [a.job for a in missed])
            )
        except Exception as exc:
            self._log.warning("heartbeat_failed", error=repr(exc))
            return True
        for attempt in missed:
            # Ended while this looked, or the row is still ours: not lost.
            if attempt.job.id in held or not (
                attempt in self._running and attempt.in_flight()
            ):
                continue
            attempt.lease_lost = True
            self._log.warning("job_lease_expired", job_id=attempt.job.id)
        return bool(held)

    async def _register(self) -> None:
        await self._execute(
            self._stmts.register_worker,
            [self.worker_id, socket.gethostname(), os.getpid(), self.queues],
        )

    async def _maintainer(self) -> None:
        """Reap expired leases every reap_interval, and register again: reap
        deletes the rows of workers silent for an hour (a lease of 3 hours
        heartbeats less often; a worker may come back from an hour stopped or
        cut off), and this one's comes back within an interval (0021)."""
        while True:
            await asyncio.sleep(self.reap_interval)
            # First, so that its own reap never deletes its row; apart, so
            # that a failure here never holds up the reaping.
            try:
                await self._register()
            except Exception as exc:
                self._log.warning("register_failed", error=repr(exc))
            try:
                reaped = await self._fetch(self._stmts.reap, [1000])
                for job_id, state in reaped:
                    self._log.warning("job_reaped", job_id=job_id, state=state)
            except Exception as exc:
                self._log.warning("maintenance_failed", error=repr(exc))

    async def _pruner(self, older_than: float) -> None:
        """Prune finished jobs soon after start, then about every prune_interval.

        A task of its own: catching up on a long history must not hold back
        the reaping of crashed workers' jobs. The waits are jittered so that
        workers started together do not all look at once.
        """
        await asyncio.sleep(self.reap_interval * random.uniform(1.0, 2.0))
        while True:
            await self._prune(older_than)
            await asyncio.sleep(self.prune_interval * random.uniform(0.9, 1.1))

    async def _prune(self, older_than: float) -> None:
        """Delete the finished jobs older than ``older_than`` seconds.

        Batch after batch until one comes back short, so that pruning keeps up
        with any rate of completions: one batch of 10,000 per 5-minute round
        (before) fell behind above 33 jobs/s a worker, and the history grew
        without bound. One worker of a schema prunes at a time (the others end
        their round), and it waits between batches as long as the last one
        took (at least 50 ms), so a long backlog leaves the server at least
        half its time.
        """
        total = 0
        lock = _sql.prune_lock_name(self.app.schema)
        while not self._stopping:
            started = time.monotonic()
            try:
                rows = await self._fetch(
                    self._stmts.prune_alone, [lock, older_than, PRUNE_BATCH]
                )
            except Exception as exc:
                self._log.warning("prune_failed", error=repr(exc))
                break
            count = rows[0][0] if rows else None
            if count is None:
                self._log.debug("prune_skipped", reason="another worker is pruning")
                break
            total += count
            if count < PRUNE_BATCH:
                break
            await asyncio.sleep(max(time.monotonic() - started, 0.05))
        if total:
            self._log.info("jobs_pruned", count=total)

    # -- shutdown -----------------------------------------------------------------

    async def _shut_down_whole(self, background: list[asyncio.Task[Any]]) -> None:
        """Run the shutdown to its end even when run_async is cancelled (again)
        meanwhile: a host that stops the worker and then cancels its task, or
        wait_for with less time than the grace. Such a cancel ends the grace
        at once; the hand back and the rest still happen, and the cancel is
        raised after them. (Cut short, the shutdown used to leave jobs leased
        while the heartbeat, still running, kept their leases alive.)"""
        shutdown = asyncio.ensure_future(self._shutdown(background))
        cancelled = False
        while not shutdown.done():
            try:
                await asyncio.shield(shutdown)
            except asyncio.CancelledError:
                cancelled = True
                if shutdown.done():
                    break
                self._grace_over.set()
        if cancelled:
            if not shutdown.cancelled() and shutdown.exception() is not None:
                self._log.error("shutdown_failed", error=repr(shutdown.exception()))
            raise asyncio.CancelledError()
        shutdown.result()

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        # Also when run_async was cancelled from outside: a job that ends in
        # the grace starts no other (_stopping, set by stop() and signals, says
        # whether a signal is the first).
        self._shutting_down = True
        await self._hand_back_unstarted()
        pending = [a.future for a in self._running if a.future is not None]
        if pending:
            self._log.info(
                "worker_draining", jobs=len(pending), grace_s=self.shutdown_grace
            )
            await self._grace(pending)
        # The heartbeat locks the rows it extends (SKIP LOCKED), and hand_back
        # skips locked rows: it ends before the hand back.
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        if self._side_tasks:  # a paused queue's hand back (_on_pause) in flight
            await asyncio.wait(list(self._side_tasks), timeout=self.db_timeout)
        left = list(self._running)
        completing: list[Job] = []
        unstarted = list(self._ready)
        self._ready.clear()
        if left or unstarted:
            for attempt in left:
                attempt.abandoned = True
            # A timed-out attempt whose thread still runs has its failure in
            # _failed: the final flush records it, with the attempt counted.
            # One completing holds its row lock until its transaction ends (a
            # batch may run more handlers first, as long as they take): handed
            # back at the end, once its transaction has committed or been
            # closed (hand_back skips locked rows, 0017).
            completing = [a.job for a in left if not a.failing and a.completing]
            back = [
                a.job for a in left if not a.failing and not a.completing
            ] + unstarted
            handed = set(await self._hand_back(back))
            # A completion that began after `completing` was read locked its
            # row, and hand_back skipped it: tried again with those below.
            completing += [job for job in back if job.id not in handed]
            cancelled = [a.future for a in left if a.future is not None]
            for future in cancelled:
                future.cancel()
            if cancelled:  # asyncio.wait refuses an empty list
                await asyncio.wait(cancelled, timeout=1)
        # A last try for the completions and failures set aside (_park).
        for attempt in [a for a, _ in self._done] + [f.attempt for f in self._failed]:
            attempt.parked_until = 0.0
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_now(), 10)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._parked_timer is not None:  # the loop may be a host's, and live on
            self._parked_timer.cancel()
        if self._registered:
            with contextlib.suppress(Exception):
                await self._execute(self._stmts.unregister_worker, [self.worker_id])
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._tx_batcher is not None:
            self._tx_batcher.stop()
        if self._async_batcher is not None:
            await self._async_batcher.stop()
        with self._thread_conns_lock:
            for conn in self._thread_conns:
                with contextlib.suppress(Exception):
                    close_anyway(conn)  # an abandoned handler may hold it
        if completing:
            with contextlib.suppress(asyncio.TimeoutError):  # the database is down
                await asyncio.wait_for(self._hand_back_completing(completing), 5)
        if self._lease_conn is not None:
            with contextlib.suppress(Exception):
                await self._lease_conn.close()
        if self._pool is not None:
            await self._pool.close(timeout=1.0)
        if self._signals_installed and self._loop is not None:
            # The loop may live on (a host's): a signal that reached these
            # handlers now would find the worker stopped and exit the process.
            self._signals_installed = False
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(sig)
        self._log.info(
            "worker_stopped",
            succeeded=self.counters.succeeded,
            failed=self.counters.failed,
            lease_lost=self.counters.lease_lost,
            unconfirmed=self.counters.unconfirmed,
            leased=self.counters.leased,
            lease_calls=self.counters.lease_calls,
        )

    async def _hand_back_unstarted(self) -> None:
        """Hand back the jobs leased ahead (prefetch) before the grace: none
        of them starts now, and another worker can run them at once rather
        than after the grace. Those not handed back (a row locked for a
        moment) stay in _ready, for the hand back after the grace."""
        if not self._ready:
            return
        handed = set(await self._hand_back(list(self._ready)))
        self._ready = deque(job for job in self._ready if job.id not in handed)

    async def _grace(self, pending: list[asyncio.Future[Any]]) -> None:
        """Wait for the jobs in flight, up to the grace, or until a cancel of
        run_async ends the grace (_shut_down_whole)."""
        everyone = asyncio.ensure_future(asyncio.wait(pending))
        over = asyncio.ensure_future(self._grace_over.wait())
        try:
            await asyncio.wait(
                {everyone, over},
                timeout=self.shutdown_grace,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            everyone.cancel()  # the jobs go on: asyncio.wait cancels none
            over.cancel()

    async def _job_ids(self, query: str, jobs: list[Job]) -> list[int]:
        """Run ``query`` on the jobs' ids and lease tokens; the ids it returns."""
        rows = await self._fetch(
            query, [[job.id for job in jobs], [job.lease_token for job in jobs]]
        )
        return [r[0] for r in rows]

    async def _hand_back(self, jobs: list[Job]) -> list[int]:
        """Hand ``jobs`` back; the ids handed back (none if that failed)."""
        try:
            ids = await self._job_ids(self._stmts.hand_back, jobs)
        except Exception as exc:
            self._log.warning("hand_back_failed", error=repr(exc))
            return []
        self._log.info("jobs_handed_back", job_ids=ids)
        return ids

    async def _hand_back_completing(self, jobs: list[Job]) -> None:
        """Hand back the jobs whose completion was in flight at the hand back
        and did not commit (the connections that held them are closed now).

        A backend may hold its locks a moment after its client went away, and
        hand_back skips locked rows: tried for up to a second.
        """
        deadline = time.monotonic() + 1.0
        while jobs:
            await self._hand_back(jobs)
            try:
                held = set(await self._job_ids(self._stmts.still_leased, jobs))
            except Exception as exc:
                self._log.warning("hand_back_failed", error=repr(exc))
                return
            jobs = [job for job in jobs if job.id in held]
            if not jobs or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)

    # -- database helpers ---------------------------------------------------------

    async def _fetch(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any],
        *,
        rows: bool = True,
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a pooled connection; its rows (none if
        ``rows`` is False: a statement that returns none)."""
        assert self._pool is not None
        try:
            async with self._pool.connection(timeout=self.db_timeout) as conn:
                return await fetch_within(
                    conn, self.db_timeout, query, params, rows=rows
                )
        except NoAnswer as exc:
            if not exc.cancelled:
                await self._drain_pool()
            raise

    async def _fetch_leasing(
        self, query: str, params: list[Any]
    ) -> list[tuple[Any, ...]]:
        """Run a statement of the lease loop on its own connection.

        A connection that broke is replaced on the next call; the error of
        this one goes to the lease loop, which backs off.
        """
        conn = self._lease_conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, application_name="pgqueue-worker"
            )
            try:
                # A job's run_at and created_at in UTC: psycopg converts each
                # timestamptz to the session's time zone, through zoneinfo for
                # any zone but 'UTC' (even 'Etc/UTC'), which cost 1 us a value.
                await fetch_within(
                    conn, self.db_timeout, "set timezone to 'UTC'", rows=False
                )
            except BaseException:
                await conn.close()
                raise
            self._lease_conn = conn
        # Binary rows: ints, the token and the timestamps parse faster
        # (lease rows, 2 cores: 1.1-1.4 us a row against 1.6-1.8 as text).
        return await fetch_within(conn, self.db_timeout, query, params, binary=True)

    async def _new_async_connection(self) -> psycopg.AsyncConnection[Any]:
        return await AsyncHandlerConnection.connect(
            self._dsn, autocommit=True, application_name="pgqueue-worker"
        )

    async def _execute(self, query: str, params: list[Any]) -> None:
        await self._fetch(query, params, rows=False)

    async def _drain_pool(self) -> None:
        """A pooled connection went silent: the others, opened about the same
        time over the same network, have likely gone too. Replace them all,
        so that the next statement (a heartbeat tried again before the leases
        run out) gets a new connection rather than the next silent one."""
        assert self._pool is not None
        with contextlib.suppress(Exception):
            await self._pool.drain()
