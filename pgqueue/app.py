"""`App`: where to connect, which schema, and the registry of tasks."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, overload

import psycopg

from pgqueue import producer, serialization
from pgqueue.errors import ConfigurationError, TaskNotFound
from pgqueue.limits import is_number
from pgqueue.migrations import check_schema_name
from pgqueue.retry import RetryPolicy
from pgqueue.tasks import Task, make_task

if TYPE_CHECKING:
    from typing_extensions import Unpack

F = TypeVar("F", bound=Callable[..., Any])


class BulkOptions(TypedDict, total=False):
    """Options of :meth:`App.enqueue_many` (as :class:`pgqueue.producer.Options`)."""

    queue: str
    priority: int
    delay: timedelta | float | None
    run_at: datetime | None
    max_attempts: int


class EnqueueOptions(BulkOptions, total=False):
    """Options of :meth:`App.enqueue` and :meth:`App.enqueue_async`."""

    idempotency_key: str | None


def resolve_dsn(dsn: str | None = None) -> str:
    """The DSN to use: ``dsn``, else ``PGQUEUE_DSN``, else ``DATABASE_URL``.

    An empty string means libpq's own defaults and ``PG*`` environment variables.
    """
    if dsn:
        return dsn
    return os.environ.get("PGQUEUE_DSN") or os.environ.get("DATABASE_URL") or ""


class App:
    """A pgqueue application: connection settings and the tasks it knows.

    Example::

        app = pgqueue.App("postgresql://localhost/shop")

        @app.task(queue="emails", max_attempts=5)
        def send_receipt(ctx, order_id: int) -> None:
            ctx.conn.execute("insert into receipts (order_id) values (%s)",
                             [order_id])

        with psycopg.connect(app.dsn) as conn, conn.transaction():
            conn.execute("insert into orders ...")
            send_receipt.enqueue(conn, order_id=42)   # commits with the order

    Producers enqueue on their own connections; ``pgqueue worker module:app``
    runs the handlers.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "pgqueue",
        max_payload_bytes: int | None = serialization.DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self._dsn = dsn
        self.schema = check_schema_name(schema)
        if max_payload_bytes is not None and (
            not is_number(max_payload_bytes) or not 0 < max_payload_bytes < math.inf
        ):
            # NaN compared false with everything: no limit at all.
            raise ConfigurationError(
                f"max_payload_bytes must be a positive number or None,"
                f" got {max_payload_bytes!r}"
            )
        self.max_payload_bytes = max_payload_bytes
        self.tasks: dict[str, Task] = {}

    @property
    def dsn(self) -> str:
        """The connection string (from the constructor or the environment)."""
        return resolve_dsn(self._dsn)

    @dsn.setter
    def dsn(self, value: str) -> None:
        self._dsn = value

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """Open a new psycopg connection to this app's database."""
        return psycopg.connect(self.dsn, **kwargs)

    @overload
    def task(self, func: F, /) -> Task: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 25,
        transactional: bool = True,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[Callable[..., Any]], Task]: ...

    def task(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 25,
        transactional: bool = True,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> Task | Callable[[Callable[..., Any]], Task]:
        """Register a handler as a task.

        The handler is called as ``handler(ctx, **args)``. A transactional task
        (the default) gets ``ctx.conn`` inside a transaction that commits
        together with the job's completion; ``transactional=False`` holds no
        transaction while the handler runs (for long I/O). ``timeout`` is the
        maximum run time of one attempt in seconds.
        """

        def register(f: Callable[..., Any]) -> Task:
            options = producer.Options(
                queue=queue, priority=priority, max_attempts=max_attempts
            )
            task = make_task(
                self,
                f,
                name=name,
                transactional=transactional,
                timeout=timeout,
                retry=retry,
                options=options,
            )
            if task.name in self.tasks:
                raise ConfigurationError(f"task {task.name!r} is already registered")
            self.tasks[task.name] = task
            return task

        if func is not None:
            return register(func)
        return register

    def task_queues(self) -> list[str]:
        """The queues this app's tasks declare, sorted (``["default"]`` if it
        has no task): what a worker serves when told no queue."""
        return sorted({t.defaults.queue for t in self.tasks.values()}) or ["default"]

    def get_task(self, name: str) -> Task:
        """The task registered under ``name``, or raise :class:`TaskNotFound`."""
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotFound(
                f"no task named {name!r} is registered in this worker "
                f"(known: {', '.join(sorted(self.tasks)) or 'none'})",
                task=name,
            ) from None

    def enqueue(
        self,
        conn: psycopg.Connection[Any],
        task: str,
        args: Mapping[str, Any] | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> int:
        """Enqueue a job by task name, without importing the handler's code.

        Same guarantees as :meth:`Task.enqueue`: joins ``conn``'s transaction.
        Options: ``queue``, ``priority``, ``delay`` or ``run_at``,
        ``idempotency_key``, ``max_attempts`` (see :class:`EnqueueOptions`).
        """
        return producer.enqueue(conn, self, task, args, producer.Options(**options))

    async def enqueue_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        task: str,
        args: Mapping[str, Any] | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> int:
        """Like :meth:`enqueue`, on an async connection."""
        opts = producer.Options(**options)
        return await producer.enqueue_async(conn, self, task, args, opts)

    def enqueue_many(
        self,
        conn: psycopg.Connection[Any],
        task: str,
        args: Iterable[Mapping[str, Any]],
        **options: Unpack[BulkOptions],
    ) -> list[int]:
        """Enqueue one job of ``task`` per mapping in ``args``: one statement,
        or from 500 jobs on, two (ids reserved, then the rows by COPY)."""
        opts = producer.Options(**options)
        return producer.enqueue_many(conn, self, task, args, opts)
