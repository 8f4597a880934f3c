"""The `pgqueue` command line against a real database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from .helpers import ROOT, cli, env_for, write_app

Conn = psycopg.Connection[Any]


def test_migrate_twice_is_a_no_op(dsn: str) -> None:
    first = cli(dsn, "migrate")
    assert "up to date" in first.stdout  # the test database is migrated already
    assert "up to date" in cli(dsn, "migrate").stdout


def test_migrate_print_applies_cleanly_elsewhere(dsn: str, server_dsn: str) -> None:
    script = cli(dsn, "--schema", "printed", "migrate", "--print").stdout
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute("drop database if exists pgqueue_printed")
        admin.execute("create database pgqueue_printed")
    try:
        info = psycopg.conninfo.conninfo_to_dict(server_dsn)
        info["dbname"] = "pgqueue_printed"
        with psycopg.connect(**info, autocommit=True) as conn:
            conn.execute(script.encode())
            assert conn.execute("select printed.enqueue('t')").fetchone() == (1,)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute("drop database pgqueue_printed with (force)")


def test_other_schema(dsn: str, conn: Conn) -> None:
    assert "applied 0001" in cli(dsn, "--schema", "tenant_x", "migrate").stdout
    job = cli(dsn, "--schema", "tenant_x", "enqueue", "t", "--args", '{"a": 1}').stdout
    assert conn.execute(
        "select args from tenant_x.jobs where id = %s", [int(job)]
    ).fetchone() == ({"a": 1},)
    conn.execute(sql.SQL("drop schema tenant_x cascade"))


def test_enqueue_stats_jobs_cancel_retry_round_trip(dsn: str, conn: Conn) -> None:
    job = int(
        cli(
            dsn,
            "enqueue",
            "send",
            "--args",
            '{"to": "a@b"}',
            "--queue",
            "mail",
            "--priority",
            "5",
        ).stdout
    )
    later = int(
        cli(dsn, "enqueue", "send", "--queue", "mail", "--delay", "3600").stdout
    )
    stats = json.loads(cli(dsn, "stats", "--json").stdout)
    assert stats == [
        {
            "queue": "mail",
            "queued": 1,
            "scheduled": 1,
            "running": 0,
            "succeeded": 0,
            "dead": 0,
            "cancelled": 0,
            "oldest_queued_s": stats[0]["oldest_queued_s"],
        }
    ]
    assert "mail" in cli(dsn, "stats").stdout
    listing = cli(dsn, "jobs", "--queue", "mail").stdout
    assert str(job) in listing and str(later) in listing
    assert "cancelled" in cli(dsn, "cancel", str(later)).stdout
    # Make the first job dead, then retry it from the CLI.
    conn.execute("select pgqueue.lease(array['mail'], 1, 'w', 60)")
    token = conn.execute(
        "select lease_token from pgqueue.jobs where id = %s", [job]
    ).fetchone()
    conn.execute("update pgqueue.jobs set max_attempts = 1 where id = %s", [job])
    conn.execute(
        """select pgqueue.fail(%s, %s, '{"error": "boom"}', 0)""",
        [job, token[0] if token else None],
    )
    shown = json.loads(cli(dsn, "jobs", str(job)).stdout)
    assert shown["state"] == "dead" and shown["errors"][0]["error"] == "boom"
    assert "queued again" in cli(dsn, "retry", str(job)).stdout
    assert conn.execute(
        "select state::text, attempts from pgqueue.jobs where id = %s", [job]
    ).fetchone() == ("queued", 0)
    assert "0 dead jobs" in cli(dsn, "retry", "--all-dead", "mail").stdout
    assert "pruned 0" in cli(dsn, "prune").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "t", "--args", "{not json"], "not valid JSON"),
        (["enqueue", "t", "--queue", "bad queue"], "invalid queue name"),
        (["enqueue", "t", "--run-at", "2030-01-01T00:00:00"], "naive datetime"),
        (["cancel", "999999"], "not found"),
        (["retry", "999999"], "not found"),
        (["retry"], "give a job id"),
        (["jobs", "999999"], "not found"),
        (["--schema", "Bad-Schema", "stats"], "invalid schema name"),
        (["worker", "no_such_module:app"], "cannot import"),
        (["bench", "--workload", "nope"], "unknown workload"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    dsn: str, args: list[str], message: str
) -> None:
    result = cli(dsn, *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")


def test_unreachable_database_is_a_clear_error(dsn: str) -> None:
    result = cli(
        "postgresql://nobody@127.0.0.1:1/x?connect_timeout=2", "stats", check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to PostgreSQL")
    assert "Traceback" not in result.stderr


def test_worker_until_empty_drains_an_app_module(
    dsn: str, conn: Conn, tmp_path: Path
) -> None:
    conn.execute("create table business (job_id bigint primary key, n int)")
    app = write_app(tmp_path)
    for n in range(20):
        cli(dsn, "enqueue", "record", "--args", json.dumps({"n": n}))
    result = cli(dsn, "worker", app, "--until-empty", "--log-json", cwd=tmp_path)
    events = [
        json.loads(line)["event"]
        for line in result.stderr.splitlines()
        if line.startswith("{")
    ]
    assert events.count("job_succeeded") == 20 and events[-1] == "worker_stopped"
    assert conn.execute("select count(*) from business").fetchone() == (20,)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["quickstart.py", "orders.py", "llm_summary.py"])
def test_examples_run_and_drain(dsn: str, conn: Conn, script: str) -> None:
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "30"],
        env=env_for(dsn),
        check=True,
        timeout=60,
    )
    module = "examples." + script.removesuffix(".py") + ":app"
    queue = {"orders.py": "emails", "llm_summary.py": "llm"}.get(script, "default")
    cli(dsn, "worker", module, "--queue", queue, "-c", "30", "--until-empty")
    depth = conn.execute(
        "select queued, running, succeeded from pgqueue.queue_depth"
    ).fetchone()
    assert depth is not None and depth[:2] == (0, 0) and depth[2] >= 1
    if script == "orders.py":
        assert conn.execute("select count(*) from receipts").fetchone() == (1,)
        assert conn.execute("select count(*) from orders").fetchone() == (1,)


@pytest.mark.slow
def test_wheel_ships_the_sql(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("build")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("pgqueue-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pgqueue/sql/migrations/0001_initial.sql" in names
    assert "pgqueue/sql/migrations/0002_functions.sql" in names
    # Run `migrate --print` from the wheel alone (not from this checkout).
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    result = subprocess.run(
        [sys.executable, "-m", "pgqueue", "migrate", "--print"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'create function "pgqueue".lease' in result.stdout
