"""Enqueue on the caller's connection, inside the caller's transaction.

Nothing here commits or opens a transaction: the job exists if and only if
the caller's transaction commits. Input is checked in Python first so bad
input raises a clear error *before* anything reaches the database, and the
caller's transaction stays usable.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import tuple_row

from pgqueue import _sql, errors, serialization

if TYPE_CHECKING:
    from pgqueue.app import App

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,199}$")
PRIORITY_RANGE = (-32768, 32767)
MAX_ATTEMPTS_RANGE = (1, 1000)
MAX_KEY_LENGTH = 255
# Further out than this is a bug in the caller (or a unit mix-up), not a schedule.
MAX_DELAY = timedelta(days=366 * 100)
# What the table takes (0022): years Python reads, a day inside for any zone.
RUN_AT_RANGE = (
    datetime(1, 1, 2, tzinfo=timezone.utc),
    datetime(9999, 12, 30, tzinfo=timezone.utc),
)


@dataclass(frozen=True, slots=True)
class Options:
    """Enqueue options. ``delay`` and ``run_at`` are exclusive."""

    queue: str = "default"
    priority: int = 0
    delay: timedelta | float | None = None
    run_at: datetime | None = None
    idempotency_key: str | None = None
    max_attempts: int = 25


def check_queue(queue: object) -> str:
    """Return ``queue`` if it is a valid queue name, else raise InvalidJob."""
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        raise errors.InvalidJob(
            f"invalid queue name {queue!r}: 1-128 characters of letters, digits "
            "and _ . : / -, not starting with a punctuation mark"
        )
    return queue


def check_task_name(task: object) -> str:
    """Return ``task`` if it is a valid task name, else raise InvalidJob."""
    if not isinstance(task, str) or not TASK_NAME.fullmatch(task):
        raise errors.InvalidJob(
            f"invalid task name {task!r}: 1-200 characters of letters, digits "
            "and _ . : / -, starting with a letter or _"
        )
    return task


def check_options(opts: Options) -> None:
    """Raise :class:`InvalidJob` for any option out of range."""
    check_queue(opts.queue)
    low, high = PRIORITY_RANGE
    if isinstance(opts.priority, bool) or not isinstance(opts.priority, int):
        raise errors.InvalidJob(f"priority must be an int, got {opts.priority!r}")
    if not low <= opts.priority <= high:
        raise errors.InvalidJob(
            f"priority {opts.priority} is out of range [{low}, {high}]"
        )
    low, high = MAX_ATTEMPTS_RANGE
    if isinstance(opts.max_attempts, bool) or not isinstance(opts.max_attempts, int):
        raise errors.InvalidJob(
            f"max_attempts must be an int, got {opts.max_attempts!r}"
        )
    if not low <= opts.max_attempts <= high:
        raise errors.InvalidJob(
            f"max_attempts {opts.max_attempts} is out of range [{low}, {high}]"
        )
    key = opts.idempotency_key
    if key is not None:
        if not isinstance(key, str) or not key:
            raise errors.InvalidJob("idempotency_key must be a non-empty string")
        if len(key) > MAX_KEY_LENGTH:
            raise errors.InvalidJob(
                f"idempotency_key is {len(key)} characters, over {MAX_KEY_LENGTH}"
            )
        if "\x00" in key:
            raise errors.InvalidJob("idempotency_key contains a NUL character")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidJob(
                "idempotency_key holds a lone surrogate, which UTF-8 cannot encode"
            ) from None
    if opts.delay is not None and opts.run_at is not None:
        raise errors.InvalidJob("give delay or run_at, not both")
    _run_at(opts)


def _run_at(opts: Options) -> datetime | timedelta | None:
    if opts.run_at is not None:
        if not isinstance(opts.run_at, datetime):
            raise errors.InvalidJob(f"run_at must be a datetime, got {opts.run_at!r}")
        if opts.run_at.tzinfo is None or opts.run_at.utcoffset() is None:
            raise errors.InvalidJob(
                "run_at is a naive datetime; give it a timezone "
                "(e.g. datetime.now(timezone.utc))"
            )
        try:
            # The worker reads run_at in UTC: a time Python cannot hold there
            # (9999-12-31 23:00 at -05:00) would fail every lease that met it.
            in_utc = opts.run_at.astimezone(timezone.utc)
        except OverflowError:
            in_utc = None
        low, high = RUN_AT_RANGE
        if in_utc is None or not low <= in_utc <= high:
            raise errors.InvalidJob(
                f"run_at {opts.run_at.isoformat()} is out of range: between"
                f" {low.date()} and {high.date()} UTC"
            )
        return opts.run_at
    if opts.delay is None:
        return None
    delay = opts.delay
    if isinstance(delay, bool) or not isinstance(delay, timedelta | int | float):
        raise errors.InvalidJob(f"delay must be a timedelta or seconds, got {delay!r}")
    if not isinstance(delay, timedelta):
        if delay != delay:  # NaN
            raise errors.InvalidJob("delay is NaN")
        if abs(delay) > MAX_DELAY.total_seconds():
            raise errors.InvalidJob(f"delay {delay} s is more than 100 years")
        delay = timedelta(seconds=delay)
    if abs(delay) > MAX_DELAY:
        raise errors.InvalidJob("delay is more than 100 years")
    return delay


def _when(opts: Options) -> datetime | timedelta | None:
    """When the job is due: an aware datetime, a delay, or None for now().

    A delay is sent as an interval that the statement adds to the database's
    now(), never as this machine's clock.
    """
    return _run_at(opts)


def _params(
    app: App, task: str, args: Mapping[str, Any] | None, opts: Options
) -> tuple[str, list[Any]]:
    check_task_name(task)
    check_options(opts)
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise errors.ArgumentsNotSerializable(
            f"args must be a mapping of keyword arguments, got {type(args).__name__}"
        )
    payload = serialization.dumps(dict(args), max_bytes=app.max_payload_bytes)
    when = _when(opts)
    stmts = _sql.statements(app.schema)
    if isinstance(when, timedelta):
        return stmts.enqueue_delayed, [
            task,
            payload,
            opts.queue,
            opts.priority,
            when,
            opts.max_attempts,
            opts.idempotency_key,
        ]
    return stmts.enqueue, [
        task,
        payload,
        opts.queue,
        opts.priority,
        when,
        opts.max_attempts,
        opts.idempotency_key,
    ]


def _many_params(
    app: App, task: str, args: Iterable[Mapping[str, Any]], opts: Options
) -> tuple[str, dict[str, Any]]:
    check_task_name(task)
    check_options(opts)
    if opts.idempotency_key is not None:
        raise errors.InvalidJob(
            "one idempotency_key cannot cover many jobs; enqueue them one by one"
        )
    payloads = []
    limit = app.max_payload_bytes
    for index, item in enumerate(args):
        if type(item) is not dict:
            if not isinstance(item, Mapping):
                raise errors.ArgumentsNotSerializable(
                    f"args[{index}] must be a mapping, got {type(item).__name__}"
                )
            item = dict(item)
        try:
            payloads.append(serialization.dumps(item, max_bytes=limit))
        except errors.ArgumentsNotSerializable as exc:
            # Name the job in the path only on error: formatting it for every
            # job cost more than the check.
            text = str(exc).replace("args", f"args[{index}]", 1)
            raise errors.ArgumentsNotSerializable(text) from None
    n = len(payloads)
    when = _when(opts)
    stmts = _sql.statements(app.schema)
    query = (
        stmts.enqueue_many_delayed
        if isinstance(when, timedelta)
        else stmts.enqueue_many
    )
    # Scalars are broadcast by the statement; only the payloads travel per job.
    return query, {
        "n": n,
        "task": task,
        "args": payloads,
        "queue": opts.queue,
        "priority": opts.priority,
        "when": when,
        "max_attempts": opts.max_attempts,
    }


# From this many jobs on, enqueue_many reserves ids and streams the rows with COPY
# (two round trips, no array literal to build and parse on either side).
# `pgqueue bench --workload enqueue`, 20k jobs in 10k-job transactions: 86k/s
# through enqueue_many() arrays, 115k/s by COPY, 150k/s with the faster JSON
# check in serialization.py.
COPY_THRESHOLD = 500


def _reserve_params(params: dict[str, Any]) -> dict[str, Any]:
    when = params["when"]
    return {
        "n": params["n"],
        "queue": params["queue"],
        "run_at": when if isinstance(when, datetime) else None,
        "delay": when if isinstance(when, timedelta) else None,
    }


def _copy_rows(
    ids: list[int], params: dict[str, Any], run_at: str | bytes, encoding: str
) -> bytes:
    """COPY text rows, in the connection's encoding (what COPY reads).
    ``run_at``: ISO 8601 text in UTC, which COPY reads whatever the session's
    DateStyle and time zone. JSON text has no raw tab or newline (json.dumps
    escapes control characters), so doubling backslashes is the only escaping
    needed; queue and task names were checked to hold no special characters."""
    if isinstance(run_at, bytes):  # text arrives as bytes over SQL_ASCII
        run_at = run_at.decode("ascii")
    fixed = "\t".join([params["queue"], params["task"]])
    tail = f"\t{params['priority']}\t{run_at}\t{params['max_attempts']}\n"
    lines = [
        f"{job_id}\t{fixed}\t{payload.replace(chr(92), chr(92) * 2)}{tail}"
        for job_id, payload in zip(ids, params["args"], strict=True)
    ]
    return "".join(lines).encode(encoding)


def _check_encodable(params: dict[str, Any], encoding: str) -> None:
    """Raise InvalidJob before anything is sent if a payload holds text the
    connection's encoding cannot carry (COPY would fail mid-stream, and abort
    the caller's transaction). UTF-8 carries all that serialization lets by."""
    if encoding.replace("-", "").replace("_", "").lower() == "utf8":
        return
    for index, payload in enumerate(params["args"]):
        try:
            payload.encode(encoding)
        except UnicodeEncodeError as exc:
            raise _unencodable(exc, encoding, f"args[{index}]") from None


def _unencodable(
    exc: UnicodeEncodeError, encoding: str, what: str
) -> errors.InvalidJob:
    return errors.InvalidJob(
        f"{what} holds {exc.object[exc.start : exc.end]!r}, which the"
        f" connection's encoding ({encoding}) cannot carry"
    )


def _encoding(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """The Python codec of what the connection sends. SQL_ASCII, which psycopg
    names "ascii", takes any bytes: psycopg sends UTF-8 there, and so does
    COPY here."""
    encoding = conn.info.encoding
    return "utf-8" if encoding == "ascii" else encoding


def _ids(rows: list[tuple[Any, ...]]) -> list[int]:
    return [int(row[0]) for row in rows]


def enqueue(
    conn: psycopg.Connection[Any],
    app: App,
    task: str,
    args: Mapping[str, Any] | None,
    opts: Options,
) -> int:
    """Enqueue one job on ``conn`` (the caller's transaction); return its id."""
    query, params = _params(app, task, args, opts)
    try:
        # Tuples, whatever row factory the caller's connection has.
        row = conn.cursor(row_factory=tuple_row).execute(query, params).fetchone()
    except psycopg.Error as exc:
        raise errors.from_database(exc) from None
    except UnicodeEncodeError as exc:  # nothing was sent
        raise _unencodable(exc, conn.info.encoding, "the job") from None
    assert row is not None
    return int(row[0])


async def enqueue_async(
    conn: psycopg.AsyncConnection[Any],
    app: App,
    task: str,
    args: Mapping[str, Any] | None,
    opts: Options,
) -> int:
    """Enqueue one job on an async ``conn``; return its id."""
    query, params = _params(app, task, args, opts)
    try:
        cur = await conn.cursor(row_factory=tuple_row).execute(query, params)
        row = await cur.fetchone()
    except psycopg.Error as exc:
        raise errors.from_database(exc) from None
    except UnicodeEncodeError as exc:  # nothing was sent
        raise _unencodable(exc, conn.info.encoding, "the job") from None
    assert row is not None
    return int(row[0])


def enqueue_many(
    conn: psycopg.Connection[Any],
    app: App,
    task: str,
    args: Iterable[Mapping[str, Any]],
    opts: Options,
) -> list[int]:
    """Enqueue one job per mapping in ``args`` in one statement; return the ids."""
    query, params = _many_params(app, task, args, opts)
    if not params["n"]:
        return []
    stmts = _sql.statements(app.schema)
    encoding = _encoding(conn)
    try:
        cur = conn.cursor(row_factory=tuple_row)
        if params["n"] < COPY_THRESHOLD:
            return _ids(cur.execute(query, params).fetchall())
        _check_encodable(params, encoding)
        # Two statements: on an autocommit connection, one transaction all the
        # same, so that the jobs and their NOTIFY commit together.
        with conn.transaction() if conn.autocommit else contextlib.nullcontext():
            row = cur.execute(stmts.reserve_ids, _reserve_params(params)).fetchone()
            assert row is not None
            ids, run_at, _ = row
            data = _copy_rows(ids, params, run_at, encoding)
            with cur.copy(stmts.copy_jobs) as copy:
                copy.write(data)
        return list(ids)
    except psycopg.Error as exc:
        raise errors.from_database(exc) from None
    except UnicodeEncodeError as exc:  # nothing was sent
        raise _unencodable(exc, encoding, "a job") from None


async def enqueue_many_async(
    conn: psycopg.AsyncConnection[Any],
    app: App,
    task: str,
    args: Iterable[Mapping[str, Any]],
    opts: Options,
) -> list[int]:
    """Like :func:`enqueue_many`, on an async connection."""
    query, params = _many_params(app, task, args, opts)
    if not params["n"]:
        return []
    stmts = _sql.statements(app.schema)
    encoding = _encoding(conn)
    try:
        cur = conn.cursor(row_factory=tuple_row)
        if params["n"] < COPY_THRESHOLD:
            await cur.execute(query, params)
            return _ids(await cur.fetchall())
        _check_encodable(params, encoding)
        async with conn.transaction() if conn.autocommit else contextlib.nullcontext():
            await cur.execute(stmts.reserve_ids, _reserve_params(params))
            row = await cur.fetchone()
            assert row is not None
            ids, run_at, _ = row
            data = _copy_rows(ids, params, run_at, encoding)
            async with cur.copy(stmts.copy_jobs) as copy:
                await copy.write(data)
        return list(ids)
    except psycopg.Error as exc:
        raise errors.from_database(exc) from None
    except UnicodeEncodeError as exc:  # nothing was sent
        raise _unencodable(exc, encoding, "a job") from None
