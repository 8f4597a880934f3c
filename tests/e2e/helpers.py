"""Run the real `pgqueue` command in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PGQUEUE = [sys.executable, "-m", "pgqueue"]


def env_for(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env["PGQUEUE_DSN"] = dsn
    env["PYTHONPATH"] = str(ROOT)
    return env


def cli(
    dsn: str, *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*PGQUEUE, *args],
        capture_output=True,
        text=True,
        env=env_for(dsn),
        cwd=cwd or ROOT,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"pgqueue {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
    return result


def start_worker(dsn: str, app: str, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PGQUEUE, "worker", app, "--log-json", *args],
        env=env_for(dsn),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


APP_MODULE = """
import os, time
import pgqueue

app = pgqueue.App()

@app.task(max_attempts=int(os.environ.get("MAX_ATTEMPTS", "25")))
def record(ctx, n, sleep=0.0):
    ctx.conn.execute("insert into business (job_id, n) values (%s, %s)", [ctx.job.id, n])
    time.sleep(sleep)
"""


def write_app(directory: Path, name: str = "jobsapp") -> str:
    (directory / f"{name}.py").write_text(APP_MODULE)
    return f"{name}:app"
