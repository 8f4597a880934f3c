"""One benchmark role of one system, run as its own process by compare.py.

    python tests/benchmarks/peers.py SYSTEM ROLE DSN ARG

SYSTEM: pgqueue, pgqueuer, procrastinate, oban. ROLE:
  setup             install the system's schema
  enqueue N         print {"enqueue_one": jobs/s, "enqueue_bulk": jobs/s}
  fill N            enqueue N no-op jobs in bulk
  drain OUT         run one worker until the queue is empty; write to OUT the
                    id and wall-clock start of every handler call
  listen OUT M      run one idle worker until M jobs ran; write the same to OUT
  produce M         enqueue one job every 20 ms; print {job id: commit time}

Each system runs with the settings its documentation recommends for
throughput: pgqueue -c 500 --prefetch 500 (one process), PgQueuer with
asyncpg and batch_size=500, procrastinate concurrency=10, Oban a queue limit
of 500 on uvloop with orjson (as `oban start` runs).

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


def pgqueue_main(role: str, dsn: str, arg: str, extra: str | None) -> Any:
    import psycopg

    import pgqueue
    from pgqueue import migrations
    from pgqueue.log import configure

    configure("warning")  # as `pgqueue worker --log-level warning`
    app = pgqueue.App(dsn)
    stop_after = int(extra or 0)
    worker: pgqueue.Worker | None = None

    @app.task(transactional=False)
    async def noop(ctx: pgqueue.JobContext) -> None:
        done_calls = _called(ctx.job.id)
        if worker is not None and stop_after and done_calls >= stop_after:
            worker.stop()

    if role == "setup":
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn)
            if arg == "discard":  # compare.py's drains without history
                conn.execute("select pgqueue.configure_queue('default', false)")
        return None
    if role in ("enqueue", "fill"):
        n = int(arg)
        with psycopg.connect(dsn, autocommit=True) as conn:

            def bulk() -> None:
                for i in range(0, n, BULK_CHUNK):
                    with conn.transaction():
                        noop.enqueue_many(conn, [{}] * min(BULK_CHUNK, n - i))

            if role == "fill":
                bulk()
                return None

            def one_by_one() -> None:
                for _ in range(n):
                    noop.enqueue(conn)

            return {
                "enqueue_one": _timed(n, one_by_one),
                "enqueue_bulk": _timed(n, bulk),
            }
    if role == "drain":
        pgqueue.Worker(
            app, concurrency=500, prefetch=500, until_empty=True, handle_signals=False
        ).run()
        _write(arg)
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
    if role in ("enqueue", "fill"):
        n = int(arg)

        async def bulk() -> None:
            for i in range(0, n, BULK_CHUNK):
                k = min(BULK_CHUNK, n - i)
                await queries.enqueue(["noop"] * k, [None] * k, [0] * k)

        if role == "fill":
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

    if role == "drain":
        await qm.run(batch_size=500, mode=QueueExecutionMode.drain)
    elif role == "listen":
        await qm.run(
            batch_size=10, dequeue_timeout=__import__("datetime").timedelta(seconds=5)
        )
    _write(arg)
    return None


# -- procrastinate ----------------------------------------------------------------


async def procrastinate_main(role: str, dsn: str, arg: str, extra: str | None) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    stop_after = int(extra or 0)
    done = asyncio.Event()

    @app.task(name="noop", pass_context=True)
    async def noop(context: Any) -> None:
        done_calls = _called(int(context.job.id))
        if stop_after and done_calls >= stop_after:
            done.set()

    async with app.open_async():
        if role == "setup":
            await app.schema_manager.apply_schema_async()
            return None
        if role in ("enqueue", "fill"):
            n = int(arg)

            async def bulk() -> None:
                for i in range(0, n, BULK_CHUNK):
                    await noop.batch_defer_async(*[{}] * min(BULK_CHUNK, n - i))

            if role == "fill":
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
UNFINISHED = """select exists (select from oban_jobs
    where state in ('available', 'scheduled', 'executing', 'retryable'))"""


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

    pool = await Oban.create_pool(dsn)  # Oban's own pool defaults: 1 to 10
    try:
        if role == "setup":
            await install(pool)
            return None
        if role in ("enqueue", "fill", "produce"):
            client = Oban(pool=pool)  # no queues: client mode, enqueues only
            if role == "produce":
                committed = {}
                for _ in range(int(arg)):
                    job = await client.enqueue(Noop.new())
                    committed[int(job.id)] = time.time()
                    await asyncio.sleep(0.02)
                return committed
            n = int(arg)

            async def bulk() -> None:
                for i in range(0, n, BULK_CHUNK):
                    k = min(BULK_CHUNK, n - i)
                    await client.enqueue_many([Noop.new() for _ in range(k)])

            if role == "fill":
                await bulk()
                return None
            return await _enqueue_rates(n, lambda: client.enqueue(Noop.new()), bulk)
        if role == "drain":
            # Oban has no run-until-empty mode: poll its jobs table, on a
            # connection of our own, until no job is left to run or running
            # (with two processes: until both have finished their share).
            oban = Oban(pool=pool, queues={"default": OBAN_DRAIN_LIMIT})
            async with (
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
                oban,
            ):
                while True:
                    await asyncio.sleep(0.05)
                    row = await (await conn.execute(UNFINISHED)).fetchone()
                    if row is None or not row[0]:
                        break
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
