"""Real worker processes: graceful shutdown, a second signal, SIGKILL mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ..waiting import wait_until
from .helpers import cli, start_worker, write_app

Conn = psycopg.Connection[Any]


@pytest.fixture
def business(conn: Conn) -> Conn:
    conn.execute("create table business (job_id bigint primary key, n int)")
    return conn


def running(conn: Conn) -> int:
    row = conn.execute(
        "select count(*) from pgqueue.jobs where state = 'running'"
    ).fetchone()
    return int(row[0]) if row else 0


def enqueue(dsn: str, n: int, sleep: float) -> int:
    return int(
        cli(
            dsn, "enqueue", "record", "--args", json.dumps({"n": n, "sleep": sleep})
        ).stdout
    )


@pytest.mark.slow
def test_sigterm_finishes_short_jobs_and_hands_back_long_ones(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    app = write_app(tmp_path)
    short = enqueue(dsn, 1, 0.5)
    long = enqueue(dsn, 2, 60)
    worker = start_worker(dsn, app, "-c", "4", "--grace", "2", cwd=tmp_path)
    try:
        wait_until(lambda: running(business) == 2)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
    finally:
        worker.kill()
    states = dict(
        business.execute("select id, state::text from pgqueue.jobs_overview").fetchall()
    )
    assert states == {short: "succeeded", long: "queued"}
    # The handed-back job keeps attempt 0 and its business row rolled back.
    assert business.execute(
        "select attempts from pgqueue.jobs where id = %s", [long]
    ).fetchone() == (0,)
    assert business.execute("select n from business").fetchall() == [(1,)]
    log = worker.stdout.read() if worker.stdout else ""
    assert "jobs_handed_back" in log and "worker_stopped" in log


@pytest.mark.slow
def test_second_signal_exits_at_once(dsn: str, business: Conn, tmp_path: Path) -> None:
    app = write_app(tmp_path)
    enqueue(dsn, 1, 60)
    worker = start_worker(dsn, app, "--grace", "60", cwd=tmp_path)
    try:
        wait_until(lambda: running(business) == 1)
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: "worker_draining" in _peek(worker))
        worker.send_signal(signal.SIGINT)
        code = worker.wait(timeout=10)
    finally:
        worker.kill()
    assert code != 0
    # The job is still leased to the dead worker; its lease will expire.
    assert running(business) == 1


def _peek(proc: subprocess.Popen[str]) -> str:
    # The worker's log is JSON lines on stdout; read what is there so far.
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    chunk = proc.stdout.read() or ""
    _peek.buffer = getattr(_peek, "buffer", "") + chunk  # type: ignore[attr-defined]
    return _peek.buffer  # type: ignore[attr-defined,no-any-return]


@pytest.mark.slow
def test_sigkill_mid_job_reruns_after_the_lease_expires(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    app = write_app(tmp_path)
    job = enqueue(dsn, 7, 30)
    victim = start_worker(dsn, app, "--lease", "2", cwd=tmp_path)
    try:
        wait_until(lambda: running(business) == 1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        victim.kill()
    # The killed attempt's transaction never committed: no business row.
    assert business.execute("select count(*) from business").fetchone() == (0,)
    business.execute(
        "update pgqueue.jobs set args = jsonb_set(args, '{sleep}', '0') where id = %s",
        [job],
    )
    rescuer = start_worker(dsn, app, "--lease", "2", cwd=tmp_path)
    try:
        wait_until(
            lambda: (
                business.execute(
                    "select state from pgqueue.jobs_overview where id = %s", [job]
                ).fetchone()
                == ("succeeded",)
            ),
            timeout=30,
        )
    finally:
        rescuer.terminate()
        rescuer.wait(timeout=20)
    assert business.execute("select job_id, n from business").fetchall() == [(job, 7)]
    row = business.execute(
        "select attempts, errors from pgqueue.finished_jobs where id = %s", [job]
    ).fetchone()
    assert row is not None and row[0] == 1 and row[1][0]["kind"] == "lease_expired"
