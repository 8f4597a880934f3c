"""Tasks: a handler plus its options, and `.enqueue()` on a caller's connection."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pgqueue import producer
from pgqueue.errors import ConfigurationError
from pgqueue.limits import MAX_SECONDS, is_number
from pgqueue.retry import ExponentialBackoff, RetryPolicy

if TYPE_CHECKING:
    import psycopg

    from pgqueue.app import App

TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,199}$")


@dataclasses.dataclass(frozen=True, slots=True)
class _Shape:
    """What keyword arguments a handler takes after its context argument."""

    signature: inspect.Signature
    accepts_any: bool
    allowed: frozenset[str]
    required: frozenset[str]


@functools.cache
def _shape(func: Callable[..., Any]) -> _Shape:
    signature = inspect.signature(func)
    params = list(signature.parameters.values())[1:]  # after ctx
    kinds = inspect.Parameter
    keywordable = [
        p for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
    ]
    return _Shape(
        signature=signature,
        accepts_any=any(p.kind is kinds.VAR_KEYWORD for p in params),
        allowed=frozenset(p.name for p in keywordable),
        required=frozenset(p.name for p in keywordable if p.default is p.empty),
    )


def check_args(task: Task, args: dict[str, Any]) -> None:
    """Raise TypeError, naming the handler's signature, if ``args`` do not fit.

    Checked before the call so a job whose stored arguments no longer match the
    handler fails with a clear message instead of a TypeError from inside it.
    """
    shape = _shape(task.func)
    names = args.keys()
    # The common case in two subset tests, without building difference sets.
    if names >= shape.required and (shape.accepts_any or names <= shape.allowed):
        return
    missing = shape.required - names
    extra = set() if shape.accepts_any else names - shape.allowed
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing {sorted(missing)}")
        if extra:
            detail.append(f"unexpected {sorted(extra)}")
        raise TypeError(
            f"arguments {sorted(names)} do not match {task.name}{shape.signature}: "
            + ", ".join(detail)
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """A registered handler and the options its jobs are enqueued with.

    Call ``task.enqueue(conn, **args)`` inside your own transaction: the job
    exists if and only if that transaction commits. ``task.options(...)``
    returns a copy with other enqueue options (priority, delay, key...).
    """

    app: App
    func: Callable[..., Any]
    name: str
    transactional: bool = True
    timeout: float | None = None
    retry: RetryPolicy = dataclasses.field(default_factory=ExponentialBackoff)
    defaults: producer.Options = dataclasses.field(default_factory=producer.Options)

    is_async: bool = False  # set by make_task: the handler is a coroutine function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the handler directly, as a plain function (no queue involved)."""
        return self.func(*args, **kwargs)

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> Task:
        """Return this task with other enqueue options (unset ones are kept)."""
        changes: dict[str, Any] = {
            name: value
            for name, value in (
                ("queue", queue),
                ("priority", priority),
                ("delay", delay),
                ("run_at", run_at),
                ("idempotency_key", idempotency_key),
                ("max_attempts", max_attempts),
            )
            if value is not None
        }
        return dataclasses.replace(
            self, defaults=dataclasses.replace(self.defaults, **changes)
        )

    def enqueue(self, conn: psycopg.Connection[Any], /, **args: Any) -> int:
        """Enqueue one job with these keyword arguments; return its id.

        Runs on ``conn`` in its current transaction and never commits: the job
        exists if and only if the caller's transaction commits. With an
        idempotency key already used in this queue, returns the existing id.

        Raises:
            InvalidJob: the arguments are not JSON, or an option is out of range.
        """
        return producer.enqueue(conn, self.app, self.name, args, self.defaults)

    async def enqueue_async(
        self, conn: psycopg.AsyncConnection[Any], /, **args: Any
    ) -> int:
        """Like :meth:`enqueue`, on an async connection."""
        return await producer.enqueue_async(
            conn, self.app, self.name, args, self.defaults
        )

    def enqueue_many(
        self, conn: psycopg.Connection[Any], args: Iterable[Mapping[str, Any]]
    ) -> list[int]:
        """Enqueue one job per mapping of arguments in one round trip."""
        return producer.enqueue_many(conn, self.app, self.name, args, self.defaults)

    async def enqueue_many_async(
        self, conn: psycopg.AsyncConnection[Any], args: Iterable[Mapping[str, Any]]
    ) -> list[int]:
        """Like :meth:`enqueue_many`, on an async connection."""
        return await producer.enqueue_many_async(
            conn, self.app, self.name, args, self.defaults
        )


def make_task(
    app: App,
    func: Callable[..., Any],
    *,
    name: str | None,
    transactional: bool,
    timeout: float | None,
    retry: RetryPolicy | None,
    options: producer.Options,
) -> Task:
    """Build a task, checking its name and options before anything runs."""
    task_name = func.__name__ if name is None else name
    if not isinstance(task_name, str) or not TASK_NAME.fullmatch(task_name):
        raise ConfigurationError(f"invalid task name {task_name!r}")
    if timeout is not None and (
        not is_number(timeout)
        or not 0 < timeout <= MAX_SECONDS  # NaN fails this: it timed out at random
    ):
        raise ConfigurationError(
            f"timeout must be a number of seconds above 0 and up to {MAX_SECONDS:g}"
            f" (None: no timeout), got {timeout!r}"
        )
    if not isinstance(transactional, bool):
        raise ConfigurationError(
            f"transactional must be True or False, got {transactional!r}"
        )
    if retry is not None and (
        isinstance(retry, type)  # the class, not an instance: delay() lacks self
        or not callable(getattr(retry, "delay", None))
    ):
        # The worker fell back to the default backoff without a word.
        raise ConfigurationError(
            f"retry must be a RetryPolicy (with a delay(attempt) method), got {retry!r}"
        )
    producer.check_options(options)
    _shape(func)  # fail at registration if the signature cannot be read
    return Task(
        app=app,
        func=func,
        name=task_name,
        transactional=transactional,
        timeout=None if timeout is None else float(timeout),
        retry=retry or ExponentialBackoff(),
        defaults=options,
        is_async=inspect.iscoroutinefunction(func),
    )
