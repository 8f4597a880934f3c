"""Run the installed `pgqueue` command in subprocesses, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg

from ..waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _find_pgqueue() -> str:
    # The console script of the venv running the tests (not whatever is on PATH).
    found = shutil.which("pgqueue", path=str(Path(sys.executable).parent))
    found = found or shutil.which("pgqueue")
    if found is None:
        raise RuntimeError("the `pgqueue` script is not installed: run `make install`")
    return found


PGQUEUE = _find_pgqueue()


def env_for(dsn: str) -> dict[str, str]:
    """The environment of a subprocess: PGQUEUE_DSN set, nothing else pointing
    at a database or at this checkout's modules."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "PYTHONPATH") and not k.startswith("PG")
    }
    env["PGQUEUE_DSN"] = dsn
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(
    dsn: str,
    *args: str,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run `pgqueue ARGS` to completion; by default fail the test on non-zero."""
    result = subprocess.run(
        [PGQUEUE, *args],
        capture_output=True,
        text=True,
        env=env_for(dsn),
        cwd=cwd or ROOT,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"pgqueue {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def events(stderr: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines (--log-json), parsed."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


class WorkerProcess:
    """A `pgqueue worker` subprocess whose JSON log is collected as it runs.

    A thread drains stderr so the pipe never fills up, and tests can wait for
    a log event. Leaving the ``with`` block kills the process if still alive.
    """

    def __init__(self, dsn: str, app: str, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [PGQUEUE, "worker", app, "--log-json", *args],
            env=env_for(dsn),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        return events("\n".join(self.lines))

    def event_names(self) -> list[str]:
        return [e.get("event", "") for e in self.events()]

    def wait_for_event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            if self.proc.poll() is not None and name not in self.event_names():
                raise AssertionError(
                    f"worker exited {self.proc.returncode} before {name!r}:\n"
                    + self.log()
                )
            return next((e for e in self.events() if e.get("event") == name), None)

        found: dict[str, Any] = wait_until(seen, timeout=timeout)
        return found

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def log(self) -> str:
        return "\n".join(self.lines)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# An application module that tests write into tmp_path and run with
# `pgqueue worker jobsapp:app` from that directory (the CLI puts the current
# directory on sys.path). Its handlers write to a `business` table in the
# job's transaction and leave a marker file once they are inside the job.
APP_MODULE = '''
import asyncio
import time
from pathlib import Path

import pgqueue

app = pgqueue.App()  # PGQUEUE_DSN


def _mark(ctx):
    """Leave started/<job id>.<run>; return the run number (1 on the first run)."""
    started = Path("started")
    started.mkdir(exist_ok=True)
    run = len(list(started.glob(f"{ctx.job.id}.*"))) + 1
    (started / f"{ctx.job.id}.{run}").touch()
    return run


@app.task
def record(ctx, n, sleep=0.0):
    """Insert a business row; on the job's first run only, then sleep `sleep` s."""
    ctx.conn.execute(
        "insert into business (job_id, n) values (%s, %s)", [ctx.job.id, n]
    )
    if _mark(ctx) == 1:
        time.sleep(sleep)
    return {"n": n}


@app.task
async def record_async(ctx, n, sleep=0.0):
    """`record` as an async handler (ctx.conn is an AsyncConnection)."""
    await ctx.conn.execute(
        "insert into business (job_id, n) values (%s, %s)", [ctx.job.id, n]
    )
    if _mark(ctx) == 1:
        await asyncio.sleep(sleep)
    return {"n": n}


@app.task(transactional=False)
async def call(ctx, n, sleep=0.0):
    """A non-transactional handler (no ctx.conn): its result is all it leaves."""
    if _mark(ctx) == 1:
        await asyncio.sleep(sleep)
    return {"n": n}


@app.task
def explode(ctx, n=0):
    """Insert a business row, then fail: the row must roll back."""
    ctx.conn.execute(
        "insert into business (job_id, n) values (%s, %s)", [ctx.job.id, n]
    )
    raise RuntimeError(f"boom {n}")
'''

BUSINESS_TABLE = "create table business (job_id bigint primary key, n int not null)"


def write_app(directory: Path, name: str = "jobsapp") -> str:
    """Write the test application module; return its MODULE:APP."""
    (directory / f"{name}.py").write_text(APP_MODULE)
    return f"{name}:app"


def started(directory: Path, job_id: int, run: int = 1) -> bool:
    """Whether a handler of ``job_id`` began its ``run``-th run (from 1)."""
    return (directory / "started" / f"{job_id}.{run}").exists()


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    """The job as pgqueue.jobs_overview shows it (live or finished)."""
    cur = conn.execute(
        "select state::text as state, attempts, leased_by, errors, result"
        " from pgqueue.jobs_overview where id = %s",
        [job_id],
    )
    row = cur.fetchone()
    assert row is not None, f"job {job_id} not found"
    names = [c.name for c in cur.description or []]
    return dict(zip(names, row, strict=True))
