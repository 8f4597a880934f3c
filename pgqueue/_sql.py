"""Every SQL statement pgqueue sends, composed once per schema name.

The stored functions (sql/migrations) own the transitions; these statements
only call them or read the views.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from psycopg import sql

from pgqueue.migrations import check_schema_name

if TYPE_CHECKING:
    from typing_extensions import LiteralString

_TEMPLATES: dict[str, LiteralString] = {
    "enqueue": "select {schema}.enqueue(%s, %s::jsonb, %s, %s, %s, %s, %s)",
    "enqueue_delayed": (
        "select {schema}.enqueue(%s, %s::jsonb, %s, %s, now() + %s::interval, %s, %s)"
    ),
    # Bulk enqueue of one task: only the payloads travel per job, the options are
    # broadcast with array_fill.
    "enqueue_many": (
        "select id from {schema}.enqueue_many("
        "array_fill(%(task)s::text, array[%(n)s]), %(args)s::jsonb[],"
        " array_fill(%(queue)s::text, array[%(n)s]),"
        " array_fill(%(priority)s::int, array[%(n)s]),"
        " array_fill(%(when)s::timestamptz, array[%(n)s]),"
        " array_fill(%(max_attempts)s::int, array[%(n)s]), null)"
    ),
    "enqueue_many_delayed": (
        "select id from {schema}.enqueue_many("
        "array_fill(%(task)s::text, array[%(n)s]), %(args)s::jsonb[],"
        " array_fill(%(queue)s::text, array[%(n)s]),"
        " array_fill(%(priority)s::int, array[%(n)s]),"
        " array_fill(now() + %(when)s::interval, array[%(n)s]),"
        " array_fill(%(max_attempts)s::int, array[%(n)s]), null)"
    ),
    # Bulk enqueue by COPY: reserve the ids, fix run_at by the database clock and
    # queue the NOTIFY (delivered at commit) in one round trip, then stream rows.
    # run_at as ISO 8601 text in UTC: COPY reads it back whatever the session's
    # DateStyle and time zone (a time late in 9999 UTC is in 10000 in Tokyo,
    # which Python cannot hold).
    "reserve_ids": (
        "select array_agg(nextval('{schema}.jobs_id_seq'::regclass)),"
        " to_char(coalesce(%(run_at)s::timestamptz, now() + %(delay)s::interval,"
        " now()) at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
        " {schema}._notify(array[%(queue)s::text])"
        " from generate_series(1, %(n)s)"
    ),
    "copy_jobs": (
        "copy {schema}.jobs (id, queue, task, args, priority, run_at, max_attempts)"
        " from stdin"
    ),
    # args as text: the worker parses it (worker._load_args), faster than
    # psycopg's jsonb loader.
    "lease": (
        "select id, queue, task, args::text, priority, attempts, max_attempts,"
        " lease_token, run_at, created_at from {schema}.lease(%s, %s, %s, %s)"
    ),
    # The worker's batch completion: returns the ids NOT completed (lease lost),
    # an empty array almost always, so no row per job travels back.
    # The worker's batches wait briefly for a row lock (0020).
    "complete": (
        "select array(select unnest(%(ids)s::bigint[]) except all"
        " select {schema}.complete_waiting(%(ids)s::bigint[], %(tokens)s::uuid[],"
        " %(results)s::jsonb[], %(lock_wait_ms)s))"
    ),
    "complete_one": "select {schema}.complete_one(%s, %s, %s::jsonb)",
    # A job without a result: the same and the COMMIT in one message, sent
    # through a client-side binding cursor (psycopg quotes the id and the
    # token into the text): one round trip without a pipeline, whose setup
    # cost the worker 30-35 us of CPU a job (2 cores). Not for results: the
    # text of a statement that fails goes to the server's log.
    "complete_one_commit": "select {schema}.complete_one(%s, %s); commit",
    "complete_all": (
        "select {schema}.complete_all(%s::bigint[], %s::uuid[], %s::jsonb[])"
    ),
    # The worker's batch of failures: (id, token, new state) of those whose
    # lease it still held; a missing one lost its lease.
    "fail_many": (
        "select id, token, state::text from {schema}.fail_many_waiting("
        "%s::bigint[], %s::uuid[], %s::jsonb[], %s::float8[], %s)"
    ),
    "heartbeat": "select {schema}.heartbeat(%s, %s::bigint[], %s::uuid[], %s)",
    # The listening locks of an idle worker's lease connection (0016).
    "start_listening": "select {schema}.start_listening()",
    "stop_listening": "select {schema}.stop_listening()",
    "reap": "select id, state from {schema}.reap(%s)",
    "hand_back": "select {schema}.hand_back(%s::bigint[], %s::uuid[])",
    # Which of these jobs still hold these tokens (shutdown's last hand back).
    "still_leased": (
        "select j.id from {schema}.jobs j"
        " join unnest(%s::bigint[], %s::uuid[]) as t(id, token)"
        " on j.id = t.id and j.lease_token = t.token"
    ),
    "next_run_at": (
        "select extract(epoch from {schema}.next_run_at(%s) - now())::float8"
    ),
    "register_worker": "select {schema}.register_worker(%s, %s, %s, %s)",
    "unregister_worker": "select {schema}.unregister_worker(%s)",
    "prune": "select {schema}.prune(make_interval(secs => %s), %s)",
    # The worker's: one prune at a time across the workers of a schema (the
    # first parameter names the lock); NULL when another holds it. Side by side,
    # four pruners on 2 cores were no faster in all than one, and each batch
    # took 4-5x as long. The two-key form keeps the lock out of the one-key
    # space that migrate and applications lock in.
    "prune_alone": (
        "select case when pg_try_advisory_xact_lock(1885827445, hashtext(%s))"
        " then {schema}.prune(make_interval(secs => %s), %s) end"
    ),
    # `pgqueue prune`'s: waits for the same lock (a worker's batch in progress),
    # then holds it for its own batch, so the workers skip their rounds meanwhile.
    "prune_lock": "select pg_advisory_xact_lock(1885827445, hashtext(%s))",
    "cancel": "select {schema}.cancel(%s)",
    "configure_queue": "select {schema}.configure_queue(%s, %s)",
    "pause_queue": "select {schema}.pause_queue(%s)",
    "resume_queue": "select {schema}.resume_queue(%s)",
    "set_queue_notify": "select {schema}.set_queue_notify(%s, %s)",
    "queue_options": (
        "select coalesce(bool_and(keep_succeeded), true), coalesce(bool_and(paused),"
        " false), coalesce(bool_and(notify), true) from {schema}.queues"
        " where name = %s"
    ),
    "retry": "select {schema}.retry(%s)",
    "retry_dead": "select {schema}.retry_dead(%s)",
    "queue_depth": (
        "select queue, queued, scheduled, running, succeeded, dead, cancelled,"
        " extract(epoch from oldest_queued_age)::float8, paused"
        " from {schema}.queue_depth order by queue"
    ),
    "job": (
        "select id, queue, task, state::text, priority, attempts, max_attempts,"
        " run_at, created_at, started_at, finished_at, leased_by, args, result,"
        " errors from {schema}.jobs_overview where id = %s"
    ),
    "jobs": (
        "select id, queue, task, state::text, priority, attempts, run_at,"
        " created_at, finished_at from {schema}.jobs_overview"
        " where (%(queue)s::text is null or queue = %(queue)s)"
        # The state as the enum, not text: a constant the planner checks against
        # each table's state constraint, so the table that cannot hold it is
        # skipped (--state dead read all of jobs through its primary key).
        " and (%(state)s::{schema}.job_state is null"
        " or state = %(state)s::{schema}.job_state)"
        " and (%(task)s::text is null or task = %(task)s)"
        " order by id desc limit %(limit)s"
    ),
}


def prune_lock_name(schema: str) -> str:
    """The name of the lock that lets one pruner of ``schema`` run at a time."""
    return f"pgqueue prune {schema}"


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements above with the schema filled in (as ready-to-send text)."""

    enqueue: str
    enqueue_delayed: str
    enqueue_many: str
    enqueue_many_delayed: str
    reserve_ids: str
    copy_jobs: str
    lease: str
    complete: str
    complete_one: str
    complete_one_commit: str
    complete_all: str
    fail_many: str
    heartbeat: str
    start_listening: str
    stop_listening: str
    reap: str
    hand_back: str
    still_leased: str
    next_run_at: str
    register_worker: str
    unregister_worker: str
    prune: str
    prune_alone: str
    prune_lock: str
    cancel: str
    configure_queue: str
    pause_queue: str
    resume_queue: str
    set_queue_notify: str
    queue_options: str
    retry: str
    retry_dead: str
    queue_depth: str
    job: str
    jobs: str


@cache
def statements(schema: str) -> Statements:
    """Compose every statement for ``schema`` (a quoted identifier) once."""
    ident = sql.Identifier(check_schema_name(schema))
    rendered = {
        name: sql.SQL(text).format(schema=ident).as_string(None)
        for name, text in _TEMPLATES.items()
    }
    return Statements(**rendered)
