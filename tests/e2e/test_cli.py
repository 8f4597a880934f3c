"""The `pgqueue` command against a real database: migrate, inspect, manage jobs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgqueue import _sql, migrations

from ..waiting import wait_until
from .helpers import (
    BUSINESS_TABLE,
    PGQUEUE,
    cli,
    env_for,
    events,
    job_row,
    write_app,
)

Conn = psycopg.Connection[Any]

# The transitions and helpers a DBA's copy of the schema must provide.
FUNCTIONS = {
    "enqueue",
    "enqueue_many",
    "lease",
    "complete",
    "complete_one",
    "complete_all",
    "fail",
    "heartbeat",
    "reap",
    "hand_back",
    "cancel",
    "retry",
    "retry_dead",
    "prune",
    "next_run_at",
    "register_worker",
    "unregister_worker",
    "configure_queue",
    "pause_queue",
    "resume_queue",
    "set_queue_notify",
}
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/x"
QUICKSTART = "examples.quickstart:app"  # a real app, importable from the checkout


@pytest.fixture
def business(conn: Conn) -> Conn:
    conn.execute(BUSINESS_TABLE)
    return conn


@pytest.fixture
def scratch_db(server_dsn: str) -> Iterator[str]:
    """DSN of an empty database (no pgqueue schema), dropped afterwards."""
    name = f"pgqueue_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    info = conninfo_to_dict(server_dsn)
    info["dbname"] = name
    try:
        yield make_conninfo("", **info)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


def functions_in(conn: Conn, schema: str) -> set[str]:
    rows = conn.execute(
        "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = %s",
        [schema],
    ).fetchall()
    return {r[0] for r in rows}


# -- migrate ------------------------------------------------------------------


def test_migrate_applies_once_then_reports_up_to_date(scratch_db: str) -> None:
    first = cli(scratch_db, "migrate")
    expected = [f"applied {m.version:04d}_{m.name}" for m in migrations.load()]
    assert first.stdout.splitlines() == expected
    second = cli(scratch_db, "migrate")
    assert second.stdout.strip() == "schema 'pgqueue' is up to date"
    with psycopg.connect(scratch_db) as conn:
        assert conn.execute("select count(*) from pgqueue.migrations").fetchone() == (
            len(expected),
        )


def test_a_migrate_that_fails_partway_says_what_it_applied_and_what_failed(
    scratch_db: str,
) -> None:
    """0022 waits at most 5 s for the jobs table, which a long transaction
    holds: migrate applied 0021 and said nothing of it, and its error named
    neither the migration that failed nor what to do."""
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        migrations.migrate(conn, target=20)
    with psycopg.connect(scratch_db) as reader:
        reader.execute("select count(*) from pgqueue.jobs")  # held till the end
        failed = cli(scratch_db, "migrate", check=False)
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == [
        "applied 0021_worker_rows_follow_their_process"
    ]
    assert failed.stderr.startswith(
        "error: migration 0022_run_at_within_what_clients_read failed and changed"
        " nothing: canceling statement due to lock timeout"
    )
    assert failed.stderr.strip().endswith("run `pgqueue migrate` again")
    again = cli(scratch_db, "migrate")
    assert (
        again.stdout.splitlines()[0] == "applied 0022_run_at_within_what_clients_read"
    )
    with psycopg.connect(scratch_db) as conn:
        assert migrations.current_version(conn) == migrations.latest_version()


def test_migrate_print_is_sql_a_dba_can_apply(scratch_db: str) -> None:
    # --print needs no database at all.
    script = cli(UNREACHABLE, "migrate", "--print").stdout
    assert "create function" in script
    psql = shutil.which("psql")
    if psql:
        # The way a DBA would apply it; stops at the first error.
        subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", scratch_db],
            input=script,
            text=True,
            check=True,
            capture_output=True,
            timeout=60,
        )
    else:
        with psycopg.connect(scratch_db, autocommit=True) as conn:
            conn.execute(script.encode())
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        assert functions_in(conn, "pgqueue") >= FUNCTIONS
        assert conn.execute("select pgqueue.enqueue('t')").fetchone() == (1,)
    # The printed script records its versions, so migrate has nothing to do.
    assert "up to date" in cli(scratch_db, "migrate").stdout
    assert json.loads(cli(scratch_db, "stats", "--json").stdout)[0]["queued"] == 1


def test_schema_option_keeps_a_separate_queue(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    out = cli(dsn, "--schema", "other", "migrate").stdout
    assert out.splitlines()[0] == "applied 0001_initial"
    assert "up to date" in cli(dsn, "--schema", "other", "migrate").stdout
    assert functions_in(business, "other") >= FUNCTIONS
    script = cli(dsn, "--schema", "other", "migrate", "--print").stdout
    assert 'create function "other".lease' in script
    assert '"pgqueue".' not in script

    job = int(
        cli(dsn, "--schema", "other", "enqueue", "record", "--args", '{"n": 5}').stdout
    )
    assert business.execute(
        "select args from other.jobs where id = %s", [job]
    ).fetchone() == ({"n": 5},)
    assert cli(dsn, "stats").stdout.strip() == "no jobs"  # the default schema
    [row] = json.loads(cli(dsn, "--schema", "other", "stats", "--json").stdout)
    assert (row["queue"], row["queued"]) == ("default", 1)

    app = write_app(tmp_path)
    cli(dsn, "--schema", "other", "worker", app, "--until-empty", cwd=tmp_path)
    assert business.execute("select job_id, n from business").fetchall() == [(job, 5)]
    shown = json.loads(cli(dsn, "--schema", "other", "jobs", str(job)).stdout)
    assert shown["state"] == "succeeded" and shown["result"] == {"n": 5}


def test_prune_waits_for_a_pruning_worker_then_prunes(dsn: str, conn: Conn) -> None:
    """`pgqueue prune` takes the workers' prune lock: it waits while a worker's
    batch holds it, and prunes once it is free."""
    conn.execute(
        "insert into pgqueue.finished_jobs (id, queue, task, args, priority, state,"
        " attempts, max_attempts, created_at, finished_at)"
        " select i, 'q', 't', '{}', 0, 'succeeded', 0, 1, now(),"
        " now() - interval '30 days' from generate_series(1, 30) i"
    )
    lock = _sql.prune_lock_name("pgqueue")
    with psycopg.connect(dsn) as worker:  # a worker mid-batch: lock held
        worker.execute(_sql.statements("pgqueue").prune_lock, [lock])
        proc = subprocess.Popen(
            [PGQUEUE, "prune"], env=env_for(dsn), stdout=subprocess.PIPE, text=True
        )
        try:
            wait_until(
                lambda: (
                    conn.execute(
                        "select count(*) from pg_locks"
                        " where locktype = 'advisory' and not granted"
                    ).fetchone()
                    == (1,)
                )
            )
            assert proc.poll() is None
            assert conn.execute(
                "select count(*) from pgqueue.finished_jobs"
            ).fetchone() == (30,)
        finally:
            worker.rollback()  # the worker's batch ends
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.strip() == "pruned 30 finished jobs"


# -- managing jobs --------------------------------------------------------------


def test_enqueue_stats_jobs_retry_cancel_prune_round_trip(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    app = write_app(tmp_path)

    def enqueue(*args: str) -> int:
        return int(cli(dsn, "enqueue", *args).stdout)

    ok = enqueue("record", "--args", '{"n": 1}', "--queue", "mail", "--priority", "5")
    later = enqueue(
        "record", "--args", '{"n": 2}', "--queue", "mail", "--delay", "3600"
    )
    bad = enqueue(
        "explode", "--args", '{"n": 3}', "--queue", "mail", "--max-attempts", "1"
    )
    key = ["--idempotency-key", "k-1", "--queue", "mail"]
    keyed = enqueue("record", "--args", '{"n": 1}', *key)
    assert enqueue("record", "--args", '{"n": 1}', *key) == keyed  # same key
    unknown = enqueue("nosuch", "--queue", "other", "--max-attempts", "1")

    stats, _ = json.loads(cli(dsn, "stats", "--json").stdout)  # mail, other
    assert {k: stats[k] for k in ("queue", "queued", "scheduled", "running")} == {
        "queue": "mail",
        "queued": 3,
        "scheduled": 1,
        "running": 0,
    }
    table = cli(dsn, "stats").stdout.splitlines()
    assert table[0].split() == [
        "queue",
        "queued",
        "scheduled",
        "running",
        "succeeded",
        "dead",
        "cancelled",
        "oldest_queued_s",
        "paused",
    ]
    assert table[2].split()[:7] == ["mail", "3", "1", "0", "0", "0", "0"]

    listing = cli(dsn, "jobs", "--queue", "mail").stdout
    assert {int(line.split()[0]) for line in listing.splitlines()[2:]} == {
        ok,
        later,
        bad,
        keyed,
    }
    scheduled = cli(dsn, "jobs", "--state", "queued", "--task", "explode").stdout
    assert [int(line.split()[0]) for line in scheduled.splitlines()[2:]] == [bad]

    assert cli(dsn, "cancel", str(later)).stdout.strip() == f"job {later} cancelled"
    again = cli(dsn, "cancel", str(later), check=False)
    assert again.returncode == 1
    assert "only a queued job can be cancelled" in again.stderr

    cli(dsn, "worker", app, "-q", "mail", "-q", "other", "--until-empty", cwd=tmp_path)
    assert job_row(business, ok)["state"] == "succeeded"
    # A job whose task this worker does not know fails like any other.
    shown = json.loads(cli(dsn, "jobs", str(unknown)).stdout)
    assert (shown["state"], shown["errors"][0]["kind"]) == ("dead", "TaskNotFound")
    assert "no task named 'nosuch'" in shown["errors"][0]["error"]
    succeeded = cli(dsn, "retry", str(ok), check=False)
    assert succeeded.returncode == 1
    assert "only dead or cancelled jobs can be retried" in succeeded.stderr
    # explode's row was rolled back with its failed attempt.
    assert sorted(business.execute("select job_id from business").fetchall()) == [
        (ok,),
        (keyed,),
    ]

    shown = json.loads(cli(dsn, "jobs", str(bad)).stdout)
    assert shown["state"] == "dead"
    assert (shown["attempts"], shown["max_attempts"]) == (1, 1)
    [error] = shown["errors"]
    assert error["error"] == "RuntimeError: boom 3"
    assert "Traceback" in error["traceback"]
    dead = cli(dsn, "jobs", "--state", "dead", "--queue", "mail").stdout
    assert [int(line.split()[0]) for line in dead.splitlines()[2:]] == [bad]

    assert cli(dsn, "retry", str(bad)).stdout.strip() == f"job {bad} queued again"
    row = job_row(business, bad)
    assert (row["state"], row["attempts"], len(row["errors"])) == ("queued", 0, 1)

    # Dead again, then back with --all-dead; its error history grows.
    cli(dsn, "worker", app, "--queue", "mail", "--until-empty", cwd=tmp_path)
    assert job_row(business, bad)["state"] == "dead"
    out = cli(dsn, "retry", "--all-dead", "mail").stdout
    assert out.strip() == "1 dead jobs of 'mail' queued again"
    assert len(job_row(business, bad)["errors"]) == 2
    cli(dsn, "cancel", str(bad))

    # Everything is finished now: prune with no retention deletes it all.
    assert cli(dsn, "prune").stdout.strip() == "pruned 0 finished jobs"
    pruned = cli(dsn, "prune", "--older-than", "0").stdout.strip()
    assert pruned == "pruned 5 finished jobs"
    assert cli(dsn, "jobs").stdout.strip() == "no jobs"
    assert cli(dsn, "stats").stdout.strip() == "no jobs"


def test_a_queue_can_discard_succeeded_jobs(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    app = write_app(tmp_path)
    out = cli(dsn, "queue", "fast").stdout.strip()
    assert out == "queue fast: keep_succeeded=true paused=false notify=true"
    out = cli(dsn, "queue", "fast", "--discard-succeeded").stdout.strip()
    assert out == "queue fast: keep_succeeded=false paused=false notify=true"
    key = ["--queue", "fast", "--idempotency-key", "k-1"]
    first = int(cli(dsn, "enqueue", "record", "--args", '{"n": 1}', *key).stdout)
    kept = int(cli(dsn, "enqueue", "record", "--args", '{"n": 2}').stdout)
    cli(
        dsn, "worker", app, "-q", "fast", "-q", "default", "--until-empty", cwd=tmp_path
    )
    # Both ran and committed their business rows; only the default queue's job
    # has a history row.
    assert sorted(business.execute("select job_id from business").fetchall()) == [
        (first,),
        (kept,),
    ]
    finished = business.execute("select id from pgqueue.finished_jobs").fetchall()
    assert finished == [(kept,)]
    assert business.execute("select count(*) from pgqueue.jobs").fetchone() == (0,)
    # The key went with its job: the same key enqueues a new job.
    second = int(cli(dsn, "enqueue", "record", "--args", '{"n": 1}', *key).stdout)
    assert second != first
    back = cli(dsn, "queue", "fast", "--keep-succeeded").stdout.strip()
    assert back == "queue fast: keep_succeeded=true paused=false notify=true"
    bad = cli(dsn, "queue", "no good", "--discard-succeeded", check=False)
    assert bad.returncode == 1 and "invalid queue name" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "t", "--args", "{not json"], "--args is not valid JSON"),
        (["enqueue", "t", "--args", "[1, 2]"], "must be a JSON object"),
        (["enqueue", "t", "--args", "null"], "must be a JSON object"),
        (["enqueue", "t", "--queue", "bad queue"], "invalid queue name"),
        (["enqueue", "bad task"], "invalid task name"),
        (["enqueue", "t", "--run-at", "2030-01-01T00:00:00"], "naive datetime"),
        (["enqueue", "t", "--run-at", "tomorrow"], "not an ISO 8601 time"),
        (["jobs", "424242"], "job 424242 not found"),
        (["cancel", "424242"], "job 424242 not found"),
        (["retry", "424242"], "job 424242 not found"),
        (["retry"], "give a job id or --all-dead QUEUE"),
        (["--schema", "Bad-Schema", "stats"], "invalid schema name"),
        (["--schema", "nowhere", "stats"], "no pgqueue schema 'nowhere'"),
        (["worker", "no_such_module:app"], "cannot import 'no_such_module'"),
        (["worker", "json:app"], "'json:app' is not a pgqueue.App"),
        (["worker", "json:app", "--log-level", "loud"], "unknown log level 'loud'"),
        (["worker", QUICKSTART, "--queue", "bad queue"], "invalid queue name"),
        (["--dsn", "nonsense", "stats"], "invalid connection string"),
        (["--dsn", "nonsense", "worker", QUICKSTART], "nonsense"),
        (["enqueue", "t", "--priority", "40000"], "out of range"),
        (["jobs", "--state", "scheduled"], "unknown state 'scheduled'"),
        (
            ["enqueue", "t", "--delay", "5", "--run-at", "2030-01-01T00:00:00+00:00"],
            "not both",
        ),
        (["enqueue", "t", "--args", '{"a": ' + "9" * 5000 + "}"], "cannot be read"),
        (["enqueue", "t", "--args", "[" * 100_000], "cannot be read"),
        (["--schema", "pgqueue\n", "stats"], "invalid schema name"),
        (["--schema", "", "stats"], "invalid schema name"),  # was pgqueue
        (["--schema", "information_schema", "migrate"], "PostgreSQL's own"),
        (["--schema", "nosuch", "retry", "1"], "run `pgqueue migrate`"),
        (["--schema", "nosuch", "cancel", "1"], "run `pgqueue migrate`"),
        (["--schema", "nosuch", "enqueue", "t"], "run `pgqueue migrate`"),
        (["retry", "1", "--all-dead", "q"], "not both"),
        (["jobs", "--task", "\udcff"], "cannot be encoded"),  # the byte 0xff
        (["worker", ".relative:app"], "absolute name"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    dsn: str, args: list[str], message: str
) -> None:
    result = cli(dsn, *args, check=False)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("source", "raised"),
    [
        ("raise RuntimeError('no config')\n", "RuntimeError: no config"),
        ("def broken(:\n", "SyntaxError"),
    ],
)
def test_an_app_module_that_fails_to_import_is_one_line(
    dsn: str, tmp_path: Path, source: str, raised: str
) -> None:
    (tmp_path / "failing.py").write_text(source)
    result = cli(dsn, "worker", "failing:app", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: importing 'failing' raised ")
    assert raised in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "option",
    [
        ["--lease", "0"],
        ["--lease", "0.5"],  # renewed every 0.17 s: took the database for gone
        ["--lease", "inf"],
        ["--lease", "nan"],
        ["--poll-interval", "0"],
        ["--grace", "-1"],
        ["--grace", "nan"],
    ],
)
def test_worker_options_out_of_range_get_the_usage_message(
    dsn: str, option: list[str]
) -> None:
    result = cli(dsn, "worker", QUICKSTART, *option, check=False)
    assert result.returncode == 2
    assert f"Invalid value for '{option[0]}'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["migrate"],
        ["stats"],
        ["jobs"],
        ["enqueue", "t"],
        ["cancel", "1"],
        ["retry", "1"],
        ["prune"],
        ["worker", "jobsapp:app"],
    ],
)
def test_unreachable_database_is_a_clear_error(tmp_path: Path, args: list[str]) -> None:
    write_app(tmp_path)
    for how in (["--dsn", UNREACHABLE, *args], args):  # the flag, then the env
        result = cli(UNREACHABLE, *how, cwd=tmp_path, check=False)
        assert result.returncode == 1
        assert result.stderr.startswith("error: cannot connect to PostgreSQL")
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["stats"], ["worker", "jobsapp:app"]])
def test_unreachable_database_error_is_one_line(
    tmp_path: Path, args: list[str]
) -> None:
    # libpq's message has a second, tab-indented hint line ("Is the server
    # running on that host...?"); the CLI promises one `error:` line.
    write_app(tmp_path)
    result = cli(UNREACHABLE, *args, cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- a worker -------------------------------------------------------------------


def test_worker_until_empty_runs_an_app_module_from_the_current_directory(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    business.execute(
        "select pgqueue.enqueue('record', jsonb_build_object('n', g))"
        " from generate_series(1, 40) g"
    )
    app = write_app(tmp_path)
    result = cli(
        dsn, "worker", app, "-c", "4", "--until-empty", "--log-json", cwd=tmp_path
    )
    assert result.returncode == 0
    assert business.execute(
        "select count(*), count(distinct job_id), sum(n) from business"
    ).fetchone() == (40, 40, sum(range(1, 41)))
    assert business.execute(
        "select state::text, count(*) from pgqueue.jobs_overview group by 1"
    ).fetchall() == [("succeeded", 40)]
    names = [e["event"] for e in events(result.stderr)]
    assert names.count("job_succeeded") == 40
    assert names[0] == "worker_started" and names[-1] == "worker_stopped"


def test_worker_refuses_a_schema_behind_the_code(
    scratch_db: str, tmp_path: Path
) -> None:
    app = write_app(tmp_path)
    result = cli(scratch_db, "worker", app, "--until-empty", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: schema 'pgqueue' is at version 0")
    assert "pgqueue migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_dash_m_runs_the_same_cli(dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgqueue", "stats"],
        capture_output=True,
        text=True,
        env=env_for(dsn),
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "no jobs"


def test_a_paused_queue_is_left_alone_until_resumed(
    dsn: str, business: Conn, tmp_path: Path
) -> None:
    app = write_app(tmp_path)
    out = cli(dsn, "queue", "slow", "--pause").stdout.strip()
    assert out == "queue slow: keep_succeeded=true paused=true notify=true"
    held = int(
        cli(dsn, "enqueue", "record", "--args", '{"n": 1}', "--queue", "slow").stdout
    )
    free = int(cli(dsn, "enqueue", "record", "--args", '{"n": 2}').stdout)
    [default, slow] = sorted(
        json.loads(cli(dsn, "stats", "--json").stdout), key=lambda r: r["queue"]
    )
    assert (slow["queue"], slow["queued"], slow["paused"]) == ("slow", 1, True)
    assert (default["queue"], default["paused"]) == ("default", False)
    assert "yes" in cli(dsn, "stats").stdout  # the table marks the paused queue
    # --until-empty: a paused queue has nothing due.
    worker = [app, "-q", "slow", "-q", "default", "--until-empty"]
    cli(dsn, "worker", *worker, cwd=tmp_path)
    assert business.execute("select job_id from business").fetchall() == [(free,)]
    out = cli(dsn, "queue", "slow", "--resume").stdout.strip()
    assert out == "queue slow: keep_succeeded=true paused=false notify=true"
    cli(dsn, "worker", *worker, cwd=tmp_path)
    assert sorted(business.execute("select job_id from business").fetchall()) == [
        (held,),
        (free,),
    ]


def test_a_queue_can_be_made_quiet_and_loud_again(dsn: str, conn: Conn) -> None:
    out = cli(dsn, "queue", "bulk", "--quiet").stdout.strip()
    assert out == "queue bulk: keep_succeeded=true paused=false notify=false"
    assert conn.execute(
        "select notify from pgqueue.queues where name = 'bulk'"
    ).fetchone() == (False,)
    out = cli(dsn, "queue", "bulk", "--notify").stdout.strip()
    assert out == "queue bulk: keep_succeeded=true paused=false notify=true"


def test_bench_measures_concurrent_producers_and_cleans_up(
    dsn: str, conn: Conn
) -> None:
    """`pgqueue bench --workload producers` checks that every job of its eight
    producers arrived, reports its three runs (a worker waiting, none, a quiet
    queue), and drops its scratch schema."""
    out = cli(dsn, "bench", "--workload", "producers", "--jobs", "160", "--json")
    figures = json.loads(out.stdout)["figures"]
    assert sorted(figures) == [
        "enqueue_8_producers",
        "enqueue_8_producers_busy",
        "enqueue_8_producers_quiet",
    ]
    assert all(rate > 0 for rate in figures.values())
    assert conn.execute(
        "select count(*) from pg_namespace where nspname = 'pgqueue_bench'"
    ).fetchone() == (0,)


def test_a_worker_keeps_its_apps_own_dsn_over_the_environments(
    dsn: str, conn: Conn, tmp_path: Path
) -> None:
    job = conn.execute("select pgqueue.enqueue('noop')").fetchone()
    (tmp_path / "ownapp.py").write_text(
        "import pgqueue\n"
        f"app = pgqueue.App({dsn!r})\n"
        "@app.task(transactional=False)\n"
        "def noop(ctx):\n"
        "    pass\n"
    )
    # PGQUEUE_DSN names a server nobody listens on; the App names its own.
    result = cli(UNREACHABLE, "worker", "ownapp:app", "--until-empty", cwd=tmp_path)
    assert result.returncode == 0
    assert job is not None and job_row(conn, job[0])["state"] == "succeeded"
