"""The public surface is deliberate: changing it must change this test."""

from __future__ import annotations

import pytest

import pgqueue
from pgqueue.errors import ConfigurationError

REVIEWED_ALL = [
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


def test_public_names_are_the_reviewed_list() -> None:
    assert pgqueue.__all__ == REVIEWED_ALL
    assert sorted(pgqueue.__all__) == pgqueue.__all__


def test_job_states_match_the_sql_enum() -> None:
    assert [s.value for s in pgqueue.JobState] == [
        "queued",
        "running",
        "succeeded",
        "dead",
        "cancelled",
    ]


def test_task_registration_checks_names_and_duplicates() -> None:
    app = pgqueue.App("postgresql://unused")

    @app.task
    def one(ctx: pgqueue.JobContext) -> None:
        pass

    assert app.tasks["one"] is one
    assert one.is_async is False
    with pytest.raises(ConfigurationError, match="already registered"):
        app.task(name="one")(lambda ctx: None)
    with pytest.raises(ConfigurationError, match="invalid task name"):
        app.task(name="bad name")(lambda ctx: None)
    with pytest.raises(ConfigurationError, match="timeout"):
        app.task(name="t", timeout=0)(lambda ctx: None)


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": float("nan")},  # it timed out at random, mates' jobs lost
        {"timeout": float("inf")},
        {"timeout": -1},
        {"timeout": "5"},
        {"timeout": True},
        {"name": ""},  # the function's name, silently
        {"name": 5},
        {"transactional": "no"},  # counted as true
        {"retry": "x"},  # the default backoff, silently
        {"retry": 5},
        {"retry": pgqueue.ExponentialBackoff},  # the class: delay() lacks self
    ],
    ids=repr,
)
def test_task_options_that_would_misbehave_are_refused(
    options: dict[str, object],
) -> None:
    app = pgqueue.App("postgresql://unused")
    with pytest.raises(ConfigurationError):
        app.task(**options)(lambda ctx: None)  # type: ignore[call-overload]
    assert app.tasks == {}


def test_settings_of_any_real_number_type_are_taken() -> None:
    """Numbers that are not int or float (a Fraction, numpy's) still count."""
    from fractions import Fraction

    app = pgqueue.App("postgresql://unused", max_payload_bytes=1e6)
    task = app.task(name="t", timeout=Fraction(3, 2))(lambda ctx: None)
    assert task.timeout == 1.5 and isinstance(task.timeout, float)
    backoff = pgqueue.ExponentialBackoff(base=Fraction(1, 2), factor=1e20)
    # factor ** 29 overflows a float: the cap (with its jitter), not an
    # OverflowError, which the worker met by falling back to the default.
    assert backoff.max_delay / 2 <= backoff.delay(30) <= backoff.max_delay


@pytest.mark.parametrize(
    "options",
    [
        {"max_payload_bytes": float("nan")},  # no limit at all
        {"max_payload_bytes": "10"},
        {"max_payload_bytes": 0},
        {"schema": None},
    ],
    ids=repr,
)
def test_app_settings_that_would_misbehave_are_refused(
    options: dict[str, object],
) -> None:
    with pytest.raises(ConfigurationError):
        pgqueue.App("postgresql://unused", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [
        {"base": float("nan")},
        {"max_delay": float("nan")},
        {"max_delay": float("inf")},
        {"factor": 0.5},
        {"jitter": 2},
        {"base": "1"},
    ],
    ids=repr,
)
def test_backoff_settings_that_would_misbehave_are_refused(
    settings: dict[str, object],
) -> None:
    with pytest.raises(ConfigurationError):
        pgqueue.ExponentialBackoff(**settings)  # type: ignore[arg-type]


def test_bad_schema_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="invalid schema name"):
        pgqueue.App(schema='x"; drop')


def test_jobs_from_lease_rows_equal_jobs_built_the_usual_way() -> None:
    import dataclasses
    import uuid
    from datetime import datetime, timezone

    from pgqueue.context import JobContext, new_context
    from pgqueue.jobs import Job, jobs_from_lease

    token = uuid.uuid4()
    now = datetime.now(timezone.utc)
    rows = [
        (1, "default", "a", "{}", 0, 0, 25, token, now, now),
        (2, "mail", "b", '{"to": "x@y", "n": [1, 2]}', -3, 2, 5, token, now, now),
    ]
    built = jobs_from_lease(rows)
    assert built == [
        Job(1, "default", "a", {}, 0, 0, 25, token, now, now),
        Job(2, "mail", "b", {"to": "x@y", "n": [1, 2]}, -3, 2, 5, token, now, now),
    ]
    assert built[1].attempt == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        built[0].priority = 1  # type: ignore[misc]
    ctx = new_context(built[0], None, "w1", None)
    assert ctx == JobContext(job=built[0], conn=None, worker_id="w1", logger=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.conn = object()  # type: ignore[misc]
