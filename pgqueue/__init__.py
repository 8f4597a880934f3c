"""pgqueue: a job queue that lives inside PostgreSQL.

The supported import paths are ``pgqueue``, ``pgqueue.errors`` and
``pgqueue.testing``; every other module is internal, underscore or not.
"""

from pgqueue.app import App
from pgqueue.context import JobContext
from pgqueue.errors import PgqueueError, Retry
from pgqueue.jobs import Job, JobState
from pgqueue.retry import ExponentialBackoff, RetryPolicy
from pgqueue.tasks import Task
from pgqueue.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "ExponentialBackoff",
    "Job",
    "JobContext",
    "JobState",
    "PgqueueError",
    "Retry",
    "RetryPolicy",
    "Task",
    "Worker",
    "__version__",
]
