"""`pgqueue bench`: measure pgqueue on your own database.

Everything runs in a scratch schema (``pgqueue_bench`` by default) that is
created, migrated and dropped again, so the benchmark never touches your jobs.
Worker processes are real ``pgqueue worker`` subprocesses. Every workload
checks that each job ran exactly once before it reports a figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgqueue import migrations
from pgqueue.app import App
from pgqueue.context import JobContext

SCHEMA = os.environ.get("PGQUEUE_BENCH_SCHEMA", "pgqueue_bench")
app = App(schema=SCHEMA)


@app.task(transactional=False)
async def noop(ctx: JobContext) -> int:
    """A no-op that returns 1, so a stored result proves the handler ran."""
    return 1


@app.task()
def business(ctx: JobContext) -> None:
    """The realistic case: one business row per job, in the job's transaction."""
    ctx.conn.execute("insert into bench_business (job_id) values (%s)", [ctx.job.id])


@app.task()
async def business_async(ctx: JobContext) -> None:
    """The same with an async handler (no thread hand-off per job)."""
    await ctx.conn.execute(
        "insert into bench_business (job_id) values (%s)", [ctx.job.id]
    )


@app.task(transactional=False, max_attempts=1)
async def broken(ctx: JobContext) -> None:
    """Always raises, as when a service every job calls is down."""
    raise RuntimeError("the service this job calls is down")


@app.task(transactional=False)
async def stamp(ctx: JobContext) -> float:
    """Return the wall-clock time the handler started (pickup latency)."""
    return time.time()


@app.task(transactional=False)
async def nap(ctx: JobContext, ms: float) -> int:
    """Sleep a little (memory at high concurrency)."""
    import asyncio

    await asyncio.sleep(ms / 1000)
    return 1


@dataclass
class Results:
    """Figures by workload name, plus notes on how each was measured."""

    figures: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: float, note: str) -> None:
        self.figures[name] = round(value, 3)
        self.notes[name] = note


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def _reset(dsn: str) -> None:
    """Drop and recreate the scratch schema and the business table."""
    with _connect(dsn) as conn:
        conn.execute(
            sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(SCHEMA))
        )
        migrations.migrate(conn, SCHEMA)
        conn.execute("drop table if exists bench_business")
        conn.execute("create table bench_business (job_id bigint primary key)")


def drop(dsn: str) -> None:
    """Remove everything the benchmark created."""
    with _connect(dsn) as conn:
        conn.execute(
            sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(SCHEMA))
        )
        conn.execute("drop table if exists bench_business")


def _one(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _q(text: str) -> sql.Composed:
    return sql.SQL(text).format(schema=sql.Identifier(SCHEMA))


def _worker(dsn: str, *args: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "pgqueue", "--dsn", dsn, "--schema", SCHEMA,
        "worker", "pgqueue.bench:app", "--log-level", "warning", *args,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "PGQUEUE_BENCH_SCHEMA": SCHEMA})


def _run_workers(dsn: str, processes: int, *args: str) -> None:
    workers = [_worker(dsn, "--until-empty", *args) for _ in range(processes)]
    for proc in workers:
        if proc.wait() != 0:
            raise RuntimeError(f"a benchmark worker exited with {proc.returncode}")


def _drain_rate(conn: psycopg.Connection[Any], n: int, task: str) -> float:
    """Jobs/s from the first lease to the last completion, after checking that
    every job succeeded exactly once (one stored result or business row each)."""
    row = conn.execute(
        _q(
            "select count(*), count(*) filter (where attempts = 0),"
            " extract(epoch from max(finished_at) - min(started_at))"
            " from {schema}.finished_jobs where state = 'succeeded' and task = %s"
        ),
        [task],
    ).fetchone()
    assert row is not None
    done, first_try, seconds = row
    if done != n or first_try != n:
        raise RuntimeError(f"{task}: {done} of {n} jobs succeeded ({first_try} once)")
    if task.startswith("business"):
        rows = _one(conn, "select count(*) from bench_business")
        if rows != n:
            raise RuntimeError(f"business rows: {rows}, expected {n}")
    else:
        results = _one(
            conn,
            _q("select count(*) from {schema}.finished_jobs where result = '1'"),
        )
        if results != n:
            raise RuntimeError(f"{task}: {results} results stored, expected {n}")
    return float(n / seconds)


def bench_enqueue(dsn: str, n: int, out: Results) -> None:
    """Single enqueue (one job per transaction) and bulk enqueue."""
    _reset(dsn)
    with _connect(dsn) as conn:
        # Autocommit: each enqueue is its own transaction, one round trip, as in
        # the raw-SQL baseline (pgbench, one INSERT per transaction).
        started = time.perf_counter()
        for _ in range(n):
            noop.enqueue(conn)
        out.add(
            "enqueue_one",
            n / (time.perf_counter() - started),
            "jobs/s, one job per transaction (autocommit), one connection",
        )
    with psycopg.connect(dsn) as conn:
        chunk = 10_000
        payloads: list[dict[str, Any]] = [{} for _ in range(n)]
        started = time.perf_counter()
        for i in range(0, n, chunk):
            app.enqueue_many(conn, "noop", payloads[i : i + chunk])
            conn.commit()
        out.add(
            "enqueue_bulk",
            n / (time.perf_counter() - started),
            f"jobs/s, enqueue_many of {chunk} jobs per transaction",
        )


PRODUCERS = 8


def _produce(dsn: str, queue: str, share: int) -> float:
    """Seconds for PRODUCERS threads, each on its own connection, to enqueue
    ``share`` jobs each, one per transaction."""
    import threading

    start = threading.Barrier(PRODUCERS + 1)
    errors: list[BaseException] = []

    def produce(conn: psycopg.Connection[Any]) -> None:
        try:
            start.wait()
            for _ in range(share):
                app.enqueue(conn, "noop", queue=queue)
        except BaseException as exc:
            errors.append(exc)

    conns: list[psycopg.Connection[Any]] = []
    try:
        conns.extend(_connect(dsn) for _ in range(PRODUCERS))
        threads = [
            threading.Thread(target=produce, args=(c,), daemon=True) for c in conns
        ]
        for thread in threads:
            thread.start()
        start.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    except BaseException:
        start.abort()  # threads waiting at the barrier give up
        raise
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return seconds


def bench_producers(dsn: str, n: int, out: Results) -> None:
    """Single enqueues from PRODUCERS concurrent connections (as many web
    processes would): while a worker waits, so each enqueue NOTIFYs; while no
    worker waits (all busy), so none does (0016); and into a quiet queue.
    Checks that every job arrived in its queue, and which runs notified."""
    share = n // PRODUCERS
    runs = (
        ("default", "waiting", "a queue a worker waits on (each enqueue NOTIFYs)"),
        ("default", "busy", "a queue no worker waits on (no NOTIFY)"),
        ("quiet", "quiet", "a quiet queue (no NOTIFY)"),
    )
    for queue, kind, how in runs:
        _reset(dsn)
        with _connect(dsn) as listener:
            if kind == "quiet":
                listener.execute(_q("select {schema}.set_queue_notify('quiet', false)"))
            listener.execute(sql.SQL("listen {}").format(sql.Identifier(SCHEMA)))
            if kind != "busy":  # as a waiting worker does
                _one(listener, _q("select {schema}.start_listening()"))
            seconds = _produce(dsn, queue, share)
            notified = any(True for _ in listener.notifies(timeout=0.2))
            count = _one(
                listener,
                _q("select count(*) from {schema}.jobs where queue = %s"),
                [queue],
            )
        if count != share * PRODUCERS:
            raise RuntimeError(f"producers: {count} jobs, expected {share * PRODUCERS}")
        if notified != (kind == "waiting"):
            raise RuntimeError(f"producers ({kind}): notified={notified}")
        out.add(
            "enqueue_8_producers" + ("" if kind == "waiting" else f"_{kind}"),
            share * PRODUCERS / seconds,
            f"jobs/s, one job per transaction from {PRODUCERS} threads' connections,"
            f" into {how}",
        )


def _fill(dsn: str, n: int, task: str) -> None:
    _reset(dsn)
    with _connect(dsn) as conn:
        with conn.transaction():
            app.enqueue_many(conn, task, [{} for _ in range(n)])
        conn.execute(_q("vacuum analyze {schema}.jobs"))


def bench_drain(dsn: str, n: int, out: Results) -> None:
    """Drain n queued no-op jobs (non-transactional), with 1 and 2 processes."""
    for processes in (1, 2):
        _fill(dsn, n, "noop")
        _run_workers(dsn, processes, "-c", "500", "--prefetch", "500")
        with _connect(dsn) as conn:
            out.add(
                f"drain_{processes}proc",
                _drain_rate(conn, n, "noop"),
                f"jobs/s, {processes} worker process(es), -c 500 --prefetch 500",
            )


def bench_failures(dsn: str, n: int, out: Results) -> None:
    """Drain n jobs whose handler raises (a storm of failures), 1 process."""
    _reset(dsn)
    with _connect(dsn) as conn:
        with conn.transaction():
            broken.enqueue_many(conn, [{} for _ in range(n)])  # max_attempts 1
        conn.execute(_q("vacuum analyze {schema}.jobs"))
    # Every failure logs a warning: at error level the figure is the queue's,
    # not the terminal's.
    _run_workers(dsn, 1, "-c", "500", "--prefetch", "500", "--log-level", "error")
    with _connect(dsn) as conn:
        row = conn.execute(
            _q(
                "select count(*), count(*) filter (where attempts = 1"
                " and errors -> 0 ->> 'kind' = 'RuntimeError'),"
                " extract(epoch from max(finished_at) - min(started_at))"
                " from {schema}.finished_jobs where state = 'dead'"
            )
        ).fetchone()
    assert row is not None
    dead, recorded, seconds = row
    if dead != n or recorded != n:
        raise RuntimeError(f"failures: {dead} of {n} jobs dead, {recorded} recorded")
    out.add(
        "failures_1proc",
        float(n / seconds),
        "jobs/s, every handler raises, each job ends dead with its error"
        " (max_attempts 1), 1 worker process, -c 500 --prefetch 500",
    )


def bench_business(dsn: str, n: int, out: Results) -> None:
    """Drain n transactional jobs that each insert one business row."""
    variants = (
        ("business", "business", "sync", ("-c", "8", "--prefetch", "8")),
        ("business_async", "business_async", "async", ("-c", "8", "--prefetch", "8")),
        (
            "business_batched",
            "business",
            "sync",
            ("-c", "64", "--prefetch", "64", "--tx-batch", "16"),
        ),
        (
            "business_async_batched",
            "business_async",
            "async",
            ("-c", "64", "--prefetch", "64", "--tx-batch", "16"),
        ),
    )
    for name, task, kind, options in variants:
        for processes in (1, 2):
            _fill(dsn, n, task)
            _run_workers(dsn, processes, *options)
            with _connect(dsn) as conn:
                out.add(
                    f"{name}_{processes}proc",
                    _drain_rate(conn, n, task),
                    f"jobs/s, {processes} worker process(es), {' '.join(options)}, "
                    f"{kind} handler, one business row per job in its transaction",
                )


_STAMPED = _q("select count(*) from {schema}.finished_jobs where task = 'stamp'")


def bench_latency(dsn: str, jobs: int, out: Results) -> None:
    """Pickup latency on an idle worker: enqueue commit to handler start."""
    _reset(dsn)
    worker = _worker(dsn, "-c", "10", "--poll-interval", "5")
    try:
        committed: dict[int, float] = {}
        with psycopg.connect(dsn) as conn:
            _wait_for_worker(conn)
            for _ in range(jobs):
                job_id = stamp.enqueue(conn)
                conn.commit()
                committed[job_id] = time.time()
                time.sleep(0.02)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = _one(conn, _STAMPED)
                conn.commit()
                if done == jobs:
                    break
                time.sleep(0.05)
            rows = conn.execute(
                _q("select id, result from {schema}.finished_jobs where task = 'stamp'")
            ).fetchall()
    finally:
        worker.terminate()
        worker.wait(30)
    if len(rows) != jobs:
        raise RuntimeError(f"latency: {len(rows)} of {jobs} jobs ran")
    waits = sorted(
        (float(result) - committed[job_id]) * 1000 for job_id, result in rows
    )
    cuts = statistics.quantiles(waits, n=100, method="inclusive")
    for name, value in (("p50", cuts[49]), ("p95", cuts[94]), ("p99", cuts[98])):
        out.add(
            f"latency_{name}_ms",
            value,
            f"ms from enqueue commit to handler start, idle worker, "
            f"one job every 20 ms ({jobs} jobs)",
        )


def _wait_for_worker(conn: psycopg.Connection[Any]) -> None:
    deadline = time.monotonic() + 30
    while _one(conn, _q("select count(*) from {schema}.workers")) == 0:
        conn.commit()
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark worker did not start")
        time.sleep(0.05)
    time.sleep(0.3)  # let it finish its first (empty) lease and LISTEN


_INSERT = _q(
    "insert into {schema}.jobs (task, args) select 'noop', '{{}}'"
    " from generate_series(1, %s)"
)


def _lease_ms(conn: psycopg.Connection[Any], rounds: int) -> float:
    """Median time of lease(10) + complete of those 10, in ms.

    Ten new jobs are enqueued (untimed) after each round, so the backlog keeps
    its size while it is measured.
    """
    lease = _q(
        "select array_agg(id), array_agg(lease_token) from"
        " {schema}.lease(array['default'], 10, 'bench', 60)"
    )
    complete = _q("select count(*) from {schema}.complete(%s, %s)")
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        ids, tokens = conn.execute(lease).fetchone() or (None, None)
        done = _one(conn, complete, [ids, tokens])
        times.append((time.perf_counter() - started) * 1000)
        if done != 10:
            raise RuntimeError(f"lease benchmark: {done} of 10 jobs completed")
        conn.execute(_INSERT, [10])
    return statistics.median(times)


_SCHEDULED = _q(
    "insert into {schema}.jobs (task, args, priority, run_at) select 'noop', '{{}}',"
    " 1, now() + interval '1 day' from generate_series(1, %s)"
)


def bench_backlog(dsn: str, big: int, out: Results) -> None:
    """Lease time with 1,000 queued jobs against ``big`` queued jobs, and against
    1,000 due jobs behind ``big`` scheduled for later at a higher priority (a
    backlog of retries waiting out their backoff, say)."""
    results = []
    for due, scheduled in ((1000, 0), (big, 0), (1000, big)):
        _reset(dsn)
        with _connect(dsn) as conn:
            conn.execute(_INSERT, [due])
            if scheduled:
                conn.execute(_SCHEDULED, [scheduled])
            # Measure the steady state, not the checkpoint after a bulk load.
            conn.execute(_q("vacuum analyze {schema}.jobs"))
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                conn.execute("checkpoint")
            results.append(_lease_ms(conn, 1000))
    small_ms, big_ms, behind_ms = results
    out.add("lease_ms_1k", small_ms, "ms, median lease(10) + complete, 1,000 queued")
    out.add("lease_ms_big", big_ms, f"ms, the same with {big:,} queued")
    out.add("lease_ratio", big_ms / small_ms, f"lease time at {big:,} / at 1,000")
    out.add(
        "lease_ms_behind_scheduled",
        behind_ms,
        f"ms, the same with 1,000 due behind {big:,} scheduled later at a higher"
        " priority",
    )
    out.add(
        "lease_ratio_behind_scheduled",
        behind_ms / small_ms,
        f"lease time behind {big:,} scheduled / with 1,000 queued",
    )


def bench_memory(dsn: str, n: int, out: Results) -> None:
    """Peak RSS of one worker process at concurrency 64 while it drains."""
    _reset(dsn)
    with psycopg.connect(dsn) as conn:
        app.enqueue_many(conn, "nap", [{"ms": 10} for _ in range(n)])
        conn.commit()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    _run_workers(dsn, 1, "-c", "64")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    note = "MB, peak RSS of a worker at -c 64 (64 async jobs of 10 ms at a time)"
    if peak_kb <= before:
        note += "; an earlier child had a higher peak, so this is an upper bound"
    out.add("worker_peak_rss_mb", peak_kb / 1024, note)


WORKLOADS: dict[str, Callable[[str, int, Results], None]] = {
    "enqueue": bench_enqueue,
    "producers": bench_producers,
    "drain": bench_drain,
    "failures": bench_failures,
    "business": bench_business,
    "latency": lambda dsn, n, out: bench_latency(dsn, 500, out),
    "backlog": lambda dsn, n, out: bench_backlog(dsn, 1_000_000, out),
    "memory": lambda dsn, n, out: bench_memory(dsn, min(n, 5000), out),
}


def run(dsn: str, n: int = 20_000, workloads: list[str] | None = None) -> Results:
    """Run the chosen workloads (all by default) and return their figures."""
    out = Results()
    try:
        for name in workloads or list(WORKLOADS):
            WORKLOADS[name](dsn, n, out)
    finally:
        drop(dsn)
    return out


def render(results: Results) -> str:
    """The figures as a plain-text table."""
    width = max(len(name) for name in results.figures)
    lines = [f"{'workload'.ljust(width)}  {'value':>12}  how"]
    for name, value in results.figures.items():
        lines.append(f"{name.ljust(width)}  {value:>12,.3f}  {results.notes[name]}")
    return "\n".join(lines)


def to_json(results: Results) -> str:
    """The figures and notes as JSON."""
    return json.dumps({"figures": results.figures, "notes": results.notes}, indent=2)
