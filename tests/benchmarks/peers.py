"""One benchmark role of one system, run as its own process by compare.py.

    python tests/benchmarks/peers.py SYSTEM ROLE DSN ARG

SYSTEM: pgqueue, pgqueuer, procrastinate, oban. ROLE:
  setup             install the system's schema
  enqueue N         print {"enqueue_one": jobs/s, "enqueue_bulk": jobs/s}
  fill N            enqueue N no-op jobs in bulk
  drain OUT         run one worker until the queue is empty; write to OUT the
                    id and wall-clock start of every handler call
  fill_failing N    enqueue N "broken" jobs in bulk: the handler raises and
                    the job is not retried (one attempt)
  drain_failing OUT run one worker as `drain` does over the broken jobs; write
                    to OUT {"calls": the handler calls as `drain` writes them,
                    "end": wall clock once the worker returned, "failed": jobs
                    in the system's final failed state}
  listen OUT M      run one idle worker until M jobs ran; write the same to OUT
  produce M         enqueue one job every 20 ms; print {job id: commit time}

Each system runs with the settings its documentation recommends for
throughput: pgqueue -c 500 --prefetch 500 (one process), PgQueuer with
asyncpg and batch_size=500, procrastinate concurrency=10, Oban a queue limit
of 500 on uvloop with orjson (as `oban start` runs).

The failure storm (fill_failing, drain_failing) silences every system's
per-failure logging alike: pgqueue at log level error, the peers' loggers at
CRITICAL; tens of thousands of tracebacks on stderr would measure the
terminal, not the queue. Where each system keeps a failed job, checked in its
source (pgqueue's sql/migrations, PgQueuer 1.6, procrastinate 3.10, Oban for
Python 0.7), is the query of its *_FAILED constant below.

Oban for Python needs Python >= 3.12, so compare.py runs the oban roles with
the interpreter of a second venv (.venv-bench-oban); this file must therefore
import no peer at module level.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

BULK_CHUNK = 10_000
# (job id, handler start, this process's CPU seconds so far or None), this
# process: the drain's rate is taken from first to last call, its worker CPU
# per job between the first and the last call that read the CPU clock. That
# clock is a system call (0.7 us here, a tenth of pgqueue's whole cost per job),
# so only every CPU_EVERY-th call reads it; time.time() is not.
CPU_EVERY = 100
calls: list[tuple[int, float, float | None]] = []


def _called(job_id: int) -> int:
    n = len(calls)
    calls.append(
        (job_id, time.time(), time.process_time() if n % CPU_EVERY == 0 else None)
    )
    return n + 1


def _write(out: str) -> None:
    Path(out).write_text(json.dumps(calls))


def _write_failing(out: str, end: float, failed: int) -> None:
    """drain_failing's result: the calls, when the worker returned, how many
    jobs the system holds as finally failed."""
    Path(out).write_text(json.dumps({"calls": calls, "end": end, "failed": failed}))


def _silence(*loggers: str) -> None:
    """No per-failure log lines from these stdlib loggers (drain_failing)."""
    import logging

    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _timed(n: int, func: Any) -> float:
    started = time.perf_counter()
    func()
    return n / (time.perf_counter() - started)


async def _enqueue_rates(n: int, one: Any, bulk: Any) -> dict[str, float]:
    """Jobs/s of n awaits of ``one()`` (a job per transaction), then of ``bulk()``."""
    started = time.perf_counter()
    for _ in range(n):
        await one()
    rate_one = n / (time.perf_counter() - started)
    started = time.perf_counter()
    await bulk()
    return {
        "enqueue_one": rate_one,
        "enqueue_bulk": n / (time.perf_counter() - started),
    }


# -- pgqueue --------------------------------------------------------------------

# A job whose last attempt failed leaves pgqueue.jobs for finished_jobs with
# state 'dead' (_fail_locked, sql/migrations/0002_functions.sql; written in
# batches by fail_many, 0015).
PGQUEUE_FAILED = "select count(*) from pgqueue.finished_jobs where state = 'dead'"


def pgqueue_main(role: str, dsn: str, arg: str, extra: str | None) -> Any:
    import psycopg

    import pgqueue
    from pgqueue import migrations
    from pgqueue.log import configure

    # As `pgqueue worker --log-level warning`; the failure storm at error:
    # pgqueue logs a warning per failed job (as every system's per-failure
    # logging is silenced for it).
    configure("error" if role == "drain_failing" else "warning")
    app = pgqueue.App(dsn)
    stop_after = int(extra or 0)
    worker: pgqueue.Worker | None = None

    @app.task(transactional=False)
    async def noop(ctx: pgqueue.JobContext) -> None:
        done_calls = _called(ctx.job.id)
        if worker is not None and stop_after and done_calls >= stop_after:
            worker.stop()

    # One attempt: the failure is final, the job goes to finished_jobs, dead.
    @app.task(transactional=False, max_attempts=1)
    async def broken(ctx: pgqueue.JobContext) -> None:
        _called(ctx.job.id)
        raise RuntimeError("failure storm")

    if role == "setup":
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn)
            if arg == "discard":  # compare.py's drains without history
                conn.execute("select pgqueue.configure_queue('default', false)")
        return None
    if role in ("enqueue", "fill", "fill_failing"):
        n = int(arg)
        task = broken if role == "fill_failing" else noop
        with psycopg.connect(dsn, autocommit=True) as conn:

            def bulk() -> None:
                for i in range(0, n, BULK_CHUNK):
                    with conn.transaction():
                        task.enqueue_many(conn, [{}] * min(BULK_CHUNK, n - i))

            if role in ("fill", "fill_failing"):
                bulk()
                return None

            def one_by_one() -> None:
                for _ in range(n):
                    noop.enqueue(conn)

            return {
                "enqueue_one": _timed(n, one_by_one),
                "enqueue_bulk": _timed(n, bulk),
            }
    if role in ("drain", "drain_failing"):
        pgqueue.Worker(
            app, concurrency=500, prefetch=500, until_empty=True, handle_signals=False
        ).run()
        if role == "drain":
            _write(arg)
            return None
        end = time.time()
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(PGQUEUE_FAILED).fetchone()
        _write_failing(arg, end, row[0] if row else 0)
        return None
    if role == "listen":
        worker = pgqueue.Worker(app, concurrency=10, handle_signals=False)
        worker.run()
        _write(arg)
        return None
    if role == "produce":
        committed = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(int(arg)):
                job_id = noop.enqueue(conn)
                committed[job_id] = time.time()
                time.sleep(0.02)
        return committed
    raise SystemExit(f"unknown role {role}")


# -- PgQueuer -------------------------------------------------------------------

# An entrypoint that raises is not retried by default (the default executor,
# on_failure="delete"): QueueManager.log_failure (pgqueuer/core/qm.py) logs it
# and buffers status 'exception'; the JobStatusLogBuffer then deletes the job
# from pgqueuer and inserts a pgqueuer_log row with that status
# (build_log_job_query, pgqueuer/adapters/persistence/qb.py). Log aggregation
# only marks rows aggregated, it keeps them.
PGQUEUER_FAILED = "select count(*) from pgqueuer_log where status = 'exception'"


async def pgqueuer_main(role: str, dsn: str, arg: str, extra: str | None) -> Any:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    # asyncpg: the driver PgQueuer's documentation leads with, and faster here
    # than its psycopg driver.
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(dsn)  # asyncpg takes keywords, not a libpq string
    conn = await asyncpg.connect(
        host=info.get("host"), port=info.get("port"), user=info.get("user"),
        database=info.get("dbname"), password=info.get("password"),
    )  # fmt: skip
    queries = Queries(AsyncpgDriver(conn))
    if role == "setup":
        await queries.install()
        return None
    if role in ("enqueue", "fill", "fill_failing"):
        n = int(arg)
        entrypoint = "broken" if role == "fill_failing" else "noop"

        async def bulk() -> None:
            for i in range(0, n, BULK_CHUNK):
                k = min(BULK_CHUNK, n - i)
                await queries.enqueue([entrypoint] * k, [None] * k, [0] * k)

        if role in ("fill", "fill_failing"):
            await bulk()
            return None
        return await _enqueue_rates(n, lambda: queries.enqueue("noop", None), bulk)
    if role == "produce":
        committed = {}
        for _ in range(int(arg)):
            [job_id] = await queries.enqueue("noop", None)
            committed[int(job_id)] = time.time()
            await asyncio.sleep(0.02)
        return committed
    qm = QueueManager(queries)
    stop_after = int(extra or 0)

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        done_calls = _called(int(job.id))
        if stop_after and done_calls >= stop_after:
            qm.shutdown.set()

    @qm.entrypoint("broken")
    async def broken(job: Any) -> None:
        _called(int(job.id))
        raise RuntimeError("failure storm")

    if role == "drain_failing":
        _silence("pgqueuer")  # logger.exception with traceback per failed job
        await qm.run(batch_size=500, mode=QueueExecutionMode.drain)
        end = time.time()  # run() returns after its status log buffer's flush
        counter = await asyncpg.connect(
            host=info.get("host"), port=info.get("port"), user=info.get("user"),
            database=info.get("dbname"), password=info.get("password"),
        )  # fmt: skip
        try:
            failed = await counter.fetchval(PGQUEUER_FAILED)
        finally:
            await counter.close()
        _write_failing(arg, end, int(failed))
        return None
    if role == "drain":
        await qm.run(batch_size=500, mode=QueueExecutionMode.drain)
    elif role == "listen":
        await qm.run(
            batch_size=10, dequeue_timeout=__import__("datetime").timedelta(seconds=5)
        )
    _write(arg)
    return None


# -- procrastinate ----------------------------------------------------------------

# A task without `retry` (default False) that raises ends with status 'failed';
# the worker (procrastinate/worker.py) awaits finish_job before it takes the
# next job, and keeps the row (delete_jobs defaults to "never").
PROCRASTINATE_FAILED = "select count(*) from procrastinate_jobs where status = 'failed'"


async def procrastinate_main(role: str, dsn: str, arg: str, extra: str | None) -> Any:
    import procrastinate
    import psycopg

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    stop_after = int(extra or 0)
    done = asyncio.Event()

    @app.task(name="noop", pass_context=True)
    async def noop(context: Any) -> None:
        done_calls = _called(int(context.job.id))
        if stop_after and done_calls >= stop_after:
            done.set()

    @app.task(name="broken", pass_context=True)  # no retry (the default)
    async def broken(context: Any) -> None:
        _called(int(context.job.id))
        raise RuntimeError("failure storm")

    async with app.open_async():
        if role == "setup":
            await app.schema_manager.apply_schema_async()
            return None
        if role in ("enqueue", "fill", "fill_failing"):
            n = int(arg)
            task = broken if role == "fill_failing" else noop

            async def bulk() -> None:
                for i in range(0, n, BULK_CHUNK):
                    await task.batch_defer_async(*[{}] * min(BULK_CHUNK, n - i))

            if role in ("fill", "fill_failing"):
                await bulk()
                return None
            return await _enqueue_rates(n, noop.defer_async, bulk)
        if role == "produce":
            committed = {}
            for _ in range(int(arg)):
                job_id = await noop.defer_async()
                committed[int(job_id)] = time.time()
                await asyncio.sleep(0.02)
            return committed
        if role == "drain_failing":
            # An ERROR with traceback per failed job, from procrastinate.worker.
            _silence("procrastinate")
            await app.run_worker_async(
                concurrency=10, wait=False, install_signal_handlers=False
            )
            end = time.time()
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                row = await (await conn.execute(PROCRASTINATE_FAILED)).fetchone()
            _write_failing(arg, end, row[0] if row else 0)
            return None
        if role == "drain":
            await app.run_worker_async(
                concurrency=10, wait=False, install_signal_handlers=False
            )
        elif role == "listen":
            runner = asyncio.create_task(
                app.run_worker_async(concurrency=10, install_signal_handlers=False)
            )
            await done.wait()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    _write(arg)
    return None


# -- Oban for Python ----------------------------------------------------------------

# The queue limit is how many jobs one Oban process runs at once, and so how
# many one fetch may take (limit - running): Oban's only throughput setting
# for a queue. Its examples use 10 for queues of real work; a no-op job wants
# many in flight, so the drain uses 500, as pgqueue -c 500 and PgQueuer
# batch_size=500 (limits 50 to 2,000 measured within noise of each other on 2
# cores). Listening runs a limit of 10, like the others' listen workers.
OBAN_DRAIN_LIMIT = 500
OBAN_LISTEN_LIMIT = 10
# Jobs still to run or running. A job stays 'executing' until its producer
# acks it (in batches, after the handler returned), so this also waits for
# every result to be recorded. 'retryable' is unfinished (it runs again); a
# failure storm's jobs (max_attempts=1) go from 'executing' straight to
# 'discarded', which is final, so the loop ends once all are discarded.
UNFINISHED = """select exists (select from oban_jobs
    where state in ('available', 'scheduled', 'executing', 'retryable'))"""
# An error on a job's last attempt acks it 'discarded' (Executor._record_stopped,
# oban/_executor.py); the pruner removes discarded jobs only after a day.
OBAN_FAILED = "select count(*) from oban_jobs where state = 'discarded'"


async def oban_main(role: str, dsn: str, arg: str, extra: str | None) -> Any:
    import orjson
    import psycopg
    from oban import Oban, worker
    from oban.schema import install
    from psycopg.types.json import set_json_dumps, set_json_loads

    # As `oban start` does: orjson for jsonb (uvloop is set up in main()).
    set_json_dumps(orjson.dumps)
    set_json_loads(orjson.loads)
    stop_after = int(extra or 0)
    done = asyncio.Event()

    @worker(queue="default")
    class Noop:
        __qualname__ = "Noop"  # the worker name stored per job: __main__.Noop

        async def process(self, job: Any) -> None:
            done_calls = _called(int(job.id))
            if stop_after and done_calls >= stop_after:
                done.set()

    # Oban's default is 20 attempts; max_attempts=1 discards on the first error.
    @worker(queue="default", max_attempts=1)
    class Broken:
        __qualname__ = "Broken"

        async def process(self, job: Any) -> None:
            _called(int(job.id))
            raise RuntimeError("failure storm")

    pool = await Oban.create_pool(dsn)  # Oban's own pool defaults: 1 to 10
    try:
        if role == "setup":
            await install(pool)
            return None
        if role in ("enqueue", "fill", "fill_failing", "produce"):
            client = Oban(pool=pool)  # no queues: client mode, enqueues only
            if role == "produce":
                committed = {}
                for _ in range(int(arg)):
                    job = await client.enqueue(Noop.new())
                    committed[int(job.id)] = time.time()
                    await asyncio.sleep(0.02)
                return committed
            n = int(arg)
            task = Broken if role == "fill_failing" else Noop

            async def bulk() -> None:
                for i in range(0, n, BULK_CHUNK):
                    k = min(BULK_CHUNK, n - i)
                    await client.enqueue_many([task.new() for _ in range(k)])

            if role in ("fill", "fill_failing"):
                await bulk()
                return None
            return await _enqueue_rates(n, lambda: client.enqueue(Noop.new()), bulk)
        if role in ("drain", "drain_failing"):
            # Oban has no run-until-empty mode: poll its jobs table, on a
            # connection of our own, until no job is left to run or running
            # (with two processes: until both have finished their share).
            if role == "drain_failing":
                # Oban logs job errors only through telemetry handlers, which
                # `oban start` attaches and this process does not; silenced
                # alike all the same.
                _silence("oban")
            oban = Oban(pool=pool, queues={"default": OBAN_DRAIN_LIMIT})
            async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True
            ) as conn:
                async with oban:
                    while True:
                        await asyncio.sleep(0.05)
                        row = await (await conn.execute(UNFINISHED)).fetchone()
                        if row is None or not row[0]:
                            break
                if role == "drain_failing":
                    end = time.time()
                    row = await (await conn.execute(OBAN_FAILED)).fetchone()
                    _write_failing(arg, end, row[0] if row else 0)
                    return None
        elif role == "listen":
            async with Oban(pool=pool, queues={"default": OBAN_LISTEN_LIMIT}):
                await done.wait()
        else:
            raise SystemExit(f"unknown role {role}")
    finally:
        await pool.close()
    _write(arg)
    return None


def main() -> None:
    system, role, dsn, arg = sys.argv[1:5]
    extra = sys.argv[5] if len(sys.argv) > 5 else None
    if system == "pgqueue":
        result = pgqueue_main(role, dsn, arg, extra)
    elif system == "pgqueuer":
        result = asyncio.run(pgqueuer_main(role, dsn, arg, extra))
    elif system == "procrastinate":
        result = asyncio.run(procrastinate_main(role, dsn, arg, extra))
    elif system == "oban":
        import uvloop  # Oban's dependency; `oban start` runs on it

        result = uvloop.run(oban_main(role, dsn, arg, extra))
    else:
        raise SystemExit(f"unknown system {system}")
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
