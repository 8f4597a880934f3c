"""A hypothesis state machine drives the stored functions in random orders and
compares every job with a simple model of the life cycle (DESIGN.md §2)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)


@dataclass
class Model:
    state: str
    attempts: int
    max_attempts: int
    token: uuid.UUID | None = None
    old_tokens: tuple[uuid.UUID, ...] = ()
    due: bool = True  # reap backs off (run_at in the future); fail here uses delay 0


class JobLifeCycle(RuleBasedStateMachine):
    conn: psycopg.Connection[Any]

    def __init__(self) -> None:
        super().__init__()
        self.conn.execute(
            "truncate pgqueue.jobs, pgqueue.finished_jobs, pgqueue.idempotency_keys"
        )
        self.jobs: dict[int, Model] = {}

    def ids(self, *states: str) -> list[int]:
        return sorted(i for i, m in self.jobs.items() if m.state in states)

    @rule(max_attempts=st.integers(1, 3), priority=st.integers(-2, 2))
    def enqueue(self, max_attempts: int, priority: int) -> None:
        row = self.conn.execute(
            "select pgqueue.enqueue('t', '{}', 'default', %s, null, %s)",
            [priority, max_attempts],
        ).fetchone()
        assert row is not None
        self.jobs[row[0]] = Model("queued", 0, max_attempts)

    @rule(n=st.integers(1, 4))
    def lease(self, n: int) -> None:
        rows = self.conn.execute(
            "select id, lease_token, attempts from pgqueue.lease(array['default'], %s, 'w', 60)",
            [n],
        ).fetchall()
        due = [i for i in self.ids("queued") if self.jobs[i].due]
        assert len(rows) == min(n, len(due))
        for job_id, token, attempts in rows:
            model = self.jobs[job_id]
            assert model.state == "queued" and attempts == model.attempts
            model.state, model.token = "running", token

    @precondition(lambda self: self.ids("running"))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids("running")))
        model = self.jobs[job_id]
        done = self.conn.execute(
            "select pgqueue.complete(%s, %s)", [[job_id], [model.token]]
        ).fetchall()
        assert done == [(job_id,)]
        model.state, model.old_tokens, model.token = (
            "succeeded",
            (*model.old_tokens, model.token),
            None,
        )  # type: ignore[arg-type]

    @precondition(lambda self: any(m.old_tokens for m in self.jobs.values()))
    @rule(data=st.data())
    def complete_with_a_stale_token(self, data: st.DataObject) -> None:
        job_id = data.draw(
            st.sampled_from(sorted(i for i, m in self.jobs.items() if m.old_tokens))
        )
        token = data.draw(st.sampled_from(self.jobs[job_id].old_tokens))
        if token == self.jobs[job_id].token:
            return
        done = self.conn.execute(
            "select pgqueue.complete(%s, %s)", [[job_id], [token]]
        ).fetchall()
        assert done == []  # fenced: nothing changes (checked by the invariant)

    def _failed(self, model: Model) -> None:
        model.attempts += 1
        model.old_tokens = (*model.old_tokens, model.token)  # type: ignore[assignment]
        model.token = None
        model.state = "dead" if model.attempts >= model.max_attempts else "queued"

    @precondition(lambda self: self.ids("running"))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids("running")))
        model = self.jobs[job_id]
        row = self.conn.execute(
            "select pgqueue.fail(%s, %s, '{}', 0)", [job_id, model.token]
        ).fetchone()
        self._failed(model)
        assert row == (model.state,)

    @precondition(lambda self: self.ids("running"))
    @rule(data=st.data())
    def expire_and_reap(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids("running")))
        self.conn.execute(
            "update pgqueue.jobs set lease_expires_at = now() - interval '1 s' where id = %s",
            [job_id],
        )
        reaped = self.conn.execute(
            "select id, state::text from pgqueue.reap()"
        ).fetchall()
        model = self.jobs[job_id]
        self._failed(model)
        model.due = False
        assert reaped == [(job_id, model.state)]

    @precondition(lambda self: self.ids("running"))
    @rule(data=st.data())
    def hand_back(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids("running")))
        model = self.jobs[job_id]
        back = self.conn.execute(
            "select pgqueue.hand_back(%s, %s)", [[job_id], [model.token]]
        ).fetchall()
        assert back == [(job_id,)]
        model.state, model.old_tokens, model.token = (
            "queued",
            (*model.old_tokens, model.token),
            None,
        )  # type: ignore[arg-type]

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        model = self.jobs[job_id]
        if model.state == "queued":
            assert self.conn.execute(
                "select pgqueue.cancel(%s)", [job_id]
            ).fetchone() == ("cancelled",)
            model.state = "cancelled"
        else:
            with pytest.raises(psycopg.Error) as info:
                self.conn.execute("select pgqueue.cancel(%s)", [job_id])
            assert info.value.sqlstate == "PQ003"

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        model = self.jobs[job_id]
        if model.state in ("dead", "cancelled"):
            assert self.conn.execute(
                "select pgqueue.retry(%s)", [job_id]
            ).fetchone() == ("queued",)
            model.state, model.attempts, model.due = "queued", 0, True
        else:
            with pytest.raises(psycopg.Error) as info:
                self.conn.execute("select pgqueue.retry(%s)", [job_id])
            assert info.value.sqlstate == "PQ003"

    @invariant()
    def database_matches_the_model(self) -> None:
        live = self.conn.execute(
            "select id, state::text, attempts, max_attempts, lease_token from pgqueue.jobs"
        ).fetchall()
        done = self.conn.execute(
            "select id, state::text, attempts, max_attempts from pgqueue.finished_jobs"
        ).fetchall()
        in_live = {r[0] for r in live}
        in_done = {r[0] for r in done}
        assert not in_live & in_done, "a job is in two places"
        assert in_live | in_done == set(self.jobs)
        for job_id, state, attempts, max_attempts, *token in [*live, *done]:
            model = self.jobs[job_id]
            assert (state, attempts) == (model.state, model.attempts), job_id
            assert attempts <= max_attempts
            if token and state == "running":
                assert token[0] == model.token


@pytest.mark.slow
def test_life_cycle_matches_the_model(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        JobLifeCycle.conn = conn
        run_state_machine_as_test(
            JobLifeCycle,
            settings=settings(
                max_examples=60, stateful_step_count=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )  # fmt: skip
