"""Helpers for testing code that uses pgqueue, against your real database.

There is no in-memory fake: it would re-implement the state machine and drift
from it. These helpers run the real functions on your test database.

    def test_checkout_sends_receipt(conn):
        checkout(conn, order_id=42)                 # enqueues send_receipt
        pgqueue.testing.assert_enqueued(conn, "send_receipt", order_id=42)
        conn.commit()
        pgqueue.testing.drain(app)                   # runs it, in this process
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from pgqueue.app import App
from pgqueue.migrations import check_schema_name
from pgqueue.worker import Worker

__all__ = ["assert_enqueued", "drain"]


def drain(
    app: App,
    *,
    queues: list[str] | tuple[str, ...] | None = None,
    concurrency: int = 1,
) -> Worker:
    """Run every due job of ``queues`` (default: every queue the app's tasks
    declare, as ``pgqueue worker`` does) with a real worker, then return it.

    Jobs scheduled later, or retried with a backoff, are left queued. The
    returned worker's ``counters`` say how many succeeded and failed.
    """
    worker = Worker(
        app,
        queues=app.task_queues() if queues is None else queues,
        concurrency=concurrency,
        until_empty=True,
        listen=False,
        handle_signals=False,
    )
    worker.run()
    return worker


def assert_enqueued(
    conn: psycopg.Connection[Any],
    task: str,
    /,
    *,
    schema: str = "pgqueue",
    **args: Any,
) -> int:
    """Assert that a queued job of ``task`` has exactly these arguments.

    Runs on ``conn``, so it sees jobs enqueued in its open transaction.
    Returns the job's id. (A task argument named ``schema`` cannot be given
    here: it names the schema.)
    """
    query = sql.SQL(
        "select id from {}.jobs where task = %s and args = %s and state = 'queued'"
        " order by id limit 1"
    ).format(sql.Identifier(check_schema_name(schema)))
    cur = conn.cursor(row_factory=tuple_row)  # whatever the connection's factory
    row = cur.execute(query, [task, Jsonb(args)]).fetchone()
    if row is None:
        raise AssertionError(f"no queued job {task}({args}) in schema {schema!r}")
    return int(row[0])
