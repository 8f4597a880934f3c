"""The ``pgqueue`` command line: a convenience over the SQL functions and views."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import threading
from datetime import datetime, timedelta
from typing import Annotated, Any, NoReturn

import psycopg
import typer

from pgqueue import _sql, migrations
from pgqueue.app import App, resolve_dsn
from pgqueue.errors import ConfigurationError, PgqueueError, from_database
from pgqueue.jobs import JobState
from pgqueue.limits import MAX_SECONDS, MIN_LEASE

MAX_HOURS = 24 * 365 * 100  # retention options: larger overflows a timedelta

cli = typer.Typer(
    help="pgqueue: a job queue that lives inside PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


JOB_ID_MAX = 2**63 - 1  # a bigint


class _Settings:
    dsn: str = ""
    schema: str = "pgqueue"
    # Given on the command line (not from the environment): only these
    # override what the worker's App says.
    dsn_given: bool = False
    schema_given: bool = False


_settings = _Settings()


def _one_line(exc: BaseException) -> str:
    """libpq messages span lines (a tab-indented hint); errors here are one line."""
    return " ".join(str(exc).split())


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# What a statement on a database without the schema raises: a table's name,
# or a function's schema (retry, cancel, enqueue).
_NO_SCHEMA = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.InvalidSchemaName,
    psycopg.errors.UndefinedFunction,
)


def _no_schema() -> NoReturn:
    _fail(
        f"no pgqueue schema {_settings.schema!r} here, or one older than this"
        " code: run `pgqueue migrate`"
    )


@cli.callback()
def _options(
    dsn: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL connection string. Default: $PGQUEUE_DSN, "
            "$DATABASE_URL, then libpq's PG* environment."
        ),
    ] = None,
    schema: Annotated[
        str | None, typer.Option(help="Schema holding pgqueue. Default: pgqueue.")
    ] = None,
) -> None:
    _settings.dsn = resolve_dsn(dsn)
    _settings.dsn_given = dsn is not None
    _settings.schema_given = schema is not None
    try:
        _settings.schema = migrations.check_schema_name(
            "pgqueue" if schema is None else schema
        )
    except ConfigurationError as exc:
        _fail(str(exc))


def _connect() -> psycopg.Connection[Any]:
    try:
        migrations.check_schema_name(_settings.schema)
        return psycopg.connect(_settings.dsn, autocommit=True)
    except ConfigurationError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(f"cannot connect to PostgreSQL: {_one_line(exc)}")
    except psycopg.ProgrammingError as exc:  # a DSN libpq cannot parse
        _fail(f"invalid connection string: {_one_line(exc)}")


def _app() -> App:
    return App(_settings.dsn, schema=_settings.schema)


@cli.command()
def migrate(
    print_sql: Annotated[
        bool, typer.Option("--print", help="Print the SQL instead of running it.")
    ] = False,
) -> None:
    """Create or upgrade the pgqueue schema (a no-op when up to date)."""
    if print_sql:
        try:
            typer.echo(migrations.script(_settings.schema))
        except ConfigurationError as exc:
            _fail(str(exc))
        return

    def applied_one(m: migrations.Migration) -> None:
        typer.echo(f"applied {m.version:04d}_{m.name}")

    with _connect() as conn:
        try:
            applied = migrations.migrate(conn, _settings.schema, on_applied=applied_one)
        except psycopg.Error as exc:
            # Those above were applied, each in its own transaction; this one
            # rolled back whole.
            with contextlib.suppress(psycopg.Error):
                done = migrations.current_version(conn, _settings.schema)
                failed = next(m for m in migrations.load() if m.version > done)
                why = _one_line(exc)
                if isinstance(exc, psycopg.errors.LockNotAvailable):
                    why += " (a long transaction holds a table it locks)"
                _fail(
                    f"migration {failed.version:04d}_{failed.name} failed and"
                    f" changed nothing: {why}; run `pgqueue migrate` again"
                )
            raise
    if not applied:
        typer.echo(f"schema {_settings.schema!r} is up to date")


def _load_app(target: str) -> App:
    module_name, _, attr = target.partition(":")
    if not module_name:
        _fail(f"give the app as module:attribute, got {target!r}")
    # Like uvicorn and celery, find modules in the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if module_name.startswith("."):
        _fail(f"give the module's absolute name, not {module_name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"cannot import {module_name!r}: {exc}")
    except Exception as exc:  # the module's own code raised, or does not parse
        _fail(
            f"importing {module_name!r} raised {type(exc).__name__}: {_one_line(exc)}"
            f" (`python -c 'import {module_name}'` shows where)"
        )
    app = getattr(module, attr or "app", None)
    if not isinstance(app, App):
        _fail(f"{target!r} is not a pgqueue.App")
    return app


@cli.command()
def worker(
    app_path: Annotated[
        str, typer.Argument(metavar="MODULE:APP", help="e.g. shop.jobs:app")
    ],
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            "-q",
            help="Queue to serve (repeat). Default: the queues of the app's tasks.",
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 10,
    prefetch: Annotated[
        int, typer.Option(min=0, help="Jobs leased ahead of free slots (short jobs).")
    ] = 0,
    tx_batch: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Transactional jobs per shared transaction and completion.",
        ),
    ] = 1,
    lease: Annotated[
        float,
        typer.Option(min=MIN_LEASE, max=MAX_SECONDS, help="Lease length in seconds."),
    ] = 30.0,
    poll_interval: Annotated[
        float,
        typer.Option(min=0.01, max=MAX_SECONDS, help="Seconds between polls."),
    ] = 1.0,
    grace: Annotated[
        float,
        typer.Option(
            min=0,
            max=MAX_SECONDS,
            help="Seconds in-flight jobs get to finish on SIGTERM.",
        ),
    ] = 30.0,
    until_empty: Annotated[
        bool, typer.Option(help="Exit when no job is due and none is running.")
    ] = False,
    db_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Seconds the worker waits for the answer to one of its own"
            " statements before it takes the connection for dead and opens"
            " another. Default: a third of the lease, at most 30.",
        ),
    ] = None,
    listen: Annotated[
        bool, typer.Option(help="Use LISTEN/NOTIFY (--no-listen: poll only).")
    ] = True,
    retention: Annotated[
        float,
        typer.Option(
            min=0,
            max=MAX_HOURS,
            help="Hours finished jobs are kept before the worker prunes them.",
        ),
    ] = 24 * 7,
    prune_jobs: Annotated[
        bool,
        typer.Option(
            "--prune/--no-prune",
            help="Prune finished jobs (--no-prune: leave it to `pgqueue prune`).",
        ),
    ] = True,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning, error.")
    ] = "info",
    log_json: Annotated[
        bool | None,
        typer.Option(
            "--log-json/--log-console", help="Default: JSON unless a terminal."
        ),
    ] = None,
) -> None:
    """Run a worker for the tasks of MODULE:APP."""
    from pgqueue.log import configure
    from pgqueue.worker import Worker

    try:
        configure(log_level, json=log_json)
    except ValueError as exc:
        _fail(str(exc))
    app = _load_app(app_path)
    # The App's own DSN and schema stand unless the command line names others
    # (PGQUEUE_DSN and DATABASE_URL are for an App that names no DSN).
    if _settings.dsn_given:
        app.dsn = _settings.dsn
    if _settings.schema_given:
        app.schema = _settings.schema
    try:
        Worker(
            app,
            queues=queue or app.task_queues(),
            concurrency=concurrency,
            prefetch=prefetch,
            tx_batch=tx_batch,
            lease_seconds=lease,
            poll_interval=poll_interval,
            shutdown_grace=grace,
            until_empty=until_empty,
            listen=listen,
            retention=timedelta(hours=retention) if prune_jobs else None,
            db_timeout=db_timeout,
        ).run()
    except PgqueueError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(f"cannot connect to PostgreSQL: {_one_line(exc)}")
    except psycopg.ProgrammingError as exc:  # a DSN libpq cannot parse
        _fail(f"invalid connection string: {_one_line(exc)}")
    # A sync handler still running past the grace period cannot be stopped from
    # outside its thread, and the interpreter would wait for it at exit. Its job
    # was handed back and its transaction never commits: leave now.
    main = threading.main_thread()
    if any(
        t.is_alive() and not t.daemon and t is not main for t in threading.enumerate()
    ):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--args is not valid JSON: {exc}")
    except (ValueError, RecursionError) as exc:  # a 5,000-digit int, deep nesting
        _fail(f"--args cannot be read: {type(exc).__name__}: {exc}")


@cli.command()
def enqueue(
    task: Annotated[str, typer.Argument(help="Task name.")],
    args: Annotated[str, typer.Option(help="Arguments as a JSON object.")] = "{}",
    queue: Annotated[str, typer.Option()] = "default",
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    delay: Annotated[float | None, typer.Option(help="Seconds from now.")] = None,
    run_at: Annotated[
        str | None, typer.Option(help="ISO 8601 time with a timezone.")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    max_attempts: Annotated[int, typer.Option()] = 25,
) -> None:
    """Enqueue one job by task name and print its id."""
    when = None
    if run_at is not None:
        try:
            when = datetime.fromisoformat(run_at)
        except ValueError:
            _fail(f"--run-at is not an ISO 8601 time: {run_at!r}")
    payload = _parse_json(args)
    if not isinstance(payload, dict):  # null, too: it meant {} to enqueue
        _fail(f"--args must be a JSON object, got {args!r}")
    with _connect() as conn:
        try:
            job_id = _app().enqueue(
                conn,
                task,
                payload,
                queue=queue,
                priority=priority,
                delay=delay,
                run_at=when,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
            )
        except PgqueueError as exc:
            _fail(str(exc))
        except _NO_SCHEMA:
            _no_schema()
    typer.echo(job_id)


def _fetch(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[Any]:
    try:
        return conn.execute(query, params).fetchall()
    except _NO_SCHEMA:
        _no_schema()
    except psycopg.Error as exc:
        mapped = from_database(exc)
        if isinstance(mapped, PgqueueError):
            _fail(str(mapped))
        raise


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


@cli.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per queue: queued, scheduled, running, succeeded, dead, cancelled,
    oldest queued age, and whether it is paused."""
    stmts = _sql.statements(_settings.schema)
    with _connect() as conn:
        rows = _fetch(conn, stmts.queue_depth)
    headers = [
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
    if as_json:
        typer.echo(json.dumps([dict(zip(headers, r, strict=True)) for r in rows]))
        return
    data = [
        [*r[:7], None if r[7] is None else f"{r[7]:.3f}", "yes" if r[8] else ""]
        for r in rows
    ]
    typer.echo(_table(headers, data) if rows else "no jobs")


@cli.command()
def jobs(
    job_id: Annotated[
        int | None,
        typer.Argument(help="Show this job in full.", min=1, max=JOB_ID_MAX),
    ] = None,
    queue: Annotated[str | None, typer.Option()] = None,
    state: Annotated[
        str | None, typer.Option(help="queued, running, succeeded, dead, cancelled.")
    ] = None,
    task: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
) -> None:
    """List recent jobs (filtered), or show one job with its errors."""
    states = [s.value for s in JobState]
    if state is not None and state not in states:
        _fail(f"unknown state {state!r}: use one of {', '.join(states)}")
    stmts = _sql.statements(_settings.schema)
    with _connect() as conn:
        if job_id is not None:
            rows = _fetch(conn, stmts.job, [job_id])
            if not rows:
                _fail(f"job {job_id} not found")
            names = [
                "id",
                "queue",
                "task",
                "state",
                "priority",
                "attempts",
                "max_attempts",
                "run_at",
                "created_at",
                "started_at",
                "finished_at",
                "leased_by",
                "args",
                "result",
                "errors",
            ]
            typer.echo(
                json.dumps(
                    dict(zip(names, rows[0], strict=True)), indent=2, default=str
                )
            )
            return
        params = {"queue": queue, "state": state, "task": task, "limit": limit}
        rows = _fetch(conn, stmts.jobs, params)
    headers = [
        "id",
        "queue",
        "task",
        "state",
        "priority",
        "attempts",
        "run_at",
        "created_at",
        "finished_at",
    ]
    typer.echo(_table(headers, [list(r) for r in rows]) if rows else "no jobs")


@cli.command()
def retry(
    job_id: Annotated[
        int | None,
        typer.Argument(help="A dead or cancelled job.", min=1, max=JOB_ID_MAX),
    ] = None,
    all_dead: Annotated[
        str | None,
        typer.Option("--all-dead", metavar="QUEUE", help="Every dead job of QUEUE."),
    ] = None,
) -> None:
    """Queue a dead job again (or every dead job of a queue)."""
    if job_id is None and all_dead is None:
        _fail("give a job id or --all-dead QUEUE")
    if job_id is not None and all_dead is not None:
        _fail("give a job id or --all-dead QUEUE, not both")
    stmts = _sql.statements(_settings.schema)
    with _connect() as conn:
        if job_id is not None:
            _fetch(conn, stmts.retry, [job_id])
            typer.echo(f"job {job_id} queued again")
        else:
            count = _fetch(conn, stmts.retry_dead, [all_dead])[0][0]
            typer.echo(f"{count} dead jobs of {all_dead!r} queued again")


@cli.command()
def cancel(
    job_id: Annotated[int, typer.Argument(min=1, max=JOB_ID_MAX)],
) -> None:
    """Cancel a queued job."""
    with _connect() as conn:
        _fetch(conn, _sql.statements(_settings.schema).cancel, [job_id])
    typer.echo(f"job {job_id} cancelled")


@cli.command()
def queue(
    name: Annotated[str, typer.Argument(help="The queue.")],
    keep_succeeded: Annotated[
        bool | None,
        typer.Option(
            "--keep-succeeded/--discard-succeeded",
            help="Keep succeeded jobs in finished_jobs until pruned (the default),"
            " or delete them on completion (no result kept; fastest).",
        ),
    ] = None,
    paused: Annotated[
        bool | None,
        typer.Option(
            "--pause/--resume",
            help="Stop workers leasing this queue's jobs (running ones finish;"
            " enqueueing goes on), or let them lease again.",
        ),
    ] = None,
    notify: Annotated[
        bool | None,
        typer.Option(
            "--notify/--quiet",
            help="Wake listening workers with NOTIFY on every enqueue (the default),"
            " or not: workers find a quiet queue's jobs by polling, and concurrent"
            " enqueues stop waiting for PostgreSQL's notification lock.",
        ),
    ] = None,
) -> None:
    """Show a queue's options, or set them."""
    from pgqueue.producer import check_queue

    try:
        check_queue(name)
    except PgqueueError as exc:
        _fail(str(exc))
    stmts = _sql.statements(_settings.schema)
    with _connect() as conn:
        if keep_succeeded is not None:
            _fetch(conn, stmts.configure_queue, [name, keep_succeeded])
        if paused is not None:
            _fetch(conn, stmts.pause_queue if paused else stmts.resume_queue, [name])
        if notify is not None:
            _fetch(conn, stmts.set_queue_notify, [name, notify])
        keep, is_paused, notifies = _fetch(conn, stmts.queue_options, [name])[0]
    typer.echo(
        f"queue {name}: keep_succeeded={str(keep).lower()}"
        f" paused={str(is_paused).lower()} notify={str(notifies).lower()}"
    )


@cli.command()
def prune(
    older_than: Annotated[
        float,
        typer.Option(
            min=0, max=MAX_HOURS, help="Age in hours of finished jobs to delete."
        ),
    ] = 24 * 7,
) -> None:
    """Delete finished jobs (and their idempotency keys) older than the retention."""
    from pgqueue.worker import PRUNE_BATCH

    seconds = timedelta(hours=older_than).total_seconds()
    stmts = _sql.statements(_settings.schema)
    lock = _sql.prune_lock_name(_settings.schema)
    total = 0
    with _connect() as conn:
        while True:
            # One pruner at a time, as among workers: wait for a worker's batch
            # to end, then hold the lock for this batch.
            with conn.transaction():
                _fetch(conn, stmts.prune_lock, [lock])
                count = _fetch(conn, stmts.prune, [seconds, PRUNE_BATCH])[0][0]
            total += count
            if count < PRUNE_BATCH:
                break
    typer.echo(f"pruned {total} finished jobs")


@cli.command()
def bench(
    jobs: Annotated[int, typer.Option(min=100, help="Jobs per workload.")] = 20_000,
    workload: Annotated[
        list[str] | None,
        typer.Option(
            help="enqueue, producers, drain, failures, business, latency, backlog,"
            " memory."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure pgqueue on this database (in a scratch schema, dropped after)."""
    from pgqueue import bench as benchmark

    unknown = set(workload or []) - set(benchmark.WORKLOADS)
    if unknown:
        _fail(f"unknown workload(s): {', '.join(sorted(unknown))}")
    _connect().close()  # a clear error now if the database is unreachable
    results = benchmark.run(_settings.dsn, jobs, workload)
    typer.echo(benchmark.to_json(results) if as_json else benchmark.render(results))


def main() -> None:
    """Entry point of the ``pgqueue`` script."""
    try:
        cli()
    except PgqueueError as exc:
        # Every command maps its expected errors; this is the safety net that
        # keeps a user error to one line.
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except psycopg.Error as exc:
        typer.echo(f"error: database: {_one_line(exc)}", err=True)
        sys.exit(1)
    except UnicodeEncodeError as exc:
        # An argument of bytes that are not UTF-8 (Python keeps them as lone
        # surrogates), met as it was sent: nothing was written.
        typer.echo(
            f"error: {exc.object[exc.start : exc.end]!r} cannot be encoded"
            f" ({exc.encoding}): an argument's bytes that are not UTF-8, or"
            " output the terminal cannot show",
            err=True,
        )
        sys.exit(1)
