"""Least privilege: an owner that is no superuser migrates; a producer can only
enqueue; a worker runs jobs without DDL rights."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgqueue
from pgqueue import migrations
from pgqueue.errors import ConfigurationError


@pytest.fixture
def roles(conn: psycopg.Connection[Any], dsn: str) -> Iterator[dict[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"pq_{kind}_{suffix}" for kind in ("owner", "producer", "worker")}
    for name in names.values():
        conn.execute(sql.SQL("create role {} login").format(sql.Identifier(name)))
    conn.execute(
        sql.SQL("create schema priv authorization {}").format(
            sql.Identifier(names["owner"])
        )
    )
    conn.execute(sql.SQL("create table business (job_id bigint)"))
    conn.execute(
        sql.SQL("grant insert on business to {}").format(
            sql.Identifier(names["worker"])
        )
    )
    dsns = {kind: make_conninfo(dsn, user=name) for kind, name in names.items()}
    yield dsns
    conn.execute("drop schema priv cascade")
    conn.execute("drop table business")
    for name in names.values():
        conn.execute(sql.SQL("drop owned by {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("drop role {}").format(sql.Identifier(name)))


def test_roles(roles: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    # The owner (no superuser, no CREATE on the database) migrates its schema.
    with psycopg.connect(roles["owner"], autocommit=True) as owner:
        assert owner.execute(
            "select rolsuper from pg_roles where rolname = current_user"
        ).fetchone() == (False,)
        applied = migrations.migrate(owner, "priv")
        assert len(applied) == migrations.latest_version()
        assert migrations.migrate(owner, "priv") == []
        for kind in ("producer", "worker"):
            user = conninfo_to_dict(roles[kind])["user"]
            owner.execute(
                sql.SQL("select priv.{}(%s)").format(sql.Identifier(f"grant_{kind}")),
                [user],
            )
        # Queue options: the owner's, and a worker's (it changes the tables).
        owner.execute("select priv.configure_queue('fast', false)")
        # Every function is granted by name: none is PUBLIC's (_forget_keys
        # was, until 0021).
        public = owner.execute(
            "select array_agg(p.proname::text) from pg_proc p"
            " where p.pronamespace = 'priv'::regnamespace"
            " and has_function_privilege('public', p.oid, 'execute')"
        ).fetchone()
        assert public == (None,)

    # `pgqueue migrate` by a worker's role (no CREATE on the schema) on a
    # schema that is up to date: nothing to do, and no error.
    with psycopg.connect(roles["worker"], autocommit=True) as worker_conn:
        assert migrations.migrate(worker_conn, "priv") == []

    # The producer enqueues (one, bulk by arrays, bulk by COPY) but reads nothing.
    producer_app = pgqueue.App(roles["producer"], schema="priv")
    with psycopg.connect(roles["producer"], autocommit=True) as producer:
        first = producer_app.enqueue(
            producer, "record", {"secret": "tenant-a"}, idempotency_key="k1"
        )
        assert (
            producer_app.enqueue(
                producer, "record", {"secret": "x"}, idempotency_key="k1"
            )
            == first
        )
        producer_app.enqueue_many(producer, "record", [{"n": i} for i in range(10)])
        # Bad input from SQL gets the rule's error, raised with the owner's rights.
        for query in (
            "select priv.enqueue('t', '{}', 'bad queue')",
            "select priv.enqueue_many(array['t'], array['{}'::jsonb], array['bad q'])",
        ):
            with pytest.raises(psycopg.errors.CheckViolation, match="queue name"):
                producer.execute(query)
        producer_app.enqueue_many(producer, "record", [{"n": i} for i in range(600)])
        # A queue that keeps no succeeded jobs: their keys go with them.
        fast = [
            producer_app.enqueue(
                producer, "record", {"n": i}, queue="fast", idempotency_key=f"f{i}"
            )
            for i in range(3)
        ]
        for query in (
            "select args from priv.jobs",
            "select * from priv.jobs_overview",
            "select * from priv.lease(array['default'], 1, 'thief', 60)",
            "select priv.configure_queue('default', false)",
            "select priv.pause_queue('default')",
            "select priv.set_queue_notify('default', false)",
            "select priv._check_jobs(array['t'], null, null, null, null)",
            # COPY's columns only: a producer cannot forge a running job (0013).
            "insert into priv.jobs (queue, task, state, lease_token)"
            " values ('default', 't', 'running', gen_random_uuid())",
            "insert into priv.jobs (queue, task, attempts) values ('default', 't', 3)",
            "create table priv.sneaky (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                producer.execute(query)

    # The worker runs every job, but cannot change the schema.
    worker_app = pgqueue.App(roles["worker"], schema="priv")

    @worker_app.task()
    def record(ctx: pgqueue.JobContext, **args: Any) -> None:
        ctx.conn.execute("insert into business values (%s)", [ctx.job.id])

    pgqueue.Worker(
        worker_app,
        queues=["default", "fast"],
        until_empty=True,
        handle_signals=False,
        concurrency=8,
    ).run()
    with psycopg.connect(roles["worker"], autocommit=True) as worker:
        depth = worker.execute(
            "select queued, running, succeeded from priv.queue_depth"
            " where queue = 'default'"
        ).fetchone()
        assert depth == (0, 0, 611)
        ran = conn.execute(  # business is write-only for the worker
            "select count(*) from business where job_id = any(%s)", [fast]
        ).fetchone()
        assert ran == (3,)
        left = worker.execute(
            "select (select count(*) from priv.jobs_overview where queue = 'fast'),"
            " (select count(*) from priv.idempotency_keys where queue = 'fast')"
        ).fetchone()
        assert left == (0, 0)
        # A worker role pauses and resumes queues (the CLI's `pgqueue queue`).
        worker.execute("select priv.pause_queue('fast')")
        worker.execute("select priv.resume_queue('fast')")
        assert worker.execute(
            "select paused from priv.queues where name = 'fast'"
        ).fetchone() == (False,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            worker.execute("create table priv.sneaky (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            worker.execute("drop table priv.jobs")


QUEUE_SETTINGS = (
    "select priv.configure_queue('q', false)",
    "select priv.pause_queue('q')",
    "select priv.resume_queue('q')",
    "select priv.set_queue_notify('q', false)",
)


def test_roles_granted_before_an_upgrade_keep_their_rights(
    roles: dict[str, str],
) -> None:
    """A worker role granted on an old schema may set queue options and take
    the listening locks after the upgrade without grant_worker running again;
    a producer still may not."""
    with psycopg.connect(roles["owner"], autocommit=True) as owner:
        migrations.migrate(owner, "priv", target=4)  # before configure_queue
        for kind in ("producer", "worker"):
            user = conninfo_to_dict(roles[kind])["user"]
            owner.execute(
                sql.SQL("select priv.{}(%s)").format(sql.Identifier(f"grant_{kind}")),
                [user],
            )
        migrations.migrate(owner, "priv", target=6)
        with (
            psycopg.connect(roles["worker"], autocommit=True) as worker,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            worker.execute(QUEUE_SETTINGS[1])  # the gap 0007 closes
        assert [m.version for m in migrations.migrate(owner, "priv")] == list(
            range(7, migrations.latest_version() + 1)
        )
    with psycopg.connect(roles["worker"], autocommit=True) as worker:
        for query in QUEUE_SETTINGS:
            worker.execute(query)
        assert worker.execute(
            "select keep_succeeded, paused, notify from priv.queues where name = 'q'"
        ).fetchone() == (False, False, False)
        # The listening locks (0016), and the key function they call.
        assert worker.execute("select priv.start_listening()").fetchone() == (True,)
        worker.execute("select priv.stop_listening()")
        # What complete() calls for a queue that keeps no succeeded jobs
        # (0005), granted by name since PUBLIC lost it (0021).
        worker.execute("select priv._forget_keys('{}', '{}', '{}')")
    with psycopg.connect(roles["producer"], autocommit=True) as producer:
        for query in [
            *QUEUE_SETTINGS,
            "select priv.start_listening()",
            "select priv._forget_keys('{}', '{}', '{}')",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                producer.execute(query)
        # Its INSERT on jobs narrowed to COPY's columns (0013), and COPY works.
        app = pgqueue.App(roles["producer"], schema="priv")
        assert len(app.enqueue_many(producer, "t", [{} for _ in range(600)])) == 600
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            producer.execute(
                "insert into priv.jobs (queue, task, errors) values ('q', 't', '[1]')"
            )


# Look-alikes of everything enqueue and the rules it inlines call, each raising
# when called: operators on text and on integers, and the functions by name.
HOSTILE = """
create schema hostile;
grant usage on schema hostile to public;
create function hostile.trap_tt(text, text) returns boolean language plpgsql
    as $$ begin raise exception 'hijacked: % and %', $1, $2; end $$;
create function hostile.trap_ii(integer, integer) returns boolean language plpgsql
    as $$ begin raise exception 'hijacked: % and %', $1, $2; end $$;
create operator hostile.= (leftarg = text, rightarg = text, function = hostile.trap_tt);
create operator hostile.~ (leftarg = text, rightarg = text, function = hostile.trap_tt);
create function hostile.trap_bb(bigint, bigint) returns boolean language plpgsql
    as $$ begin raise exception 'hijacked: % and %', $1, $2; end $$;
create function hostile.trap_minus(integer) returns integer language plpgsql
    as $$ begin raise exception 'hijacked: -%', $1; end $$;
create operator hostile.= (leftarg = bigint, rightarg = bigint, function = hostile.trap_bb);
create operator hostile.- (rightarg = integer, function = hostile.trap_minus);
create operator hostile.>= (leftarg = integer, rightarg = integer,
                            function = hostile.trap_ii);
create operator hostile.<= (leftarg = integer, rightarg = integer,
                            function = hostile.trap_ii);
create function hostile.length(text) returns integer language plpgsql
    as $$ begin raise exception 'hijacked: length'; end $$;
create function hostile.now() returns timestamptz language plpgsql
    as $$ begin raise exception 'hijacked: now'; end $$;
create function hostile.nextval(regclass) returns bigint language plpgsql
    as $$ begin raise exception 'hijacked: nextval'; end $$;
create function hostile.pg_notify(text, text) returns void language plpgsql
    as $$ begin raise exception 'hijacked: pg_notify'; end $$;
create function hostile.pg_try_advisory_xact_lock(integer, integer) returns boolean
    language plpgsql as $$ begin raise exception 'hijacked: try lock'; end $$;
create function hostile.hashtext(text) returns integer language plpgsql
    as $$ begin raise exception 'hijacked: hashtext'; end $$;
create function hostile.pg_backend_pid() returns integer language plpgsql
    as $$ begin raise exception 'hijacked: pg_backend_pid'; end $$;
create function hostile.trap_int(integer, integer) returns integer language plpgsql
    as $$ begin raise exception 'hijacked: % and %', $1, $2; end $$;
create operator hostile.% (leftarg = integer, rightarg = integer,
                           function = hostile.trap_int);
create operator hostile.# (leftarg = integer, rightarg = integer,
                           function = hostile.trap_int);
"""


def test_enqueue_ignores_the_callers_search_path(
    roles: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    """enqueue runs as the owner without pinning search_path (0014): a caller
    whose search_path puts look-alikes before pg_catalog reaches none of them."""
    with psycopg.connect(roles["owner"], autocommit=True) as owner:
        migrations.migrate(owner, "priv")
        owner.execute(
            "select priv.grant_producer(%s)",
            [conninfo_to_dict(roles["producer"])["user"]],
        )
        owner.execute("select priv.set_queue_notify('quiet', false)")
    conn.execute(HOSTILE)
    try:
        with (
            psycopg.connect(roles["producer"], autocommit=True) as producer,
            psycopg.connect(roles["owner"], autocommit=True) as listener,
        ):
            listener.execute("listen priv")
            assert listener.execute("select priv.start_listening()").fetchone() == (
                True,
            )
            # Once under the usual path first, so that cached plans exist.
            assert producer.execute("select priv.enqueue('t', '{}', 'warm')").fetchone()
            # Tables of the same names first in the path, one of them saying
            # that q1 is quiet: the functions must not read them.
            producer.execute(
                "create temp table queues (name text, paused boolean, notify boolean);"
                " insert into queues values ('q1', false, false);"
                " create temp table jobs (id bigint, queue text, task text, args jsonb,"
                " priority smallint, run_at timestamptz, max_attempts int,"
                " idempotency_key text);"
                " create temp table idempotency_keys (queue text, key text,"
                " job_id bigint)"
            )
            producer.execute("set search_path = pg_temp, hostile, pg_catalog")
            # The trap works: an unqualified comparison reaches it.
            for trap in (
                "select 'a'::text = 'a'::text",
                "select 1::bigint = 1::bigint",
            ):
                with pytest.raises(psycopg.errors.RaiseException, match="hijacked"):
                    producer.execute(trap)
            first = producer.execute(
                "select priv.enqueue('t', '{}', 'q1', 5, null, 3)"
            ).fetchone()
            later = producer.execute(
                "select priv.enqueue('t', '{}', 'q1', 0,"
                " '2100-01-01'::timestamptz, 25, 'key-1')"
            ).fetchone()
            again = producer.execute(
                "select priv.enqueue('t', '{}', 'q1', 0, null, 25, 'key-1')"
            ).fetchone()
            assert first is not None and later is not None and again == later
            quiet = producer.execute(
                "select priv.enqueue('t', '{}', 'quiet')"
            ).fetchone()
            assert quiet is not None
            with pytest.raises(psycopg.errors.CheckViolation, match="queue name"):
                producer.execute("select priv.enqueue('t', '{}', 'bad q')")
            with pytest.raises(psycopg.Error, match="priority") as refused:
                producer.execute("select priv.enqueue('t', '{}', 'q1', 40000)")
            assert refused.value.sqlstate == "PQ001"
            # Two notifications for q1 (the repeated key sends none), none for
            # the quiet queue.
            notified = [n.payload for n in listener.notifies(timeout=1)]
            assert notified[:1] == ["warm"]
            notified = notified[1:]
            rows = listener.execute(
                "select id, queue, priority, max_attempts, run_at > now(),"
                " idempotency_key from priv.jobs where queue <> 'warm' order by id"
            ).fetchall()
    finally:
        conn.execute("drop schema hostile cascade")
    assert rows == [
        (first[0], "q1", 5, 3, False, None),
        (later[0], "q1", 0, 25, True, "key-1"),
        (quiet[0], "quiet", 0, 25, False, None),
    ]
    assert notified == ["q1", "q1"]


def test_migrate_refuses_a_target_that_is_no_version(
    conn: psycopg.Connection[Any],
) -> None:
    with pytest.raises(ConfigurationError, match="target must be"):
        migrations.migrate(conn, "priv_none", target=migrations.latest_version() + 1)
