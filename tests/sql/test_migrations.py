"""Migrations: idempotent, locked, printable, and the snapshot is current."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgqueue import migrations
from pgqueue.errors import SchemaOutOfDate

ROOT = Path(__file__).resolve().parents[2]


def test_migrating_twice_is_a_no_op(conn: psycopg.Connection[Any]) -> None:
    assert migrations.migrate(conn) == []
    assert migrations.current_version(conn) == migrations.latest_version()


def test_snapshot_matches_a_fresh_migration() -> None:
    snapshot = (ROOT / "sql" / "schema.snapshot.sql").read_text()
    assert snapshot.strip() == migrations.script().strip(), "run `make schema`"


@pytest.fixture
def other_schema(conn: psycopg.Connection[Any]) -> Iterator[str]:
    yield "tenant_b"
    conn.execute(
        sql.SQL("drop schema if exists {} cascade").format(sql.Identifier("tenant_b"))
    )


def test_concurrent_migrations_apply_each_file_once(
    dsn: str, other_schema: str
) -> None:
    applied: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            done = migrations.migrate(c, other_schema)
        with lock:
            applied.extend(m.version for m in done)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(applied) == list(range(1, migrations.latest_version() + 1))


def test_printed_script_builds_a_working_schema(
    conn: psycopg.Connection[Any], other_schema: str
) -> None:
    conn.execute(migrations.script(other_schema).encode())
    assert migrations.current_version(conn, other_schema) == migrations.latest_version()
    job = conn.execute("select tenant_b.enqueue('t')").fetchone()
    assert job == (1,)
    assert migrations.migrate(conn, other_schema) == []


def test_out_of_date_schema_is_reported(
    conn: psycopg.Connection[Any], other_schema: str
) -> None:
    with pytest.raises(SchemaOutOfDate, match="pgqueue migrate"):
        migrations.check_up_to_date(conn, other_schema)


def test_0010_keeps_an_index_built_beforehand_and_refuses_an_invalid_one(
    conn: psycopg.Connection[Any], other_schema: str
) -> None:
    """0010's header tells a DBA to build its index concurrently first."""
    migrations.migrate(conn, other_schema, target=9)
    conn.execute(
        "insert into tenant_b.finished_jobs (id, queue, task, args, priority, state,"
        " attempts, max_attempts, created_at) select g, 'q', 't', '{}', 0,"
        " 'succeeded', 0, 1, now() from generate_series(1, 2) g"
    )
    # A failed concurrent build leaves an invalid index behind.
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "create unique index concurrently finished_jobs_finished_idx"
            " on tenant_b.finished_jobs (queue)"
        )
    with pytest.raises(psycopg.Error, match="finished_jobs_finished_idx is invalid"):
        migrations.migrate(conn, other_schema)
    assert migrations.current_version(conn, other_schema) == 9
    conn.execute("drop index tenant_b.finished_jobs_finished_idx")
    conn.execute(
        "create index concurrently finished_jobs_finished_idx"
        " on tenant_b.finished_jobs (finished_at desc)"  # the DBA's own, kept
    )
    migrations.migrate(conn, other_schema)
    indexes = conn.execute(
        "select indexname, indexdef from pg_indexes where schemaname = 'tenant_b'"
        " and tablename = 'finished_jobs' order by 1"
    ).fetchall()
    assert [name for name, _ in indexes] == [
        "finished_jobs_dead_idx",
        "finished_jobs_finished_idx",
        "finished_jobs_pkey",
    ]
    assert "finished_at DESC" in dict(indexes)["finished_jobs_finished_idx"]


def test_0022_brings_run_at_into_range_and_keeps_it_there(
    conn: psycopg.Connection[Any], other_schema: str
) -> None:
    """Rows written before 0022 with a run_at no client can read are moved to
    the edge of the range, so that a lease can write them and a worker read
    them; after it, such a run_at is refused."""
    migrations.migrate(conn, other_schema, target=21)
    ids = [
        conn.execute(
            "select tenant_b.enqueue('t', '{}', 'q', 0, %s::timestamptz)", [when]
        ).fetchone()
        for when in ("-infinity", "0001-01-01 00:00+00", "infinity")
    ]
    migrations.migrate(conn, other_schema)
    rows = conn.execute("select id, run_at from tenant_b.jobs order by id").fetchall()
    assert [r[0] for r in rows] == [i[0] for i in ids if i is not None]
    low = datetime(1, 1, 2, tzinfo=timezone.utc)
    high = datetime(9999, 12, 30, tzinfo=timezone.utc)
    assert [r[1] for r in rows] == [low, low, high]
    leased = conn.execute(
        "select id, run_at from tenant_b.lease(array['q'], 10, 'w', 60)"
    ).fetchall()
    assert sorted(leased) == sorted(rows[:2])
    for when in ("-infinity", "infinity", "9999-12-31 00:00+00"):
        with pytest.raises(psycopg.errors.CheckViolation, match="jobs_run_at_range"):
            conn.execute(
                "select tenant_b.enqueue('t', '{}', 'q', 0, %s::timestamptz)", [when]
            )
