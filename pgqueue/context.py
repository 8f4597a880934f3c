"""`JobContext`: what a handler receives besides its arguments."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pgqueue.jobs import Job


@dataclass(frozen=True, slots=True)
class JobContext:
    """The job being run and, for transactional tasks, its open transaction.

    ``conn`` is a psycopg connection (``AsyncConnection`` for async handlers)
    inside a transaction that the worker commits together with the job's
    completion, so the handler's writes and the completion are one atomic
    change. It is ``None`` for tasks declared ``transactional=False``.

    Example::

        @app.task()
        def ship(ctx: JobContext, order_id: int) -> None:
            ctx.conn.execute("update orders set shipped = true where id = %s",
                             [order_id])
            ctx.log.info("shipped", order_id=order_id)
    """

    job: Job
    conn: Any
    worker_id: str
    logger: Any = field(repr=False)

    @property
    def log(self) -> Any:
        """A structlog logger bound to this job's id and task."""
        return self.logger.bind(job_id=self.job.id, task=self.job.task)

    @property
    def attempt(self) -> int:
        """This attempt's number, starting at 1."""
        return self.job.attempts + 1


_SETTERS = tuple(getattr(JobContext, f.name).__set__ for f in fields(JobContext))


def new_context(job: Job, conn: Any, worker_id: str, logger: Any) -> JobContext:
    """``JobContext(job, conn, worker_id, logger)``, built as jobs_from_lease
    builds a Job (pgqueue/jobs.py): 0.5 us instead of 1.5 on our 2 cores."""
    s_job, s_conn, s_worker, s_logger = _SETTERS
    ctx = object.__new__(JobContext)
    s_job(ctx, job)
    s_conn(ctx, conn)
    s_worker(ctx, worker_id)
    s_logger(ctx, logger)
    return ctx
