"""Exceptions raised by pgqueue.

::

    PgqueueError
    ├── ConfigurationError        bad App/worker/CLI settings
    ├── SchemaOutOfDate           migrations pending (says which command to run)
    ├── InvalidJob                enqueue input pgqueue refuses (name, priority, ...)
    │   └── ArgumentsNotSerializable  arguments or result not JSON (names the path)
    ├── TaskNotFound              no handler registered for a leased job's task
    ├── JobNotFound               cancel/retry of an unknown job id
    ├── InvalidState              cancel/retry of a job in the wrong state
    ├── LeaseLost                 fenced completion refused: the lease expired or moved
    ├── JobTimeout                a handler ran past its task's timeout
    ├── HandlerCancelled          a handler let out a CancelledError nobody sent it
    ├── TransactionOwnedByWorker  a handler called commit/rollback/close on ctx.conn
    └── HandlerRaisedBaseException  a batch handler let out SystemExit & co.

Handler outcomes that are control flow rather than errors (``Retry``) derive
from :class:`HandlerOutcome`, not from :class:`PgqueueError`.

Errors raised by the stored functions carry SQLSTATE codes ``PQ001``..``PQ003``;
:func:`from_database` maps them. Other psycopg errors pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import psycopg


class PgqueueError(Exception):
    """A pgqueue operation failed."""

    def __init__(self, message: str | None = None, **attrs: Any) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())
        for name, value in attrs.items():
            setattr(self, name, value)


class ConfigurationError(PgqueueError, ValueError):
    """pgqueue is not configured correctly (a ValueError too: a backoff's
    bad setting raised a bare ValueError before)."""


class SchemaOutOfDate(PgqueueError):
    """The pgqueue schema is behind this code: run `pgqueue migrate`."""


class InvalidJob(PgqueueError):
    """The job cannot be enqueued as given."""


class ArgumentsNotSerializable(InvalidJob):
    """Job arguments (or a result) are not JSON."""


class TaskNotFound(PgqueueError):
    """No handler is registered for this task name."""

    task: str


class JobNotFound(PgqueueError):
    """No job has this id."""

    job_id: int


class InvalidState(PgqueueError):
    """The job is not in a state that allows this."""


class LeaseLost(PgqueueError):
    """The job's lease expired or passed to another worker; completion refused."""

    job_id: int


class JobTimeout(PgqueueError):
    """The handler ran longer than its task's timeout."""


class HandlerRaisedBaseException(PgqueueError):
    """A handler in a transaction batch let out a BaseException that is not an
    Exception (SystemExit, GeneratorExit, a class of its own): its job fails
    with this, caused by the original."""


class HandlerCancelled(PgqueueError):
    """A handler let a CancelledError out though the worker did not cancel it
    (it awaited something another part of the program cancelled, say)."""

    def __init__(
        self,
        message: str = "the handler raised CancelledError without the worker "
        "cancelling it",
    ) -> None:
        super().__init__(message)


class TransactionOwnedByWorker(PgqueueError):
    """A transactional handler called ``commit()``, ``rollback()`` or
    ``close()`` on ``ctx.conn``: the worker refused it (the connection is as it
    was) and fails the job, whose writes roll back."""


class HandlerOutcome(Exception):
    """Base of outcomes a handler may raise on purpose."""


class Retry(HandlerOutcome):
    """Fail this attempt and retry after `after` seconds (or the task's backoff).

    The attempt still counts toward ``max_attempts``.
    """

    def __init__(self, reason: str = "retry requested", *, after: float | None = None):
        super().__init__(reason)
        self.after = after


_BY_SQLSTATE: dict[str, type[PgqueueError]] = {
    "PQ001": InvalidJob,
    "PQ002": JobNotFound,
    "PQ003": InvalidState,
    "PQ004": LeaseLost,
}

# The rules on enqueue input, by the name of the CHECK constraint that raised it
# (0001); since 0012 enqueue and enqueue_many raise all but jobs_attempts
# themselves, under the same names.
_CHECKS = {
    "jobs_queue_name": "invalid queue name",
    "jobs_task_name": "invalid task name",
    "jobs_attempts": "max_attempts must be between 1 and 1000",
    "jobs_idempotency_key": "idempotency key must be 1 to 255 characters",
    "jobs_run_at_range": "run_at must be between 0001-01-02 and 9999-12-30 UTC",
}


def from_database(exc: psycopg.Error) -> Exception:
    """Map a database error from a pgqueue function to a pgqueue exception.

    Errors that are not pgqueue's own come back unchanged.
    """
    sqlstate = exc.sqlstate or ""
    diag = exc.diag
    if sqlstate in _BY_SQLSTATE:
        err = _BY_SQLSTATE[sqlstate](diag.message_primary or str(exc))
        err.__cause__ = exc
        return err
    if isinstance(exc, psycopg.errors.CheckViolation):
        text = _CHECKS.get(diag.constraint_name or "")
        if text is not None:
            err = InvalidJob(text)
            err.__cause__ = exc
            return err
    if isinstance(exc, psycopg.errors.UntranslatableCharacter | psycopg.DataError):
        # A value psycopg could not read or send has no diagnostics of the
        # server's: its own message says what it was.
        detail = diag.message_primary or str(exc)
        err = InvalidJob(f"the database refused a value: {detail}")
        err.__cause__ = exc
        return err
    return exc
