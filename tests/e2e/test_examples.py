"""Every script in examples/ runs against a database, and a worker drains its jobs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .helpers import ROOT, cli, env_for

Conn = psycopg.Connection[Any]

pytestmark = pytest.mark.slow


def run_script(dsn: str, name: str, *args: str, cwd: Path) -> str:
    """Run examples/<name> as a script (from elsewhere than the checkout)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        env=env_for(dsn),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def drain(dsn: str, module: str, queue: str) -> None:
    cli(
        dsn,
        "worker",
        f"examples.{module}:app",
        "--queue",
        queue,
        "--concurrency",
        "20",
        "--until-empty",
        cwd=ROOT,
    )


def states(conn: Conn) -> list[tuple[str, str, int]]:
    return conn.execute(
        "select task, state::text, count(*)::int from pgqueue.jobs_overview"
        " group by 1, 2 order by 1, 2"
    ).fetchall()


def test_every_example_has_a_test() -> None:
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    tested = {"quickstart.py", "orders.py", "llm_summary.py"}
    assert scripts == tested, "add a test here for each new script in examples/"


def test_quickstart(dsn: str, conn: Conn, tmp_path: Path) -> None:
    assert "enqueued 25 jobs" in run_script(dsn, "quickstart.py", "25", cwd=tmp_path)
    assert states(conn) == [("add", "queued", 25)]
    drain(dsn, "quickstart", "default")
    assert states(conn) == [("add", "succeeded", 25)]
    rows = conn.execute(
        "select o.args, o.result, s.total from pgqueue.jobs_overview o"
        " join quickstart_sums s on s.job_id = o.id"
    ).fetchall()
    assert len(rows) == 25
    for args, result, total in rows:
        assert result == total == args["a"] + args["b"]


def test_orders_commit_and_rollback(dsn: str, conn: Conn, tmp_path: Path) -> None:
    run_script(dsn, "orders.py", cwd=tmp_path)
    # The declined order left neither an order row nor a job.
    orders = conn.execute("select id, item from orders").fetchall()
    assert [item for _, item in orders] == ["teapot"]
    [(order_id, _)] = orders
    assert states(conn) == [("send_receipt", "queued", 1)]

    drain(dsn, "orders", "emails")
    assert states(conn) == [("send_receipt", "succeeded", 1)]
    job = conn.execute("select id from pgqueue.jobs_overview").fetchone()
    assert conn.execute("select order_id, job_id from receipts").fetchall() == [
        (order_id, job[0] if job else None)
    ]

    # Running the script again adds one more order and one more receipt.
    run_script(dsn, "orders.py", cwd=tmp_path)
    drain(dsn, "orders", "emails")
    assert conn.execute("select count(*) from receipts").fetchone() == (2,)
    assert states(conn) == [("send_receipt", "succeeded", 2)]


def test_llm_summary_stores_results(dsn: str, conn: Conn, tmp_path: Path) -> None:
    run_script(dsn, "llm_summary.py", "30", cwd=tmp_path)
    assert states(conn) == [("summarize", "queued", 30)]
    drain(dsn, "llm_summary", "llm")
    assert states(conn) == [("summarize", "succeeded", 30)]
    results = conn.execute(
        "select args, result from pgqueue.jobs_overview order by id"
    ).fetchall()
    for args, result in results:
        assert result["doc_id"] == args["doc_id"]
        assert result["summary"] and args["text"].startswith(
            result["summary"].removesuffix(" ...")
        )
        assert result["attempt"] == 1
