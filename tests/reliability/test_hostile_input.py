"""Hostile strings through every entry point: a clear error, or stored verbatim,
and nothing else happens in the database."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue.errors import ArgumentsNotSerializable, InvalidJob

from ..e2e.helpers import cli

Conn = psycopg.Connection[Any]

NASTY = [
    "'; drop table sentinel; --",
    '"; drop schema pgqueue cascade; --',
    "\\'\\\\ back\\slash",
    "semi;colon",
    "日本語 🚀 ünïcödé",
    "$$ dollar $$",
    "x" * 100_000,
    "%s %(x)s {schema}",
]


@pytest.fixture
def sentinel(conn: Conn) -> Conn:
    conn.execute("create table sentinel (x int)")
    conn.execute("insert into sentinel values (1)")
    return conn


def objects(conn: Conn) -> int:
    row = conn.execute(
        "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')"
    ).fetchone()
    return int(row[0]) if row else -1


def intact(conn: Conn, before: int) -> None:
    assert conn.execute("select x from sentinel").fetchall() == [(1,)]
    assert objects(conn) == before


@pytest.mark.parametrize("value", NASTY)
def test_args_and_keys_are_stored_verbatim(
    dsn: str, sentinel: Conn, value: str
) -> None:
    before = objects(sentinel)
    app = pgqueue.App(dsn)
    args = {value: value, "nested": [value, {"k": value}]}
    key = value[:255]
    job = app.enqueue(sentinel, "t", args, idempotency_key=key)
    many = app.enqueue_many(sentinel, "t", [args] * 600)  # the COPY path
    row = sentinel.execute(
        "select args, idempotency_key from pgqueue.jobs where id = %s", [job]
    ).fetchone()
    assert row == (args, key)
    stored = sentinel.execute(
        "select args from pgqueue.jobs where id = %s", [many[-1]]
    ).fetchone()
    assert stored == (args,)
    assert app.enqueue(sentinel, "t", {}, idempotency_key=key) == job
    intact(sentinel, before)


@pytest.mark.parametrize("value", NASTY)
def test_names_are_refused_with_a_clear_error(
    dsn: str, sentinel: Conn, value: str
) -> None:
    before = objects(sentinel)
    app = pgqueue.App(dsn)
    with pytest.raises(InvalidJob, match="invalid queue name"):
        app.enqueue(sentinel, "t", {}, queue=value)
    with pytest.raises(InvalidJob, match="invalid task name"):
        app.enqueue(sentinel, value, {})
    with pytest.raises(pgqueue.errors.ConfigurationError):
        pgqueue.App(dsn, schema=value)
    assert sentinel.execute("select count(*) from pgqueue.jobs").fetchone() == (0,)
    intact(sentinel, before)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"x": "nul\x00byte"}, "NUL"),
        ({"nul\x00key": 1}, "NUL"),
        ({"x": math.nan}, "NaN"),
        ({"x": -math.inf}, "Infinity"),
        ({"x": b"bytes"}, "bytes"),
        ({"x": datetime.now()}, "datetime"),
    ],
)
def test_values_postgres_or_json_cannot_hold(
    dsn: str, sentinel: Conn, args: dict[str, Any], message: str
) -> None:
    with pytest.raises(ArgumentsNotSerializable, match=message):
        pgqueue.App(dsn).enqueue(sentinel, "t", args)
    assert sentinel.execute("select count(*) from pgqueue.jobs").fetchone() == (0,)


def test_limits_have_defined_outcomes(dsn: str, sentinel: Conn) -> None:
    app = pgqueue.App(dsn, max_payload_bytes=10_000)
    with pytest.raises(ArgumentsNotSerializable, match="over the limit"):
        app.enqueue(sentinel, "t", {"x": "y" * 20_000})
    far = datetime(2090, 1, 1, tzinfo=timezone.utc)  # decades away: stored as given
    job = app.enqueue(sentinel, "t", {}, run_at=far)
    assert sentinel.execute(
        "select run_at from pgqueue.jobs where id = %s", [job]
    ).fetchone() == (far,)
    with pytest.raises(InvalidJob, match="100 years"):
        app.enqueue(sentinel, "t", {}, delay=timedelta(days=366 * 101))
    for priority in (-32769, 32768, 10**12):
        with pytest.raises(InvalidJob, match="out of range"):
            app.enqueue(sentinel, "t", {}, priority=priority)
    for edge in (-32768, 32767):
        app.enqueue(sentinel, "t", {}, priority=edge)
    with pytest.raises(InvalidJob, match="invalid task name"):
        app.enqueue(sentinel, "", {})
    with pytest.raises(InvalidJob, match="invalid queue name"):
        app.enqueue(sentinel, "t", {}, queue="q" * 129)
    assert sentinel.execute("select count(*) from pgqueue.jobs").fetchone() == (3,)


@pytest.mark.parametrize("value", NASTY[:6])
def test_cli_entry_points(dsn: str, sentinel: Conn, value: str) -> None:
    before = objects(sentinel)
    stored = cli(
        dsn,
        "enqueue",
        "t",
        "--args",
        json.dumps({"v": value}),
        "--idempotency-key",
        value[:255],
    )
    row = sentinel.execute(
        "select args, idempotency_key from pgqueue.jobs where id = %s",
        [int(stored.stdout)],
    ).fetchone()
    assert row == ({"v": value}, value[:255])
    for args in (
        ["enqueue", value],
        ["enqueue", "t", "--queue", value],
        ["--schema", value, "stats"],
        ["jobs", "--queue", value],
        ["retry", "--all-dead", value],
    ):
        result = cli(dsn, *args, check=False)
        assert "Traceback" not in result.stderr
        if result.returncode:
            assert result.stderr.startswith("error:")
    # Hostile parts inside a DSN reach libpq as connection parameters, never SQL.
    bad_dsn = (
        f"postgresql://{value.replace('/', '')[:20]}@127.0.0.1:1/x?connect_timeout=1"
    )
    result = cli(bad_dsn, "stats", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    intact(sentinel, before)
