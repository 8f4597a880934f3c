"""Enqueue from Python on the caller's connection: transactions, options, bad input."""

from __future__ import annotations

import asyncio
import math
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue.errors import ArgumentsNotSerializable, InvalidJob
from tests.waiting import wait_until

Conn = psycopg.Connection[Any]


@pytest.fixture
def app(dsn: str) -> pgqueue.App:
    app = pgqueue.App(dsn)

    @app.task(queue="emails", priority=3)
    def send(ctx: pgqueue.JobContext, to: str) -> None:
        pass

    return app


def count(conn: Conn, where: str = "true") -> int:
    row = conn.execute(f"select count(*) from pgqueue.jobs where {where}").fetchone()
    return int(row[0]) if row else -1


def test_job_exists_iff_the_callers_transaction_commits(
    app: pgqueue.App, dsn: str, conn: Conn
) -> None:
    send = app.tasks["send"]
    with psycopg.connect(dsn) as producer:
        with producer.transaction():
            committed = send.enqueue(producer, to="a@example.com")
            # Not visible to anyone else before the commit.
            assert count(conn) == 0
        with producer.transaction(force_rollback=True):
            rolled_back = send.enqueue(producer, to="b@example.com")
    assert count(conn) == 1
    assert count(conn, f"id = {committed}") == 1
    assert count(conn, f"id = {rolled_back}") == 0


def test_task_defaults_and_options(app: pgqueue.App, conn: Conn) -> None:
    send = app.tasks["send"]
    a = send.enqueue(conn, to="x")
    b = send.options(priority=-1, queue="bulk", max_attempts=3).enqueue(conn, to="y")
    row_a = conn.execute(
        "select queue, priority, max_attempts, args from pgqueue.jobs where id = %s",
        [a],
    ).fetchone()
    row_b = conn.execute(
        "select queue, priority, max_attempts from pgqueue.jobs where id = %s", [b]
    ).fetchone()
    assert row_a == ("emails", 3, 25, {"to": "x"})
    assert row_b == ("bulk", -1, 3)


def test_delay_and_run_at_use_the_database_clock(app: pgqueue.App, conn: Conn) -> None:
    send = app.tasks["send"]
    delayed = send.options(delay=timedelta(minutes=5)).enqueue(conn, to="x")
    at = datetime.now(timezone.utc) + timedelta(hours=2)
    scheduled = send.options(run_at=at).enqueue(conn, to="y")
    wait = conn.execute(
        "select extract(epoch from run_at - now()) from pgqueue.jobs where id = %s",
        [delayed],
    ).fetchone()
    assert wait is not None and 299 < wait[0] <= 300
    stored = conn.execute(
        "select run_at from pgqueue.jobs where id = %s", [scheduled]
    ).fetchone()
    assert stored is not None and abs((stored[0] - at).total_seconds()) < 0.001


def test_enqueue_by_name_without_the_handler(dsn: str, conn: Conn) -> None:
    producer_app = pgqueue.App(dsn)  # knows no tasks
    job_id = producer_app.enqueue(
        conn, "reports.build", {"day": "2026-11-22"}, queue="reports"
    )
    row = conn.execute(
        "select task, queue, args from pgqueue.jobs where id = %s", [job_id]
    ).fetchone()
    assert row == ("reports.build", "reports", {"day": "2026-11-22"})


def test_bulk_enqueue_returns_ids_in_input_order(app: pgqueue.App, conn: Conn) -> None:
    send = app.tasks["send"]
    ids = send.enqueue_many(conn, ({"to": f"u{i}"} for i in range(5000)))
    assert len(ids) == len(set(ids)) == 5000
    assert ids == sorted(ids)
    assert count(conn, "queue = 'emails'") == 5000
    assert send.enqueue_many(conn, []) == []


@pytest.mark.parametrize("count", [10, 1200], ids=["arrays", "copy"])
def test_bulk_enqueue_with_delay_and_options(dsn: str, conn: Conn, count: int) -> None:
    app = pgqueue.App(dsn)
    ids = app.enqueue_many(
        conn,
        "report",
        [{"n": i, "s": "tab\there \\ back"} for i in range(count)],
        queue="reports",
        priority=7,
        delay=timedelta(hours=1),
        max_attempts=3,
    )
    rows = conn.execute(
        "select min(extract(epoch from run_at - now())), count(*),"
        " count(*) filter (where priority = 7 and max_attempts = 3 and queue = 'reports')"
        " from pgqueue.jobs"
    ).fetchone()
    assert rows is not None and 3590 < rows[0] <= 3600 and rows[1:] == (count, count)
    last = conn.execute(
        "select args from pgqueue.jobs where id = %s", [ids[-1]]
    ).fetchone()
    assert last == ({"n": count - 1, "s": "tab\there \\ back"},)


def test_idempotency_key_under_20_concurrent_producers(
    app: pgqueue.App, dsn: str, conn: Conn
) -> None:
    send = app.tasks["send"].options(idempotency_key="welcome-42")
    barrier = threading.Barrier(20)
    ids: list[int] = []
    lock = threading.Lock()

    def produce() -> None:
        with psycopg.connect(dsn) as c:
            with c.transaction():
                barrier.wait()
                job_id = send.enqueue(c, to="x")
            with lock:
                ids.append(job_id)

    threads = [threading.Thread(target=produce) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 20 and len(set(ids)) == 1
    assert count(conn) == 1


def test_async_producer(app: pgqueue.App, dsn: str, conn: Conn) -> None:
    send = app.tasks["send"]

    async def main() -> list[int]:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            async with aconn.transaction():
                one = await send.enqueue_async(aconn, to="a")
                many = await send.enqueue_many_async(aconn, [{"to": "b"}, {"to": "c"}])
                bulk = await send.enqueue_many_async(aconn, [{"to": "e"}] * 600)
                by_name = await app.enqueue_async(aconn, "send", {"to": "d"})
            return [one, *many, by_name, *bulk]

    ids = asyncio.run(main())
    assert count(conn) == 604 and len(set(ids)) == 604


BAD_INPUT = [
    ({"args": {"when": datetime.now()}}, ArgumentsNotSerializable, "datetime"),
    ({"args": {"x": math.nan}}, ArgumentsNotSerializable, "NaN"),
    (
        {"args": {"x": [1, {"y": math.inf}]}},
        ArgumentsNotSerializable,
        "args['x'][1]['y']",
    ),
    ({"args": {"x": "a\x00b"}}, ArgumentsNotSerializable, "NUL"),
    ({"args": {"x": {1: "int key"}}}, ArgumentsNotSerializable, "keys must be strings"),
    ({"args": {"x": object()}}, ArgumentsNotSerializable, "not JSON"),
    ({"queue": "no spaces"}, InvalidJob, "invalid queue name"),
    ({"queue": ""}, InvalidJob, "invalid queue name"),
    ({"queue": "q" * 129}, InvalidJob, "invalid queue name"),
    # A trailing newline once passed the check ($ matches before it) and broke
    # the COPY path's row format instead.
    ({"queue": "q\n"}, InvalidJob, "invalid queue name"),
    ({"task": "drop table; --"}, InvalidJob, "invalid task name"),
    ({"task": "t\n"}, InvalidJob, "invalid task name"),
    ({"priority": 40000}, InvalidJob, "out of range"),
    ({"priority": 1.5}, InvalidJob, "must be an int"),
    ({"max_attempts": 0}, InvalidJob, "out of range"),
    ({"idempotency_key": "k" * 256}, InvalidJob, "over 255"),
    ({"idempotency_key": ""}, InvalidJob, "non-empty"),
    ({"run_at": datetime(2030, 1, 1)}, InvalidJob, "naive datetime"),
    (
        {"delay": 10.0, "run_at": datetime(2030, 1, 1, tzinfo=timezone.utc)},
        InvalidJob,
        "not both",
    ),
    ({"delay": 1e12}, InvalidJob, "100 years"),
]


@pytest.mark.parametrize(("bad", "error", "message"), BAD_INPUT)
def test_bad_input_raises_clearly_and_writes_nothing(
    dsn: str, conn: Conn, bad: dict[str, Any], error: type[Exception], message: str
) -> None:
    app = pgqueue.App(dsn)
    call: dict[str, Any] = {"task": "t", "args": {"ok": 1}, **bad}
    task, args = call.pop("task"), call.pop("args")
    with psycopg.connect(dsn) as producer, producer.transaction():
        with pytest.raises(
            error, match=message.replace("[", r"\[").replace("]", r"\]")
        ):
            app.enqueue(producer, task, args, **call)
        # The caller's transaction is still usable: the check ran before SQL.
        app.enqueue(producer, "t", {"ok": 2})
    assert count(conn) == 1


def test_payload_size_limit(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn, max_payload_bytes=1000)
    with pytest.raises(ArgumentsNotSerializable, match="over the limit of 1000"):
        app.enqueue(conn, "t", {"blob": "é" * 600})
    app.enqueue(conn, "t", {"blob": "é" * 400})
    assert count(conn) == 1


def test_unicode_and_quotes_are_stored_verbatim(dsn: str, conn: Conn) -> None:
    app = pgqueue.App(dsn)
    args = {"s": "'; drop table pgqueue.jobs; --", "b": "\\x00\\", "u": "日本語 🚀"}
    job_id = app.enqueue(conn, "t", args, idempotency_key='it\'s "quoted"')
    row = conn.execute(
        "select args, idempotency_key from pgqueue.jobs where id = %s", [job_id]
    ).fetchone()
    assert row == (args, 'it\'s "quoted"')


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_bulk_enqueue_by_copy_on_an_autocommit_connection_commits_once(
    dsn: str, conn: psycopg.Connection[Any], kind: str
) -> None:
    """enqueue_many of 500 jobs or more sends two statements (reserve the ids,
    COPY the rows). On an autocommit connection they still commit together,
    with their NOTIFY: a worker it wakes finds every job, and a failure in
    between leaves no half-made enqueue."""
    app = pgqueue.App(dsn)

    @app.task(transactional=False)
    async def send(ctx: pgqueue.JobContext, to: str) -> None:
        pass

    done: list[list[int]] = []

    async def produce_async() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as a:
            done.append(await send.enqueue_many_async(a, [{"to": "x"}] * 600))

    def produce() -> None:
        if kind == "async":
            asyncio.run(produce_async())
            return
        with psycopg.connect(dsn, autocommit=True) as producer:
            done.append(send.enqueue_many(producer, [{"to": "x"}] * 600))

    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn) as blocker,
    ):
        listener.execute("listen pgqueue")
        listener.execute("select pgqueue.start_listening()")
        blocker.execute("lock table pgqueue.jobs in share mode")  # COPY waits
        thread = threading.Thread(target=produce)
        thread.start()
        wait_until(
            lambda: (
                conn.execute(
                    "select count(*) from pg_locks where not granted"
                    " and relation = 'pgqueue.jobs'::regclass"
                ).fetchone()
                == (1,)
            )
        )
        assert list(listener.notifies(timeout=0.3)) == []  # nothing committed yet
        blocker.rollback()
        thread.join(10)
        notes = [n.payload for n in listener.notifies(timeout=2, stop_after=1)]
    assert notes == ["default"]
    assert len(done) == 1 and len(done[0]) == 600
    assert conn.execute("select count(*) from pgqueue.jobs").fetchone() == (600,)


def test_every_enqueue_path_works_whatever_the_callers_row_factory(
    app: pgqueue.App, dsn: str
) -> None:
    from psycopg.rows import dict_row

    send = app.tasks["send"]
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        one = send.enqueue(conn, to="a")
        few = send.enqueue_many(conn, [{"to": "b"}] * 3)
        many = send.enqueue_many(conn, [{"to": "c"}] * 600)  # COPY
        conn.commit()
        assert isinstance(one, int) and len(few) == 3 and len(many) == 600
        row = conn.execute("select count(*) as n from pgqueue.jobs").fetchone()
        assert row == {"n": 604}

    async def enqueue_async() -> tuple[int, list[int]]:
        async with await psycopg.AsyncConnection.connect(
            dsn, row_factory=dict_row
        ) as aconn:
            job = await send.enqueue_async(aconn, to="d")
            jobs = await send.enqueue_many_async(aconn, [{"to": "e"}] * 600)
            await aconn.commit()
            return job, jobs

    job, jobs = asyncio.run(enqueue_async())
    assert isinstance(job, int) and len(jobs) == 600


def test_bulk_enqueue_by_copy_speaks_the_connections_encoding(
    app: pgqueue.App, dsn: str, conn: Conn
) -> None:
    send = app.tasks["send"]
    with psycopg.connect(dsn, client_encoding="LATIN1") as latin:
        ids = send.enqueue_many(latin, [{"to": "café"}] * 600)  # COPY
        one = send.enqueue(latin, to="café")
        latin.commit()
        # Text LATIN1 cannot carry: refused before anything is sent, on every
        # path, and the transaction goes on.
        for enqueue in (
            lambda: send.enqueue(latin, to="漢"),
            lambda: send.enqueue_many(latin, [{"to": "漢"}] * 3),
            lambda: send.enqueue_many(latin, [{"to": "x"}] * 599 + [{"to": "漢"}]),
        ):
            with pytest.raises(InvalidJob, match=r"(?i)latin|iso8859"):
                enqueue()
        assert latin.execute("select 1").fetchone() == (1,)
        latin.rollback()
    stored = conn.execute(
        "select distinct args->>'to' from pgqueue.jobs where id = any(%s)",
        [[*ids, one]],
    ).fetchall()
    assert stored == [("café",)]


def test_bulk_enqueue_by_copy_on_a_sql_ascii_connection_sends_utf8_as_the_rest(
    app: pgqueue.App, dsn: str, conn: Conn
) -> None:
    send = app.tasks["send"]
    with psycopg.connect(dsn, client_encoding="SQL_ASCII") as legacy:
        ids = [send.enqueue(legacy, to="café €")]
        ids += send.enqueue_many(legacy, [{"to": "café €"}] * 3)
        ids += send.enqueue_many(legacy, [{"to": "café €"}] * 500)  # COPY
        legacy.commit()
    stored = conn.execute(
        "select distinct args->>'to' from pgqueue.jobs where id = any(%s)", [ids]
    ).fetchall()
    assert stored == [("café €",)]


def test_a_bulk_enqueue_at_the_end_of_time_works_in_any_session_time_zone(
    app: pgqueue.App, dsn: str, conn: Conn
) -> None:
    send = app.tasks["send"]
    late = datetime(9999, 12, 30, tzinfo=timezone.utc)  # the latest (0022)
    with psycopg.connect(dsn, autocommit=True) as tokyo:
        tokyo.execute("set timezone to 'Asia/Tokyo'")  # 09:00 there
        tokyo.execute("set datestyle to 'SQL, DMY'")
        ids = send.options(run_at=late).enqueue_many(tokyo, [{"to": "x"}] * 600)
    rows = conn.execute(
        "select distinct run_at from pgqueue.jobs where id = any(%s)", [ids]
    ).fetchall()
    assert rows == [(late,)]


@pytest.mark.parametrize(
    "when",
    [
        {"delay": timedelta(days=-366 * 101)},
        {"delay": -(10.0**10)},
        {"run_at": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))},
        # Readable in UTC, not in every zone: the table's range (0022).
        {"run_at": datetime(9999, 12, 31, 22, tzinfo=timezone.utc)},
        {"run_at": datetime(1, 1, 1, 12, tzinfo=timezone.utc)},
    ],
    ids=[
        "timedelta-in-the-past",
        "seconds-in-the-past",
        "past-9999-in-utc",
        "last-day",
        "first-day",
    ],
)
def test_times_a_worker_could_not_read_are_refused(
    app: pgqueue.App, conn: Conn, when: dict[str, Any]
) -> None:
    with pytest.raises(InvalidJob, match=r"100 years|out of range"):
        app.tasks["send"].options(**when).enqueue(conn, to="x")
    assert count(conn) == 0


def test_an_idempotency_key_with_a_lone_surrogate_is_refused(
    app: pgqueue.App, conn: Conn
) -> None:
    with pytest.raises(InvalidJob, match="surrogate"):
        app.tasks["send"].options(idempotency_key="k\ud800").enqueue(conn, to="x")
    assert count(conn) == 0
