"""pgqueue.testing: helpers for users' own tests, on a real database."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue import testing


def test_assert_enqueued_and_drain(dsn: str) -> None:
    app = pgqueue.App(dsn)
    seen: list[int] = []

    @app.task()
    def receipt(ctx: pgqueue.JobContext, order_id: int) -> None:
        seen.append(order_id)

    with psycopg.connect(dsn) as conn:
        receipt.enqueue(conn, order_id=42)
        job_id = testing.assert_enqueued(conn, "receipt", order_id=42)
        with pytest.raises(AssertionError, match="no queued job"):
            testing.assert_enqueued(conn, "receipt", order_id=7)
        conn.commit()
    worker = testing.drain(app)
    assert seen == [42] and worker.counters.succeeded == 1
    with psycopg.connect(dsn) as conn:
        row: Any = conn.execute(
            "select state::text from pgqueue.jobs_overview where id = %s", [job_id]
        ).fetchone()
    assert row == ("succeeded",)


def test_drain_runs_the_jobs_of_every_queue_the_apps_tasks_declare(dsn: str) -> None:
    from psycopg.rows import dict_row

    app = pgqueue.App(dsn)
    seen: list[str] = []

    @app.task(queue="emails")
    def send(ctx: pgqueue.JobContext, conn: str, task: str) -> None:
        seen.append(f"{conn} {task}")

    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        send.enqueue(conn, conn="a", task="b")
        # Arguments named like assert_enqueued's first two parameters, and a
        # caller's connection that makes dicts of rows.
        testing.assert_enqueued(conn, "send", conn="a", task="b")
        conn.commit()
    worker = testing.drain(app)
    assert seen == ["a b"] and worker.counters.succeeded == 1
