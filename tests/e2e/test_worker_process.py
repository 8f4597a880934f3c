"""Real `pgqueue worker` processes: graceful shutdown, a second signal, SIGKILL."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ..waiting import wait_until
from .helpers import BUSINESS_TABLE, WorkerProcess, cli, job_row, started, write_app

Conn = psycopg.Connection[Any]

pytestmark = pytest.mark.slow


@pytest.fixture
def business(conn: Conn) -> Conn:
    conn.execute(BUSINESS_TABLE)
    return conn


def enqueue(conn: Conn, n: int, sleep: float = 0.0, task: str = "record") -> int:
    row = conn.execute(
        "select pgqueue.enqueue(%s, %s)", [task, json.dumps({"n": n, "sleep": sleep})]
    ).fetchone()
    assert row is not None
    return int(row[0])


def business_rows(conn: Conn) -> list[tuple[int, int]]:
    return conn.execute("select job_id, n from business order by n").fetchall()


@pytest.mark.parametrize(
    ("task", "sig"),
    [
        ("record", signal.SIGTERM),
        ("record", signal.SIGINT),
        ("record_async", signal.SIGTERM),
        ("call", signal.SIGTERM),
    ],
)
def test_signal_lets_short_jobs_finish_and_hands_back_the_rest(
    dsn: str, business: Conn, tmp_path: Path, task: str, sig: signal.Signals
) -> None:
    app = write_app(tmp_path)
    short = [enqueue(business, n, sleep=1.0, task=task) for n in (1, 2)]
    long = [enqueue(business, n, sleep=300, task=task) for n in (3, 4)]
    grace = 3
    with WorkerProcess(
        dsn, app, "-c", "4", "--grace", str(grace), cwd=tmp_path
    ) as worker:
        # All four handlers are inside their jobs (a transactional one has
        # inserted its row, not committed).
        wait_until(lambda: all(started(tmp_path, j) for j in short + long))
        worker.send(sig)
        assert worker.wait(timeout=grace + 15) == 0, worker.log()

    for n, job in enumerate(short, start=1):
        row = job_row(business, job)
        assert (row["state"], row["result"]) == ("succeeded", {"n": n})
    for job in long:
        row = job_row(business, job)
        # Queued again, not counted as an attempt, no error, nobody holds it.
        assert (row["state"], row["attempts"], row["errors"], row["leased_by"]) == (
            "queued",
            0,
            [],
            None,
        )
    # The handed-back jobs' business rows were rolled back.
    expected = [] if task == "call" else [(short[0], 1), (short[1], 2)]
    assert business_rows(business) == expected
    names = worker.event_names()
    assert names[-1] == "worker_stopped"
    [handed] = [e for e in worker.events() if e["event"] == "jobs_handed_back"]
    assert sorted(handed["job_ids"]) == sorted(long)


def test_sigterm_stops_an_idle_worker(dsn: str, tmp_path: Path) -> None:
    app = write_app(tmp_path)
    with WorkerProcess(dsn, app, cwd=tmp_path) as worker:
        worker.wait_for_event("worker_started")
        worker.send(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0, worker.log()
    assert worker.event_names()[-1] == "worker_stopped"


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)],
)
def test_second_signal_exits_at_once(
    dsn: str,
    business: Conn,
    tmp_path: Path,
    first: signal.Signals,
    second: signal.Signals,
) -> None:
    app = write_app(tmp_path)
    job = enqueue(business, 1, sleep=300)
    # A grace far longer than the test's patience: only the second signal can
    # make the worker exit within the wait below.
    with WorkerProcess(dsn, app, "--grace", "300", cwd=tmp_path) as worker:
        wait_until(lambda: started(tmp_path, job))
        worker.send(first)
        worker.wait_for_event("worker_draining")
        worker.send(second)
        code = worker.wait(timeout=15)
    assert code != 0
    assert "worker_killed" in worker.event_names()
    assert "worker_stopped" not in worker.event_names()
    # Nothing was handed back: the job stays leased until its lease expires.
    row = job_row(business, job)
    assert (row["state"], row["attempts"]) == ("running", 0)
    assert business_rows(business) == []


@pytest.mark.parametrize("task", ["record", "record_async"])
def test_sigkill_mid_job_is_rerun_by_another_worker_after_the_lease_expires(
    dsn: str, business: Conn, tmp_path: Path, task: str
) -> None:
    app = write_app(tmp_path)
    job = enqueue(business, 7, sleep=300, task=task)  # only the first run sleeps
    with WorkerProcess(dsn, app, "--lease", "2", cwd=tmp_path) as victim:
        # The handler has inserted its business row and is sleeping.
        wait_until(lambda: started(tmp_path, job, run=1))
        victim.send(signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
    # The killed transaction never committed.
    assert business_rows(business) == []
    assert job_row(business, job)["attempts"] == 0

    with WorkerProcess(dsn, app, "--lease", "2", cwd=tmp_path) as rescuer:
        wait_until(lambda: job_row(business, job)["state"] == "succeeded", timeout=60)
        rescuer.send(signal.SIGTERM)
        assert rescuer.wait(timeout=30) == 0, rescuer.log()

    assert started(tmp_path, job, run=2)
    assert business_rows(business) == [(job, 7)]
    row = job_row(business, job)
    assert row["attempts"] == 1
    [error] = row["errors"]
    assert error["kind"] == "lease_expired"
    reaped = [e for e in rescuer.events() if e["event"] == "job_reaped"]
    assert [e["job_id"] for e in reaped] == [job]


def test_a_handed_back_job_runs_again_without_counting_an_attempt(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    app = write_app(tmp_path)
    job = enqueue(business, 9, sleep=300)  # only the first run sleeps
    with WorkerProcess(dsn, app, "--grace", "0", cwd=tmp_path) as worker:
        wait_until(lambda: started(tmp_path, job))
        worker.send(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0, worker.log()
    assert job_row(business, job)["state"] == "queued"

    cli(dsn, "worker", app, "--until-empty", cwd=tmp_path)
    assert started(tmp_path, job, run=2)
    row = job_row(business, job)
    assert (row["state"], row["attempts"], row["errors"]) == ("succeeded", 0, [])
    assert business_rows(business) == [(job, 9)]
