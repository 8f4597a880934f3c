"""`Job`, a leased job as the worker sees it, and `JobState`, the SQL enum."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class JobState(str, enum.Enum):
    """The states of ``pgqueue.job_state``, spelled as in SQL."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Job:
    """A job leased by a worker: one row returned by ``pgqueue.lease``.

    ``run_at`` and ``created_at`` are aware datetimes in UTC.
    """

    id: int
    queue: str
    task: str
    args: Any
    priority: int
    attempts: int
    max_attempts: int
    lease_token: uuid.UUID
    run_at: datetime
    created_at: datetime

    @property
    def attempt(self) -> int:
        """The number of this attempt, starting at 1."""
        return self.attempts + 1
