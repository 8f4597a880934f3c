"""A fleet of real worker processes and the end-of-test invariants.

Every fault test enqueues jobs whose transactional handler inserts one row into
a business table, injects its fault, lets the fleet finish, then checks: every
job is in its intended final state and the business table has exactly one row
per succeeded job.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[2]

APP = """
import os, time
import pgqueue

app = pgqueue.App()

@app.task(max_attempts=int(os.environ.get("MAX_ATTEMPTS", "25")),
          retry=pgqueue.ExponentialBackoff(base=0.05, max_delay=0.5))
def record(ctx, n, sleep=0.0):
    ctx.conn.execute("insert into business (job_id, n, worker) values (%s, %s, %s)",
                     [ctx.job.id, n, ctx.worker_id])
    if sleep:
        time.sleep(sleep)

@app.task(transactional=False,
          retry=pgqueue.ExponentialBackoff(base=0.05, max_delay=0.2))
async def flaky(ctx):
    if ctx.job.attempts < 2:
        raise RuntimeError("fails twice, then succeeds")

@app.task(max_attempts=3, retry=pgqueue.ExponentialBackoff(base=0.05, max_delay=0.2))
def poison(ctx):
    os._exit(3)  # the worker dies with the job, every time
"""


def setup_business(conn: psycopg.Connection[Any]) -> None:
    # No unique key on purpose: a duplicate effect must show up as a second row
    # rather than block or fail the second writer.
    conn.execute("create table business (job_id bigint, n int, worker text)")


def enqueue(conn: psycopg.Connection[Any], count: int, sleep: float = 0.0) -> list[int]:
    import pgqueue

    app = pgqueue.App(conn.info.dsn)
    with conn.transaction():
        return app.enqueue_many(
            conn, "record", [{"n": i, "sleep": sleep} for i in range(count)]
        )


class Fleet:
    """Worker processes running the app above, restartable after a kill."""

    def __init__(
        self, dsn: str, directory: Path, *args: str, env: dict[str, str] | None = None
    ):
        (directory / "faultapp.py").write_text(APP)
        self.dsn = dsn
        self.directory = directory
        self.args = args
        self.env = {**os.environ, "PGQUEUE_DSN": dsn, **(env or {})}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, count: int = 1) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(count):
            log = self.directory / f"worker-{len(self.logs)}.log"
            self.logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "pgqueue", "worker", "faultapp:app", "--log-json",
                 "--log-level", "warning", *self.args],
                cwd=self.directory, env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            self.procs.append(proc)
            started.append(proc)
        return started

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill_random(self, sig: int = signal.SIGKILL) -> None:
        victims = self.alive()
        if victims:
            random.choice(victims).send_signal(sig)

    def keep(self, count: int) -> None:
        """Restart workers until ``count`` are alive."""
        missing = count - len(self.alive())
        if missing > 0:
            self.start(missing)

    def stop(self) -> None:
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_text(self) -> str:
        return "\n".join(
            log.read_text(errors="replace") for log in self.logs if log.exists()
        )


def all_finished(conn: psycopg.Connection[Any], ids: list[int]) -> bool:
    row = conn.execute(
        "select count(*) from pgqueue.finished_jobs where id = any(%s)", [ids]
    ).fetchone()
    return bool(row and row[0] == len(ids))


def check_exactly_once(conn: psycopg.Connection[Any], ids: list[int]) -> None:
    """Every job succeeded and left exactly one business row."""
    states = conn.execute(
        "select state::text, count(*) from pgqueue.jobs_overview where id = any(%s) group by 1",
        [ids],
    ).fetchall()
    assert dict(states) == {"succeeded": len(ids)}, states
    dupes = conn.execute(
        "select job_id, count(*) from business group by job_id having count(*) > 1"
    ).fetchall()
    assert dupes == [], f"duplicate effects: {dupes[:5]}"
    row = conn.execute(
        "select count(distinct job_id) from business where job_id = any(%s)", [ids]
    ).fetchone()
    assert row == (len(ids),)
