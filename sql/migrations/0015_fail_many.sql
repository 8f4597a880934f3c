-- pgqueue 0015: fail_many records many failed attempts in one call.
--
-- The worker wrote each failure in a transaction of its own (fail), while it
-- writes completions in one statement per batch. When every job fails at once
-- (the service the handlers call is down) that was the slow path exactly when
-- the queue is under stress: 20,000 failing no-op jobs drained at 4,340/s
-- against 75,871/s for succeeding ones, at 123 us of server CPU a failure
-- (2 cores, PostgreSQL 15; the worker buffers failures now, worker.py).
--
-- Each job goes through _fail_locked, as in fail and reap, so the rules of a
-- failed attempt (attempts, backoff, error history, dead) stay in one place.
-- Rows are locked in id order, so two calls never wait on each other in a
-- cycle (heartbeat and reap skip locked rows).

create function :pgqueue_schema.fail_many(
    p_ids          bigint[],
    p_tokens       uuid[],
    p_errors       jsonb[],
    p_retry_delays double precision[]
) returns table (id bigint, token uuid, state :pgqueue_schema.job_state)
language plpgsql
set jit = off  -- see 0002
as $$
declare
    v_failed record;
begin
    if cardinality(p_tokens) is distinct from cardinality(p_ids)
       or cardinality(p_errors) is distinct from cardinality(p_ids)
       or cardinality(p_retry_delays) is distinct from cardinality(p_ids) then
        raise exception 'fail_many: every array must have % elements',
                        coalesce(cardinality(p_ids), 0)
              using errcode = 'PQ001';
    end if;
    for v_failed in
        select j as job, t.error, t.delay
          from :pgqueue_schema.jobs j
          -- An id given twice (a worker's job reaped and leased again while
          -- its first failure waited) is one job: at most one of its tokens
          -- is the row's.
          join (select distinct on (u.id, u.token) u.id, u.token, u.error, u.delay
                  from unnest(p_ids, p_tokens, p_errors, p_retry_delays)
                       as u(id, token, error, delay)
                 order by u.id, u.token) t
            on j.id = t.id and j.lease_token = t.token
         where j.id = any(p_ids)
         order by j.id
           for update of j
    loop
        id := (v_failed.job).id;
        token := (v_failed.job).lease_token;
        state := :pgqueue_schema._fail_locked(v_failed.job, v_failed.error,
                                              v_failed.delay);
        return next;
    end loop;
end
$$;
comment on function :pgqueue_schema.fail_many(
    bigint[], uuid[], jsonb[], double precision[]) is
    'Record failed attempts (fenced by lease token, as fail does for one): each '
    'job is queued again after its delay while attempts remain, else dead. '
    'Returns (id, token, new state) of the jobs whose lease was still held.';

revoke execute on function :pgqueue_schema.fail_many(
    bigint[], uuid[], jsonb[], double precision[]) from public;
select :pgqueue_schema._grant_to_workers(
    ':pgqueue_schema.fail_many(bigint[], uuid[], jsonb[], double precision[])'
    ::regprocedure);
