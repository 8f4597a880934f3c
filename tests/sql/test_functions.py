"""The stored functions, called directly: every transition, fencing, ordering."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import pytest

from pgqueue import _sql
from tests.waiting import wait_until

Conn = psycopg.Connection[Any]
T = TypeVar("T")


def one(conn: Conn, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def enqueue(conn: Conn, task: str = "t", **kw: Any) -> int:
    return one(
        conn,
        "select pgqueue.enqueue(%(task)s, %(args)s::jsonb, %(queue)s, %(priority)s,"
        " %(run_at)s, %(max_attempts)s, %(key)s)",
        {
            "task": task,
            "args": json.dumps(kw.get("args", {})),
            "queue": kw.get("queue", "default"),
            "priority": kw.get("priority", 0),
            "run_at": kw.get("run_at"),
            "max_attempts": kw.get("max_attempts", 25),
            "key": kw.get("key"),
        },
    )


def lease(conn: Conn, n: int = 1, queues: list[str] | None = None, secs: float = 60):
    return conn.execute(
        "select id, lease_token, attempts from pgqueue.lease(%s, %s, 'w', %s)",
        [queues or ["default"], n, secs],
    ).fetchall()


def listen(conn: Conn) -> None:
    """LISTEN as a worker does: enqueues NOTIFY while a session holds the
    listening locks (0016)."""
    conn.execute("listen pgqueue")
    assert one(conn, "select pgqueue.start_listening()")


def state(conn: Conn, job_id: int) -> str:
    return one(
        conn, "select state::text from pgqueue.jobs_overview where id = %s", [job_id]
    )


def test_enqueue_from_sql_with_defaults(conn: Conn) -> None:
    job_id = one(conn, """select pgqueue.enqueue('send_email', '{"a":1}'::jsonb)""")
    row = conn.execute(
        "select queue, task, args, priority, state::text, attempts, max_attempts"
        " from pgqueue.jobs where id = %s",
        [job_id],
    ).fetchone()
    assert row == ("default", "send_email", {"a": 1}, 0, "queued", 0, 25)


def test_lease_of_n_never_returns_more_than_n(conn: Conn) -> None:
    for _ in range(50):
        enqueue(conn)
    assert len(lease(conn, 7)) == 7
    assert len(lease(conn, 100)) == 43
    assert lease(conn, 5) == []


def test_priority_then_fifo_order(conn: Conn) -> None:
    low = [enqueue(conn, priority=0) for _ in range(3)]
    high = [enqueue(conn, priority=10) for _ in range(3)]
    negative = enqueue(conn, priority=-5)
    order = [row[0] for row in lease(conn, 10)]
    assert order == [*high, *low, negative]


def test_lease_skips_jobs_scheduled_later(conn: Conn) -> None:
    later = one(
        conn,
        "select pgqueue.enqueue('t', '{}', 'default', 0, now() + interval '1 hour')",
    )
    now = enqueue(conn)
    assert [r[0] for r in lease(conn, 10)] == [now]
    assert state(conn, later) == "queued"
    seconds = one(
        conn, "select extract(epoch from pgqueue.next_run_at(array['default']) - now())"
    )
    assert 3500 < seconds <= 3600


def _reading(conn: Conn, relation: str, call: Callable[[], T]) -> tuple[T, int, int]:
    """Run ``call`` in a transaction: its result, and the rows of ``relation``
    read by sequential scan and the blocks of it fetched meanwhile."""
    stats = (
        "select pg_stat_get_xact_tuples_returned(%s::regclass),"
        " pg_stat_get_xact_blocks_fetched(%s::regclass)"
    )
    with conn.transaction():
        scanned, fetched = conn.execute(stats, [relation, relation]).fetchone() or (
            0,
            0,
        )
        result = call()
        scanned2, fetched2 = conn.execute(stats, [relation, relation]).fetchone() or (
            0,
            0,
        )
    return result, scanned2 - scanned, fetched2 - fetched


def _lease_reading(conn: Conn, n: int, relation: str) -> tuple[list[int], int]:
    """Lease n from 'default': the ids, and the blocks of ``relation`` it read."""
    leased, _, fetched = _reading(
        conn, relation, lambda: [r[0] for r in lease(conn, n)]
    )
    return leased, fetched


def test_jobs_scheduled_later_at_a_higher_priority_cost_a_lease_nothing(
    conn: Conn,
) -> None:
    # 20,000 jobs waiting out a backoff at priority 5 sit in front of the due
    # jobs in the fetch index. Before 0009 a lease read past all of them
    # (~110 index pages here; 6,030 buffers at 1,000,000); now it reads a
    # few pages per priority level whatever their number.
    conn.execute(
        "insert into pgqueue.jobs (task, priority, run_at) select 't', 5,"
        " now() + interval '1 day' from generate_series(1, 20000)"
    )
    conn.execute("analyze pgqueue.jobs")
    due = [enqueue(conn, priority=p) for p in (0, 0, -3)]
    leased, read = _lease_reading(conn, 10, "pgqueue.jobs_fetch_idx")
    assert leased == due
    assert read < 30, f"lease read {read} blocks of the fetch index"


def test_lease_past_the_walks_last_level_keeps_the_order_and_stays_cheap(
    conn: Conn,
) -> None:
    # 2,000 levels hold a job for later each. lease walks the top 256 levels
    # (down to priority 1745), two index descents each, then reads the rest in
    # lease order. Walking all 2,000 read ~8,000 index blocks for this lease.
    conn.execute(
        "insert into pgqueue.jobs (task, priority, run_at) select 't', g,"
        " now() + interval '1 hour' from generate_series(1, 2000) g"
    )
    conn.execute("analyze pgqueue.jobs")
    due = [enqueue(conn, priority=p) for p in (1990, 1745, 1744, 20, 20, -5, 2000)]
    expected = [due[6], due[0], due[1], due[2], due[3], due[4], due[5]]
    leased, read = _lease_reading(conn, 10, "pgqueue.jobs_fetch_idx")
    assert leased == expected
    assert read < 3000, f"lease read {read} blocks of the fetch index"


def test_a_lease_planned_on_an_empty_table_still_walks_the_index(conn: Conn) -> None:
    # The lease's plan is made once per connection and kept (a generic plan).
    # Made while the table was empty, it must not scan the table once jobs
    # arrive: statistics lag behind, and autovacuum may be off.
    assert lease(conn, 10) == []
    conn.execute(
        "insert into pgqueue.jobs (task) select 't' from generate_series(1, 20000)"
    )
    leased, read = _lease_reading(conn, 10, "pgqueue.jobs")
    assert len(leased) == 10
    assert read < 150, f"lease read {read} heap blocks (the table has ~350)"


def test_lease_takes_levels_in_order_across_queues_past_locked_jobs(
    conn: Conn, dsn: str
) -> None:
    a_high = enqueue(conn, queue="a", priority=7)
    b_high = enqueue(conn, queue="b", priority=7)
    a_mid = [enqueue(conn, queue="a", priority=3) for _ in range(3)]
    b_mid = enqueue(conn, queue="b", priority=3)
    b_low = enqueue(conn, queue="b", priority=-1)
    enqueue(conn, queue="c", priority=9)  # not named
    one(  # scheduled later, higher than any due job
        conn, "select pgqueue.enqueue('t', '{}', 'a', 8, now() + interval '1 hour')"
    )
    with psycopg.connect(dsn) as other:
        # Another worker holds one job of the middle level mid-lease.
        other.execute(
            "select id from pgqueue.jobs where id = %s for update", [a_mid[1]]
        )
        first = [r[0] for r in lease(conn, 4, ["a", "b", "a"])]
        rest = [r[0] for r in lease(conn, 10, ["b", "a"])]
    assert first == [a_high, b_high, a_mid[0], a_mid[2]]
    assert rest == [b_mid, b_low]
    assert [r[0] for r in lease(conn, 10, ["a", "b"])] == [a_mid[1]]


@pytest.mark.parametrize("seed", range(6))
def test_lease_order_matches_a_model_over_random_queues_levels_and_schedules(
    conn: Conn, seed: int
) -> None:
    rng = random.Random(seed)
    due: dict[int, tuple[str, int, int]] = {}  # id -> (queue, priority, age)
    for age in range(rng.randint(20, 120)):
        queue = rng.choice("abc")
        priority = rng.randint(-2, 3)
        # Three in ten wait for later; the others are due, each a second older.
        seconds = rng.randint(60, 3600) if rng.random() < 0.3 else -(age + 1)
        job_id = one(
            conn,
            "select pgqueue.enqueue('t', '{}', %s, %s,"
            " now() + make_interval(secs => %s))",
            [queue, priority, seconds],
        )
        if seconds < 0:
            due[job_id] = (queue, priority, seconds)
    while True:
        queues = rng.sample("abc", rng.randint(1, 3))
        n = rng.choice([1, 2, 5, 17, 100])
        model = sorted(
            (job for job in due if due[job][0] in queues),
            key=lambda job: (-due[job][1], due[job][2], job),
        )[:n]
        assert [r[0] for r in lease(conn, n, queues)] == model
        for job in model:
            del due[job]
        if not due:
            break


def test_concurrent_leases_over_levels_take_each_due_job_exactly_once(
    conn: Conn, dsn: str
) -> None:
    conn.execute(
        "insert into pgqueue.jobs (task, queue, priority, run_at)"
        " select 't', (array['a','b','c'])[1 + g % 3], g % 7 - 3,"
        " now() + case when g % 5 = 0 then interval '1 hour' else -g * interval '1 ms' end"
        " from generate_series(1, 3000) g"
    )
    due = {
        row[0]
        for row in conn.execute(
            "select id from pgqueue.jobs where run_at <= now()"
        ).fetchall()
    }
    taken: list[list[int]] = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[int] = []
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                empty = 0
                while empty < 3:  # three empty leases in a row: all gone
                    queues = rng.sample(["a", "b", "c"], rng.randint(1, 3))
                    rows = lease(own, rng.choice([1, 7, 50]), queues)
                    mine.extend(r[0] for r in rows)
                    empty = empty + 1 if not rows and len(queues) == 3 else 0
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        taken.append(mine)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a leasing thread hung"
    assert not errors
    leased = [job for mine in taken for job in mine]
    assert len(leased) == len(set(leased)), "a job was leased twice"
    assert set(leased) == due
    assert sum(1 for mine in taken if mine) >= 2  # they did lease side by side


def test_lease_of_zero_leases_nothing_and_a_negative_limit_is_refused(
    conn: Conn,
) -> None:
    enqueue(conn)
    assert lease(conn, 0) == []
    with pytest.raises(psycopg.errors.InvalidRowCountInLimitClause):
        lease(conn, -1)


BAD_LEASE_LENGTHS = [None, 0.0, -5.0, float("nan"), float("inf"), 31622400.5]


@pytest.mark.parametrize("secs", BAD_LEASE_LENGTHS)
def test_lease_refuses_a_lease_length_reap_could_not_end(
    conn: Conn, secs: float | None
) -> None:
    """A NULL length made a job that stayed running through its worker's crash
    (reap looks for expiries in the past); a negative one, a job reaped while it
    ran. Refused (0019), and the job stays queued."""
    job_id = enqueue(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="lease length"):
        conn.execute("select * from pgqueue.lease(%s, 1, 'w', %s)", [["default"], secs])
    assert state(conn, job_id) == "queued"
    assert lease(conn, 1, secs=31622400) != []  # 366 days is the longest


@pytest.mark.parametrize("secs", BAD_LEASE_LENGTHS)
def test_heartbeat_refuses_a_lease_length_reap_could_not_end(
    conn: Conn, secs: float | None
) -> None:
    job_id = enqueue(conn)
    [(_, token, _)] = lease(conn)
    expires = "select lease_expires_at from pgqueue.jobs where id = %s"
    before = one(conn, expires, [job_id])
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="lease length"):
        conn.execute(
            "select pgqueue.heartbeat('w', %s, %s, %s)", [[job_id], [token], secs]
        )
    assert one(conn, expires, [job_id]) == before
    renewed = conn.execute(
        "select pgqueue.heartbeat('w', %s, %s, 90)", [[job_id], [token]]
    ).fetchall()
    assert renewed == [(job_id,)]


def test_lease_only_from_named_queues(conn: Conn) -> None:
    a = enqueue(conn, queue="a")
    b = enqueue(conn, queue="b", priority=5)
    enqueue(conn, queue="c")
    assert [r[0] for r in lease(conn, 10, ["a", "b"])] == [b, a]


def test_complete_is_fenced_by_lease_token(conn: Conn) -> None:
    job_id = enqueue(conn)
    [(_, token, _)] = lease(conn)
    wrong = conn.execute(
        "select pgqueue.complete(%s, %s, null)", [[job_id], [uuid.uuid4()]]
    ).fetchall()
    assert wrong == []
    assert state(conn, job_id) == "running"
    done = conn.execute(
        "select pgqueue.complete(%s, %s, %s::jsonb[])",
        [[job_id], [token], ['{"ok": 1}']],
    ).fetchall()
    assert done == [(job_id,)]
    assert conn.execute(
        "select state::text, result from pgqueue.finished_jobs where id = %s", [job_id]
    ).fetchone() == ("succeeded", {"ok": 1})
    # A second completion with the same token finds nothing.
    assert (
        conn.execute("select pgqueue.complete(%s, %s)", [[job_id], [token]]).fetchall()
        == []
    )


def test_a_queue_without_succeeded_history_only_deletes_its_jobs(
    conn: Conn,
) -> None:
    conn.execute("select pgqueue.configure_queue('fast', false)")
    fast = enqueue(conn, queue="fast", key="k")
    slow = enqueue(conn)
    leased = lease(conn, 10, ["fast", "default"])
    ids = [r[0] for r in leased]
    tokens = [r[1] for r in leased]
    # Still fenced: a wrong token completes nothing, in either kind of queue.
    wrong = conn.execute(
        "select pgqueue.complete(%s, %s)", [ids, [uuid.uuid4()] * 2]
    ).fetchall()
    assert wrong == []
    done = conn.execute(
        "select pgqueue.complete(%s, %s, %s::jsonb[])", [ids, tokens, ["1", "2"]]
    ).fetchall()
    assert sorted(done) == sorted([(fast,), (slow,)])
    assert conn.execute("select id from pgqueue.jobs").fetchall() == []
    assert conn.execute("select id from pgqueue.finished_jobs").fetchall() == [(slow,)]
    # The key was released with its job.
    again = enqueue(conn, queue="fast", key="k")
    assert again != fast
    assert (
        one(conn, "select job_id from pgqueue.idempotency_keys where key = 'k'")
        == again
    )


def test_complete_one_in_a_queue_without_succeeded_history(conn: Conn) -> None:
    conn.execute("select pgqueue.configure_queue('fast', false)")
    job_id = enqueue(conn, queue="fast", key="k")
    [(_, token, _)] = lease(conn, 1, ["fast"])
    with pytest.raises(psycopg.Error) as lost, conn.transaction():
        conn.execute("select pgqueue.complete_one(%s, %s)", [job_id, uuid.uuid4()])
    assert lost.value.sqlstate == "PQ004"
    conn.execute("select pgqueue.complete_one(%s, %s, '1')", [job_id, token])
    assert conn.execute("select id from pgqueue.jobs_overview").fetchall() == []
    assert conn.execute("select key from pgqueue.idempotency_keys").fetchall() == []


def test_a_queue_without_succeeded_history_still_records_dead_jobs(
    conn: Conn,
) -> None:
    conn.execute("select pgqueue.configure_queue('fast', false)")
    job_id = enqueue(conn, queue="fast", max_attempts=1)
    [(_, token, _)] = lease(conn, 1, ["fast"])
    err = json.dumps({"error": "ValueError: no"})
    assert one(conn, "select pgqueue.fail(%s, %s, %s, 0)", [job_id, token, err]) == (
        "dead"
    )
    assert state(conn, job_id) == "dead"


def test_configure_queue_sets_and_resets_the_option(conn: Conn) -> None:
    conn.execute("select pgqueue.configure_queue('fast', false)")
    conn.execute("select pgqueue.configure_queue('fast', true)")
    assert conn.execute(
        "select name, keep_succeeded from pgqueue.queues"
    ).fetchall() == [("fast", True)]


def test_a_paused_queue_is_not_leased_until_resumed_which_wakes_workers(
    conn: Conn,
) -> None:
    held = enqueue(conn, queue="held")
    other = enqueue(conn, queue="other")
    conn.execute("select pgqueue.pause_queue('held')")
    assert [r[0] for r in lease(conn, 10, ["held", "other"])] == [other]
    assert one(conn, "select pgqueue.next_run_at(array['held'])") is None
    assert conn.execute(
        "select queue, queued, running, paused from pgqueue.queue_depth order by 1"
    ).fetchall() == [("held", 1, 0, True), ("other", 0, 1, False)]
    conn.execute("listen pgqueue")
    assert one(conn, "select pgqueue.start_listening()")
    # Pausing tells the workers, whether or not they wait (0024): a space,
    # which no queue name holds, sets it apart from a wake-up.
    conn.execute("select pgqueue.pause_queue('held')")
    conn.execute("select pgqueue.stop_listening()")
    told = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    assert told == ["paused held"]
    assert one(conn, "select pgqueue.start_listening()")
    conn.execute("select pgqueue.resume_queue('held')")
    woken = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    assert woken == ["held"]
    assert one(conn, "select pgqueue.next_run_at(array['held'])") is not None
    assert [r[0] for r in lease(conn, 10, ["held", "other"])] == [held]


def test_pausing_twice_and_resuming_an_unknown_queue_are_harmless(conn: Conn) -> None:
    conn.execute("select pgqueue.pause_queue('q')")
    conn.execute("select pgqueue.pause_queue('q')")
    conn.execute("select pgqueue.resume_queue('never_configured')")
    assert conn.execute("select name, paused from pgqueue.queues").fetchall() == [
        ("q", True)
    ]


@pytest.mark.parametrize("call", ["pause_queue(%s)", "configure_queue(%s, false)"])
def test_queue_settings_refuse_a_name_no_job_could_have(conn: Conn, call: str) -> None:
    for bad in ["", "two words", "x" * 129]:
        with pytest.raises(psycopg.errors.CheckViolation, match="queues_name"):
            conn.execute(f"select pgqueue.{call}", [bad])
    assert conn.execute("select count(*) from pgqueue.queues").fetchone() == (0,)


def test_fenced_statements_find_running_jobs_by_primary_key(conn: Conn) -> None:
    # Statistics taken while nothing runs, as after a bulk load, and plans made
    # for any array (as plpgsql's cached plans are): a fenced statement must
    # still look its jobs up by id, not read every running row (migration 0005).
    conn.execute(
        "insert into pgqueue.jobs (task) select 't' from generate_series(1, 20000)"
    )
    conn.execute("analyze pgqueue.jobs")
    leased = lease(conn, 2000)
    ids, tokens = [r[0] for r in leased], [r[1] for r in leased]
    conn.execute("set plan_cache_mode = force_generic_plan")
    with conn.transaction():
        done = conn.execute(
            "select pgqueue.complete(%s, %s)", [ids[:500], tokens[:500]]
        ).fetchall()
        held = conn.execute(
            "select pgqueue.heartbeat('w', %s, %s, 60)", [ids[500:], tokens[500:]]
        ).fetchall()
        back = conn.execute(
            "select pgqueue.hand_back(%s, %s)", [ids[500:1000], tokens[500:1000]]
        ).fetchall()
        state = one(
            conn,
            "select pgqueue.fail(%s, %s, '{}', 0)::text",
            [ids[1000], tokens[1000]],
        )
        failed = conn.execute(
            "select * from pgqueue.fail_many(%s, %s, %s::jsonb[], %s)",
            [ids[1001:1101], tokens[1001:1101], ["{}"] * 100, [0.0] * 100],
        ).fetchall()
        scans = conn.execute(
            "select pg_stat_get_xact_numscans('pgqueue.jobs_lease_expiry_idx'::regclass),"
            " pg_stat_get_xact_numscans('pgqueue.jobs_pkey'::regclass)"
        ).fetchone()
    assert (len(done), len(held), len(back), state) == (500, 1500, 500, "queued")
    assert len(failed) == 100
    assert scans is not None
    expiry_scans, pkey_scans = scans
    assert expiry_scans == 0 and pkey_scans > 0


def test_fail_retries_with_delay_then_dead_with_history(conn: Conn) -> None:
    job_id = enqueue(conn, max_attempts=2)
    [(_, token, _)] = lease(conn)
    err = json.dumps({"error": "ValueError: first"})
    assert (
        one(conn, "select pgqueue.fail(%s, %s, %s, 0)", [job_id, token, err])
        == "queued"
    )
    [(_, token2, attempts)] = lease(conn)
    assert attempts == 1 and token2 != token
    err = json.dumps({"error": "ValueError: second"})
    assert (
        one(conn, "select pgqueue.fail(%s, %s, %s, 0)", [job_id, token2, err]) == "dead"
    )
    row = conn.execute(
        "select attempts, last_error, jsonb_array_length(errors) from pgqueue.dead_jobs"
        " where id = %s",
        [job_id],
    ).fetchone()
    assert row == (2, "ValueError: second", 2)


def test_fail_with_old_token_changes_nothing(conn: Conn) -> None:
    job_id = enqueue(conn)
    lease(conn)
    assert (
        one(conn, "select pgqueue.fail(%s, %s, '{}', 0)", [job_id, uuid.uuid4()])
        is None
    )
    assert state(conn, job_id) == "running"


def test_fail_delay_sets_run_at(conn: Conn) -> None:
    job_id = enqueue(conn)
    [(_, token, _)] = lease(conn)
    conn.execute("select pgqueue.fail(%s, %s, '{}', 120)", [job_id, token])
    wait = one(
        conn,
        "select extract(epoch from run_at - now()) from pgqueue.jobs where id = %s",
        [job_id],
    )
    assert 119 < wait <= 120
    assert lease(conn) == []


def test_fail_many_requeues_or_buries_each_job_and_skips_lost_leases(
    conn: Conn,
) -> None:
    retried = enqueue(conn, max_attempts=2)
    buried = enqueue(conn, max_attempts=1)
    lost = enqueue(conn)
    tokens = {job_id: token for job_id, token, _ in lease(conn, 3)}
    errors = [json.dumps({"error": f"ValueError: {n}"}) for n in ("x", "a", "b", "a")]
    rows = conn.execute(
        "select id, state::text from pgqueue.fail_many(%s, %s, %s::jsonb[], %s)",
        [
            [lost, retried, buried, retried],  # a wrong token, and a repeated id
            [uuid.uuid4(), tokens[retried], tokens[buried], tokens[retried]],
            errors,
            [0.0, 120.0, 0.0, 120.0],
        ],
    ).fetchall()
    assert sorted(rows) == [(retried, "queued"), (buried, "dead")]
    again = conn.execute(
        "select attempts, extract(epoch from run_at - now()) between 119 and 120,"
        " errors -> 0 ->> 'error', errors -> 0 ->> 'attempt', errors -> 0 ->> 'worker'"
        " from pgqueue.jobs where id = %s",
        [retried],
    ).fetchone()
    assert again == (1, True, "ValueError: a", "1", "w")
    dead = conn.execute(
        "select attempts, last_error from pgqueue.dead_jobs where id = %s", [buried]
    ).fetchone()
    assert dead == (1, "ValueError: b")
    assert state(conn, lost) == "running"


@pytest.mark.parametrize("stale_first", [True, False])
def test_fail_many_finds_the_current_token_among_two_for_one_job(
    conn: Conn, stale_first: bool
) -> None:
    """A worker may hold two failures of one job: one from before the job was
    reaped and leased again (its token stale), one current."""
    job_id = enqueue(conn)
    [(_, token, _)] = lease(conn)
    pairs = [(uuid.uuid4(), '{"error": "stale"}'), (token, '{"error": "current"}')]
    if not stale_first:
        pairs.reverse()
    rows = conn.execute(
        "select id, token, state::text from pgqueue.fail_many(%s, %s, %s::jsonb[], %s)",
        [[job_id, job_id], [t for t, _ in pairs], [e for _, e in pairs], [0.0, 0.0]],
    ).fetchall()
    assert rows == [(job_id, token, "queued")]
    assert (
        one(
            conn,
            "select errors -> 0 ->> 'error' from pgqueue.jobs where id = %s",
            [job_id],
        )
        == "current"
    )


def test_fail_many_refuses_arrays_of_different_lengths(conn: Conn) -> None:
    job_id = enqueue(conn)
    [(_, token, _)] = lease(conn)
    with pytest.raises(psycopg.Error, match="3 elements") as refused:
        conn.execute(
            "select * from pgqueue.fail_many(%s, %s, %s::jsonb[], %s)",
            [[job_id, 1, 2], [token], ["{}"], [0.0]],
        )
    assert refused.value.sqlstate == "PQ001"
    assert state(conn, job_id) == "running"


def test_reap_counts_an_attempt_and_ends_dead(conn: Conn) -> None:
    job_id = enqueue(conn, max_attempts=2)
    lease(conn, secs=0.001)
    conn.execute("select pg_sleep(0.01)")
    assert conn.execute("select id, state::text from pgqueue.reap()").fetchall() == [
        (job_id, "queued")
    ]
    conn.execute("update pgqueue.jobs set run_at = now() where id = %s", [job_id])
    lease(conn, secs=0.001)
    conn.execute("select pg_sleep(0.01)")
    assert conn.execute("select id, state::text from pgqueue.reap()").fetchall() == [
        (job_id, "dead")
    ]
    errors = one(
        conn, "select errors from pgqueue.finished_jobs where id = %s", [job_id]
    )
    assert [e["kind"] for e in errors] == ["lease_expired", "lease_expired"]


def test_reap_wakes_the_queues_it_requeued_into_without_reading_them(
    conn: Conn, dsn: str
) -> None:
    # 20,000 due jobs in another queue. Before 0011 reap scanned them all to
    # notify every queue with a due job (seq scan rows: 20,002), and woke
    # "busy" but not "crashed", where the reaped job waits out its backoff.
    conn.execute(
        "insert into pgqueue.jobs (task, queue) select 't', 'busy'"
        " from generate_series(1, 20000)"
    )
    doomed = enqueue(conn, queue="crashed", max_attempts=1)
    requeued = enqueue(conn, queue="crashed")
    conn.execute("analyze pgqueue.jobs")
    lease(conn, 2, ["crashed"], secs=0.001)
    conn.execute("select pg_sleep(0.01)")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen(listener)
        reaped, scanned, _ = _reading(
            conn,
            "pgqueue.jobs",
            lambda: conn.execute(
                "select id, state::text from pgqueue.reap()"
            ).fetchall(),
        )
        assert sorted(reaped) == [(doomed, "dead"), (requeued, "queued")]
        assert scanned == 0
        assert [n.payload for n in listener.notifies(timeout=0.5)] == ["crashed"]


def test_reap_leaves_live_leases_alone(conn: Conn) -> None:
    job_id = enqueue(conn)
    lease(conn, secs=60)
    assert conn.execute("select * from pgqueue.reap()").fetchall() == []
    assert state(conn, job_id) == "running"


def test_heartbeat_extends_only_held_leases(conn: Conn) -> None:
    a, b = enqueue(conn), enqueue(conn)
    leased = {row[0]: row[1] for row in lease(conn, 2, secs=1)}
    held = conn.execute(
        "select pgqueue.heartbeat('w', %s, %s, 600)",
        [[a, b], [leased[a], uuid.uuid4()]],
    ).fetchall()
    assert held == [(a,)]
    left = one(
        conn,
        "select extract(epoch from lease_expires_at - now()) from pgqueue.jobs where id = %s",
        [a],
    )
    assert left > 500


def test_hand_back_does_not_count_an_attempt(conn: Conn) -> None:
    job_id = enqueue(conn)
    [(_, token, _)] = lease(conn)
    assert conn.execute(
        "select pgqueue.hand_back(%s, %s)", [[job_id], [token]]
    ).fetchall() == [(job_id,)]
    [(again, _, attempts)] = lease(conn)
    assert again == job_id and attempts == 0


def test_hand_back_skips_a_row_a_completion_holds(conn: Conn, dsn: str) -> None:
    """A completion not yet committed (a transaction batch's) holds its row:
    hand_back returns the other jobs at once instead of waiting for it."""
    held, free = enqueue(conn), enqueue(conn)
    tokens = dict((job_id, token) for job_id, token, _ in lease(conn, 2))
    with psycopg.connect(dsn) as batch:
        batch.execute(
            "select pgqueue.complete_one(%s, %s, null::jsonb)", [held, tokens[held]]
        )
        conn.execute("set lock_timeout = '5s'")  # the old wait fails the test
        back = conn.execute(
            "select pgqueue.hand_back(%s, %s)",
            [[held, free], [tokens[held], tokens[free]]],
        ).fetchall()
        assert back == [(free,)]
        batch.commit()
    assert state(conn, held) == "succeeded"


def test_cancel_queued_and_refuse_running_or_unknown(conn: Conn) -> None:
    queued, running = enqueue(conn), enqueue(conn)
    conn.execute(
        "update pgqueue.jobs set run_at = now() + interval '1 day' where id = %s",
        [queued],
    )
    lease(conn)
    assert one(conn, "select pgqueue.cancel(%s)", [queued]) == "cancelled"
    with pytest.raises(psycopg.Error) as info:
        conn.execute("select pgqueue.cancel(%s)", [running])
    assert info.value.sqlstate == "PQ003"
    with pytest.raises(psycopg.Error) as info:
        conn.execute("select pgqueue.cancel(424242)")
    assert info.value.sqlstate == "PQ002"


def test_retry_dead_job_resets_attempts_and_keeps_errors(conn: Conn) -> None:
    job_id = enqueue(conn, max_attempts=1)
    [(_, token, _)] = lease(conn)
    conn.execute(
        """select pgqueue.fail(%s, %s, '{"error": "boom"}', 0)""", [job_id, token]
    )
    assert state(conn, job_id) == "dead"
    assert one(conn, "select pgqueue.retry(%s)", [job_id]) == "queued"
    row = conn.execute(
        "select attempts, jsonb_array_length(errors) from pgqueue.jobs where id = %s",
        [job_id],
    ).fetchone()
    assert row == (0, 1)
    with pytest.raises(psycopg.Error) as info:
        conn.execute("select pgqueue.retry(%s)", [job_id])
    assert info.value.sqlstate == "PQ003"


def test_retry_dead_requeues_a_whole_queue(conn: Conn) -> None:
    ids = [enqueue(conn, queue="q", max_attempts=1) for _ in range(3)]
    for job_id, token, _ in lease(conn, 3, ["q"]):
        conn.execute("select pgqueue.fail(%s, %s, '{}', 0)", [job_id, token])
    assert one(conn, "select pgqueue.retry_dead('q')") == 3
    assert sorted(r[0] for r in lease(conn, 10, ["q"])) == sorted(ids)


def test_idempotency_key_returns_existing_job_even_after_it_finished(
    conn: Conn,
) -> None:
    first = enqueue(conn, key="order-1")
    assert enqueue(conn, key="order-1") == first
    assert enqueue(conn, key="order-1", queue="other") != first
    [(_, token, _)] = lease(conn)
    conn.execute("select pgqueue.complete(%s, %s)", [[first], [token]])
    assert enqueue(conn, key="order-1") == first
    assert (
        one(
            conn,
            "select count(*) from pgqueue.jobs_overview where idempotency_key = 'order-1'",
        )
        == 2
    )


def test_prune_forgets_old_finished_jobs_and_their_keys(conn: Conn) -> None:
    job_id = enqueue(conn, key="k")
    [(_, token, _)] = lease(conn)
    conn.execute("select pgqueue.complete(%s, %s)", [[job_id], [token]])
    assert one(conn, "select pgqueue.prune(interval '1 hour')") == 0
    conn.execute(
        "update pgqueue.finished_jobs set finished_at = now() - interval '2 hours'"
    )
    assert one(conn, "select pgqueue.prune(interval '1 hour')") == 1
    assert enqueue(conn, key="k") != job_id


def _finished(conn: Conn, ids: range, age: str, key_every: int = 0) -> None:
    """Finished jobs with these ids that finished ``age`` ago; every
    ``key_every``-th has an idempotency key."""
    conn.execute(
        "insert into pgqueue.finished_jobs (id, queue, task, args, priority, state,"
        " attempts, max_attempts, created_at, finished_at, idempotency_key)"
        " select g, 'default', 't', '{}', 0, 'succeeded', 0, 25, now() - %s::interval,"
        " now() - %s::interval,"
        " case when %s > 0 and g %% %s = 0 then 'k' || g end"
        " from generate_series(%s::bigint, %s::bigint) g",
        [age, age, key_every, max(key_every, 1), ids.start, ids.stop - 1],
    )
    conn.execute(
        "insert into pgqueue.idempotency_keys (queue, key, job_id)"
        " select queue, idempotency_key, id from pgqueue.finished_jobs"
        " where idempotency_key is not null and id between %s and %s",
        [ids.start, ids.stop - 1],
    )


def _ids(conn: Conn, query: str) -> set[int]:
    return {row[0] for row in conn.execute(query).fetchall()}


def test_prune_reads_only_what_it_deletes(conn: Conn) -> None:
    # The young jobs lie first in the heap, the old ones after them, as they do
    # once pruned pages are reused. Before 0010 each batch read all of
    # finished_jobs with a sequential scan (33,000 rows here for a batch of
    # 1,000); a walk of the primary key, tried first, read every young job on
    # the call that found nothing left (30,000 heap fetches).
    _finished(conn, range(100_001, 130_001), "1 hour", key_every=7)
    _finished(conn, range(1, 3_001), "10 days", key_every=7)
    conn.execute("analyze pgqueue.finished_jobs")

    def prune_reading(n: int) -> tuple[int, int, int]:
        """Prune n: the count, rows read by sequential scan, heap fetches."""
        return _reading(
            conn,
            "pgqueue.finished_jobs",
            lambda: int(one(conn, "select pgqueue.prune(interval '7 days', %s)", [n])),
        )

    count, scanned, _ = prune_reading(1000)
    assert count == 1000
    assert scanned < 2000, f"a prune of 1,000 read {scanned} rows by sequential scan"
    while prune_reading(1000)[0]:
        pass
    # Past five calls plpgsql may keep a generic plan: it must still stop at the
    # cut-off rather than walk the jobs it keeps.
    for _ in range(8):
        count, scanned, fetched = prune_reading(1000)
        assert (count, scanned) == (0, 0)
        # 38 here: the planner looks past the index entries of the rows just
        # deleted (not vacuumed yet) for the column's true minimum.
        assert fetched < 200, f"a prune that found nothing fetched {fetched} blocks"
    assert _ids(conn, "select id from pgqueue.finished_jobs") == set(
        range(100_001, 130_001)
    )
    assert _ids(conn, "select job_id from pgqueue.idempotency_keys") == {
        i for i in range(100_001, 130_001) if i % 7 == 0
    }


def test_prune_takes_the_oldest_first(conn: Conn) -> None:
    _finished(conn, range(1, 11), "9 days")
    _finished(conn, range(11, 21), "20 days")  # larger ids, finished earlier
    assert one(conn, "select pgqueue.prune(interval '7 days', 10)") == 10
    assert _ids(conn, "select id from pgqueue.finished_jobs") == set(range(1, 11))


def test_the_workers_prune_one_at_a_time(conn: Conn, dsn: str) -> None:
    _finished(conn, range(1, 101), "10 days")
    prune = _sql.statements("pgqueue").prune_alone
    key = _sql.prune_lock_name("pgqueue")
    with psycopg.connect(dsn) as other:  # a worker mid-batch holds the lock
        other.execute("select pg_advisory_xact_lock(1885827445, hashtext(%s))", [key])
        assert one(conn, prune, [key, 86400, 50]) is None
        assert one(conn, "select count(*) from pgqueue.finished_jobs") == 100
    assert one(conn, prune, [key, 86400, 50]) == 50


def test_concurrent_prunes_delete_different_jobs(conn: Conn, dsn: str) -> None:
    _finished(conn, range(1, 501), "10 days", key_every=3)
    with psycopg.connect(dsn) as other:  # holds its batch, uncommitted
        assert one(other, "select pgqueue.prune(interval '1 day', 100)") == 100
        held = set(range(1, 501)) - _ids(other, "select id from pgqueue.finished_jobs")
        assert one(conn, "select pgqueue.prune(interval '1 day', 1000)") == 400
        assert _ids(conn, "select id from pgqueue.finished_jobs") == held
        other.rollback()  # its batch is there again, and the next prune takes it
    assert one(conn, "select pgqueue.prune(interval '1 day', 1000)") == 100
    assert one(conn, "select count(*) from pgqueue.idempotency_keys") == 0


def test_prune_refuses_a_negative_limit(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidRowCountInLimitClause):
        one(conn, "select pgqueue.prune(interval '1 day', -1)")


@pytest.mark.parametrize(
    "call",
    [
        "pgqueue.prune(interval '-1 hour')",  # deleted every finished job
        "pgqueue.prune(null)",  # deleted nothing, silently
        "pgqueue.prune(interval '1 s', 10, null)",
    ],
)
def test_prune_refuses_an_age_that_is_negative_or_missing(
    conn: Conn, call: str
) -> None:
    job = enqueue(conn)
    (job_id, token, _), *_ = lease(conn)
    conn.execute("select pgqueue.complete(array[%s], array[%s])", [job_id, token])
    conn.commit()
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        one(conn, f"select {call}")
    conn.rollback()
    assert state(conn, job) == "succeeded"


def test_enqueue_many_in_order_with_keys(conn: Conn) -> None:
    rows = conn.execute(
        "select id, created from pgqueue.enqueue_many(%s, %s::jsonb[], null, null, null, null, %s)",
        [["a", "b", "c", "d"], ["{}", '{"x":1}', "{}", "{}"], ["k", None, "k", None]],
    ).fetchall()
    assert [r[1] for r in rows] == [True, True, False, True]
    assert rows[2][0] == rows[0][0]
    assert one(conn, "select count(*) from pgqueue.jobs") == 3


def test_enqueue_many_rejects_arrays_of_different_lengths(conn: Conn) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(
            "select * from pgqueue.enqueue_many(array['a','b'], array['{}']::jsonb[])"
        )
    assert info.value.sqlstate == "PQ001"


# enqueue and enqueue_many check their input themselves (0012) and raise as the
# table's CHECK constraints did: check_violation under the constraint's name.
BAD_INPUT = [
    ("queue", "bad queue", "jobs_queue_name"),
    ("queue", "", "jobs_queue_name"),
    ("queue", ".starts-with-dot", "jobs_queue_name"),
    ("queue", "q" * 129, "jobs_queue_name"),
    ("task", "1starts-with-digit", "jobs_task_name"),
    ("task", "x" * 201, "jobs_task_name"),
    ("max_attempts", 0, "jobs_attempts"),
    ("max_attempts", 1001, "jobs_attempts"),
    ("key", "", "jobs_idempotency_key"),
]


@pytest.mark.parametrize(("column", "value", "constraint"), BAD_INPUT)
def test_enqueue_checks_sql_callers_input(
    conn: Conn, column: str, value: Any, constraint: str
) -> None:
    args = {"task": "t", "queue": "default", "max_attempts": 25, "key": None}
    args[column] = value
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        conn.execute(
            "select pgqueue.enqueue(%(task)s, '{}', %(queue)s, 0, null,"
            " %(max_attempts)s, %(key)s)",
            args,
        )
    assert info.value.diag.constraint_name == constraint
    if column in ("queue", "task"):
        assert repr(value)[1:-1][:20] in (info.value.diag.message_primary or "")


@pytest.mark.parametrize(("column", "value", "constraint"), BAD_INPUT)
def test_enqueue_many_checks_every_job_and_inserts_none(
    conn: Conn, column: str, value: Any, constraint: str
) -> None:
    rows = [
        {"task": "t", "queue": "default", "max_attempts": 25, "key": f"k{i}"}
        for i in range(3)
    ]
    rows[2][column] = value  # only the last job is bad
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        conn.execute(
            "select * from pgqueue.enqueue_many(%s, array_fill('{}'::jsonb,"
            " array[3]), %s, null, null, %s, %s)",
            [[r[c] for r in rows] for c in ("task", "queue", "max_attempts", "key")],
        )
    assert info.value.diag.constraint_name == constraint


def test_enqueue_reports_the_rule_the_table_reported_first(conn: Conn) -> None:
    """Several faults at once: the error 0011's table and checks gave (PQ001
    first, then the constraints by name), from both functions."""
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        conn.execute("select pgqueue.enqueue('1bad', '{}', 'bad queue', 0, null, 0)")
    assert info.value.diag.constraint_name == "jobs_attempts"
    with pytest.raises(psycopg.Error) as error:
        conn.execute(
            "select pgqueue.enqueue('t', '{}', 'bad queue', 0, null, 25, %s)",
            ["k" * 256],
        )
    assert error.value.sqlstate == "PQ001"
    with pytest.raises(psycopg.Error) as error:  # the priority of a later job
        conn.execute(
            "select * from pgqueue.enqueue_many(array['t', 't'],"
            " array_fill('{}'::jsonb, array[2]), array['bad queue', 'q'],"
            " array[0, 40000])"
        )
    assert error.value.sqlstate == "PQ001"


def test_enqueue_takes_names_under_any_collation(conn: Conn) -> None:
    """An argument with a nondeterministic collation (the caller's column) is
    checked like any other: PostgreSQL refuses regular expressions under it."""
    try:
        conn.execute(
            "create collation ci (provider = icu, locale = 'und-u-ks-level2',"
            " deterministic = false)"
        )
    except psycopg.errors.FeatureNotSupported:
        pytest.skip("this PostgreSQL is built without ICU (the embedded one is)")
    conn.execute("create table origin (region text collate ci)")
    conn.execute("insert into origin values ('emails')")
    conn.execute("select pgqueue.enqueue('t', '{}', region) from origin")
    conn.execute(
        "select pgqueue.enqueue_many(array['t'], array['{}'::jsonb],"
        " array[region]) from origin"
    )
    assert one(conn, "select count(*) from pgqueue.jobs where queue = 'emails'") == 2
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("select pgqueue.enqueue('t', '{}', region || ' x') from origin")


def test_enqueue_with_a_key_notifies_once_and_an_existing_key_not(
    conn: Conn, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen(listener)
        first = enqueue(conn, key="k")
        assert [n.payload for n in listener.notifies(timeout=0.5, stop_after=1)] == [
            "default"
        ]
        assert enqueue(conn, key="k") == first
        assert list(listener.notifies(timeout=0.3)) == []


def test_enqueue_many_takes_null_queue_and_attempts_as_defaults(conn: Conn) -> None:
    conn.execute(
        "select * from pgqueue.enqueue_many(array['t', 't'],"
        " array_fill('{}'::jsonb, array[2]), array[null, 'q1'], null, null,"
        " array[null, 3]::int[])"
    )
    rows = conn.execute(
        "select queue, max_attempts from pgqueue.jobs order by id"
    ).fetchall()
    assert rows == [("default", 25), ("q1", 3)]


def test_notify_once_per_statement_and_only_on_commit(conn: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen(listener)
        with conn.transaction(force_rollback=True):
            enqueue(conn)
        assert list(listener.notifies(timeout=0.2)) == []
        with conn.transaction():
            conn.execute(
                "select * from pgqueue.enqueue_many(array_fill('t'::text, array[100]),"
                " array_fill('{}'::jsonb, array[100]))"
            )
            enqueue(conn, queue="other")
        notes = sorted(n.payload for n in listener.notifies(timeout=0.5))
        assert notes == ["default", "other"]


def test_a_quiet_queue_enqueues_without_notify(conn: Conn, dsn: str) -> None:
    """set_queue_notify(q, false): no enqueue path NOTIFYs for q (one, many, the
    COPY path's _notify, a key); other queues still do, resuming q does, and
    true undoes it."""
    conn.execute("select pgqueue.set_queue_notify('quiet', false)")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen(listener)
        enqueue(conn, queue="quiet")
        enqueue(conn, queue="quiet", key="k")
        conn.execute(
            "select * from pgqueue.enqueue_many(array['t', 't'],"
            " array['{}', '{}']::jsonb[], array['quiet', 'loud'])"
        )
        conn.execute("select pgqueue._notify(array['quiet', 'loud', null])")
        notes = sorted(n.payload for n in listener.notifies(timeout=0.5))
        assert notes == ["default", "loud", "loud"]
        # An operator's resume wakes the workers of a quiet queue too.
        conn.execute("select pgqueue.resume_queue('quiet')")
        assert [n.payload for n in listener.notifies(timeout=0.5)] == ["quiet"]
        conn.execute("select pgqueue.set_queue_notify('quiet', true)")
        enqueue(conn, queue="quiet")
        assert [n.payload for n in listener.notifies(timeout=0.5)] == ["quiet"]
    assert one(conn, "select count(*) from pgqueue.jobs where queue = 'quiet'") == 4


def test_views_report_depth_running_and_dead(conn: Conn) -> None:
    enqueue(conn)
    enqueue(conn)
    one(
        conn,
        "select pgqueue.enqueue('t', '{}', 'default', 0, now() + interval '1 hour')",
    )
    dead = enqueue(conn, max_attempts=1, priority=9)
    [(_, token, _)] = lease(conn)
    conn.execute("select pgqueue.fail(%s, %s, '{}', 0)", [dead, token])
    lease(conn)
    row = conn.execute(
        "select queued, scheduled, running, succeeded, dead from pgqueue.queue_depth where queue = 'default'"
    ).fetchone()
    assert row == (1, 1, 1, 0, 1)
    assert one(conn, "select count(*) from pgqueue.running_jobs") == 1


def _listening_locks(conn: Conn, pid: int) -> int:
    return one(
        conn,
        "select count(*) from pg_locks where locktype = 'advisory'"
        " and classid = 1885827446 and objsubid = 2 and pid = %s and granted",
        [pid],
    )


def test_enqueues_notify_only_while_a_session_holds_the_listening_locks(
    conn: Conn, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("listen pgqueue")
        enqueue(conn)
        conn.execute("select pgqueue._notify(array['default'])")
        assert list(listener.notifies(timeout=0.3)) == []
        assert one(listener, "select pgqueue.start_listening()")
        assert _listening_locks(conn, listener.info.backend_pid) == 16
        enqueue(conn, key="k")
        conn.execute("select pgqueue._notify(array['bulk'])")
        assert [n.payload for n in listener.notifies(timeout=0.5)] == [
            "default",
            "bulk",
        ]
        listener.execute("select pgqueue.stop_listening()")
        assert _listening_locks(conn, listener.info.backend_pid) == 0
        enqueue(conn)
        assert list(listener.notifies(timeout=0.3)) == []
    assert one(conn, "select count(*) from pgqueue.jobs") == 3


def test_start_listening_waits_for_an_enqueue_that_sent_no_notify(
    conn: Conn, dsn: str
) -> None:
    """An enqueue with nobody listening holds its stripe until its transaction
    ends: start_listening gives up, holding nothing, while it is open, and
    succeeds once it has committed, when the job is there to lease."""
    with (
        psycopg.connect(dsn) as producer,
        psycopg.connect(dsn, autocommit=True) as worker,
    ):
        job = enqueue(producer)  # the transaction stays open
        assert one(worker, "select pgqueue.start_listening(50)") is False
        assert _listening_locks(conn, worker.info.backend_pid) == 0
        assert one(worker, "show lock_timeout") == "0"  # restored
        result: list[bool] = []
        waiting = threading.Thread(
            target=lambda: result.append(
                one(worker, "select pgqueue.start_listening(10000)")
            )
        )
        waiting.start()
        wait_until(
            lambda: one(
                conn,
                "select count(*) from pg_locks where pid = %s and not granted",
                [worker.info.backend_pid],
            ),
            timeout=5,
        )
        assert waiting.is_alive()
        producer.commit()
        waiting.join(10)
        assert result == [True]
        assert [r[0] for r in lease(worker)] == [job]


def test_start_listening_cancelled_part_way_holds_no_lock(conn: Conn, dsn: str) -> None:
    """A statement_timeout (or a cancel) while start_listening waits on a stripe
    lets go of the stripes it took: the caller, told it failed, holds nothing."""
    producers: list[Conn] = []
    try:
        while True:  # a producer whose stripe is not among the first four
            producer = psycopg.connect(dsn)
            producers.append(producer)
            if producer.info.backend_pid % 16 >= 4:
                break
        enqueue(producer)  # its transaction stays open: no NOTIFY, stripe held
        with psycopg.connect(dsn, autocommit=True) as worker:
            worker.execute("set statement_timeout = '50ms'")
            with pytest.raises(psycopg.errors.QueryCanceled):
                worker.execute("select pgqueue.start_listening(10000)")
            assert _listening_locks(conn, worker.info.backend_pid) == 0
            producer.commit()
            worker.execute("reset statement_timeout")
            assert one(worker, "select pgqueue.start_listening()")
            worker.execute("select pgqueue.stop_listening()")
            assert _listening_locks(conn, worker.info.backend_pid) == 0
    finally:
        for producer in producers:
            producer.close()


def test_notify_of_quiet_queues_only_takes_no_listening_lock(conn: Conn) -> None:
    conn.execute("select pgqueue.set_queue_notify('quiet', false)")
    with conn.transaction():
        conn.execute("select pgqueue._notify(array['quiet'])")
        assert (
            one(
                conn,
                "select count(*) from pg_locks where locktype = 'advisory'"
                " and classid = 1885827446 and pid = pg_backend_pid()",
            )
            == 0
        )


def test_enqueue_many_claims_a_key_again_whose_job_left_meanwhile(conn: Conn) -> None:
    first = one(conn, "select pgqueue.enqueue('a', '{}', 'default', 0, null, 25, 'k')")
    # The key's job leaves between enqueue_many's two statements (a prune, or a
    # success in a queue that keeps none): here a trigger on the first
    # statement's insert deletes it, as a concurrent prune that committed then.
    conn.execute(
        "create function pg_temp.gone() returns trigger language plpgsql as $$"
        " begin if current_setting('test.gone', true) is distinct from 'yes' then"
        " perform set_config('test.gone', 'yes', false);"  # once only
        " delete from pgqueue.idempotency_keys where key = 'k';"
        " delete from pgqueue.jobs where idempotency_key = 'k'; end if;"
        " return null; end $$"
    )
    conn.execute(
        "create trigger gone after insert on pgqueue.jobs"
        " for each statement execute function pg_temp.gone()"
    )
    try:
        rows = conn.execute(
            "select ord, id, created from pgqueue.enqueue_many("
            "%s, %s::jsonb[], null, null, null, null, %s)",
            [["b", "c"], ["{}", "{}"], [None, "k"]],
        ).fetchall()
    finally:
        conn.execute("drop trigger gone on pgqueue.jobs")
    assert [(r[0], r[2]) for r in rows] == [(1, True), (2, True)]
    made = rows[1][1]
    assert made is not None and made != first
    assert conn.execute(
        "select task, idempotency_key from pgqueue.jobs where id = %s", [made]
    ).fetchone() == ("c", "k")


def test_complete_waiting_gives_up_on_a_locked_row_and_completes_the_rest(
    conn: Conn, dsn: str
) -> None:
    """The worker's batched completion (0020) waits lock_wait_ms for a row
    lock, then fails whole with 55P03, leaving every job as it was; without
    the lock it completes them all."""
    first, second = enqueue(conn), enqueue(conn)
    leased = {job_id: token for job_id, token, _ in lease(conn, 2)}
    ids, tokens = [first, second], [leased[first], leased[second]]
    with psycopg.connect(dsn) as locker:
        locker.execute("select 1 from pgqueue.jobs where id = %s for update", [second])
        with pytest.raises(psycopg.errors.LockNotAvailable):
            conn.execute(
                "select pgqueue.complete_waiting(%s, %s, null, 100)", [ids, tokens]
            )
        assert (state(conn, first), state(conn, second)) == ("running", "running")
    done = conn.execute(
        "select pgqueue.complete_waiting(%s, %s, null, 100)", [ids, tokens]
    ).fetchall()
    assert sorted(r[0] for r in done) == sorted(ids)
    # The lock wait was the statement's own: this session's setting is as before.
    assert one(conn, "show lock_timeout") == "0"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="lock wait"):
        conn.execute("select pgqueue.complete_waiting(%s, %s, null, 0)", [ids, tokens])


def test_a_worker_id_registered_again_describes_the_last_process(conn: Conn) -> None:
    """A worker id registered again by another process (a fixed id reused
    while the last process was in its grace) records the new process and its
    start; the same process registering again (at every reap) keeps its start.
    The first process's hostname, pid and queues stayed before 0021."""
    row = "select hostname, pid, queues, started_at, last_seen from pgqueue.workers"
    conn.execute("select pgqueue.register_worker('pod-0', 'host-a', 111, '{q}')")
    conn.execute("update pgqueue.workers set started_at = now() - interval '1 h'")
    first = conn.execute(row).fetchone()
    assert first is not None
    conn.commit()
    conn.execute("select pgqueue.register_worker('pod-0', 'host-a', 111, '{q}')")
    again = conn.execute(row).fetchone()
    assert again is not None
    assert again[:4] == first[:4] and again[4] > first[4]
    conn.execute("select pgqueue.register_worker('pod-0', 'host-b', 222, '{q,r}')")
    newer = conn.execute(row).fetchone()
    assert newer is not None
    assert newer[:3] == ("host-b", 222, ["q", "r"])
    assert newer[3] > first[3]
    assert one(conn, "select count(*) from pgqueue.workers") == 1
