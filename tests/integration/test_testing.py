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
