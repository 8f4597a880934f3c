-- pgqueue 0005: queues that keep no record of their succeeded jobs; fenced
-- statements that find their rows by primary key however many jobs run.
--
-- By default a completed job moves to finished_jobs, where it stays (with its
-- result) until retention prunes it. A queue of many short jobs whose results
-- nobody reads can skip that copy: with keep_succeeded = false, completing one
-- of its jobs deletes the row and nothing else. Failed attempts, dead and
-- cancelled jobs are recorded as always, and an idempotency key is released
-- with its job, as prune does for jobs it deletes.
--
-- Measured (1,000-job batches, 2 cores, PostgreSQL 15): the completion costs
-- 7.4-7.7 us per job with the history row and 4.6-4.9 us without; a no-op drain
-- spends ~15 us of server CPU per job, so this is a fifth of it.

alter table :pgqueue_schema.queues
    add column keep_succeeded boolean not null default true;
comment on column :pgqueue_schema.queues.keep_succeeded is
    'false: a succeeded job of this queue is deleted on completion, not moved to '
    'finished_jobs (no result, no row for stats). Set with configure_queue().';

create function :pgqueue_schema.configure_queue(
    p_queue          text,
    p_keep_succeeded boolean
) returns void
language sql as $$
    insert into :pgqueue_schema.queues (name, keep_succeeded)
    values (p_queue, p_keep_succeeded)
    on conflict (name) do update set keep_succeeded = excluded.keep_succeeded
$$;
comment on function :pgqueue_schema.configure_queue(text, boolean) is
    'Set a queue''s options: keep_succeeded (default true) keeps succeeded jobs '
    'in finished_jobs until pruned.';
revoke execute on function :pgqueue_schema.configure_queue(text, boolean)
    from public;

-- _forget_keys: release the idempotency keys of jobs deleted without a history
-- row. One index lookup per keyed job; a join here would be hashed (complete
-- forbids nested loops) and read the whole key table.
create function :pgqueue_schema._forget_keys(
    p_queues text[], p_keys text[], p_ids bigint[]
) returns void
language plpgsql as $$
declare
    i integer;
begin
    for i in 1 .. coalesce(cardinality(p_ids), 0) loop
        delete from :pgqueue_schema.idempotency_keys k
         where k.queue = p_queues[i] and k.key = p_keys[i] and k.job_id = p_ids[i];
    end loop;
end
$$;
comment on function :pgqueue_schema._forget_keys(text[], text[], bigint[]) is
    'Internal: delete the idempotency keys of jobs completed without history.';
-- Executable by all, unlike the other functions (0003): worker roles granted
-- before this migration call it through complete(). It runs with its caller's
-- rights, so it deletes nothing its caller could not delete anyway.

-- Fenced statements name no state: a lease token is set exactly while a job runs
-- (check jobs_lease), so matching the token is the running check. Written with
-- `state = 'running'` as in 0002, the statement matched the partial index
-- jobs_lease_expiry_idx, which the planner, with statistics taken before any job
-- ran, chose over the primary key: every running row was read and its id looked
-- up in the array one by one. With 2,000 running jobs a 2,000-job completion
-- took 14 ms instead of 3, and as completions fell behind, the running rows grew:
-- `-c 2000 --prefetch 2000` drained 200k jobs at 7k/s, one completion taking 30 s.

-- complete: as in 0002, and jobs of queues that keep no succeeded jobs are only
-- deleted. One statement either way: a branch that ran 0002's statement when no
-- queue discards measured the same (6.6-7.6 us per job, 1,000-job batches).
create or replace function :pgqueue_schema.complete(
    p_ids     bigint[],
    p_tokens  uuid[],
    p_results jsonb[] default null
) returns setof bigint
language plpgsql
set enable_nestloop = off
set jit = off
as $$
declare
    v_discard text[];
    v_ids     bigint[];
    v_kq      text[];
    v_kk      text[];
    v_kid     bigint[];
begin
    v_discard := array(select q.name from :pgqueue_schema.queues q
                        where not q.keep_succeeded);
    with done as (
        delete from :pgqueue_schema.jobs j
         using unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
        returning j.id, j.queue, j.task, j.args, j.priority, j.attempts,
                  j.max_attempts, j.idempotency_key, j.created_at, j.leased_at,
                  j.errors, j.queue = any(v_discard) as discard
    ), forget as (
        select d.id, d.queue, d.idempotency_key from done d
         where d.discard and d.idempotency_key is not null
    ), kept as (
        insert into :pgqueue_schema.finished_jobs
               (id, queue, task, args, priority, state, attempts, max_attempts,
                idempotency_key, created_at, started_at, result, errors)
        select d.id, d.queue, d.task, d.args, d.priority, 'succeeded', d.attempts,
               d.max_attempts, d.idempotency_key, d.created_at, d.leased_at,
               r.result, d.errors
          from done d
          left join unnest(p_ids, p_results) as r(id, result) on r.id = d.id
         where not d.discard
    )
    select array(select d.id from done d),
           array(select f.queue from forget f),
           array(select f.idempotency_key from forget f),
           array(select f.id from forget f)
      into v_ids, v_kq, v_kk, v_kid;
    perform :pgqueue_schema._forget_keys(v_kq, v_kk, v_kid);
    return query select unnest(v_ids);
end
$$;

-- complete_one: as in 0002, and a job of a queue that keeps no succeeded jobs is
-- only deleted.
create or replace function :pgqueue_schema.complete_one(
    p_id     bigint,
    p_token  uuid,
    p_result jsonb default null
) returns void
language plpgsql as $$
declare
    v_job :pgqueue_schema.jobs;
begin
    delete from :pgqueue_schema.jobs j
     where j.id = p_id and j.lease_token = p_token
    returning j.* into v_job;
    if not found then
        raise exception 'lease of job % was lost: it expired or moved to another '
                        'worker; this attempt is rolled back', p_id
              using errcode = 'PQ004';
    end if;
    if exists (select from :pgqueue_schema.queues q
                where q.name = v_job.queue and not q.keep_succeeded) then
        if v_job.idempotency_key is not null then
            perform :pgqueue_schema._forget_keys(array[v_job.queue],
                                                 array[v_job.idempotency_key],
                                                 array[v_job.id]);
        end if;
        return;
    end if;
    insert into :pgqueue_schema.finished_jobs
           (id, queue, task, args, priority, state, attempts, max_attempts,
            idempotency_key, created_at, started_at, result, errors)
    values (v_job.id, v_job.queue, v_job.task, v_job.args, v_job.priority,
            'succeeded', v_job.attempts, v_job.max_attempts, v_job.idempotency_key,
            v_job.created_at, v_job.leased_at, p_result, v_job.errors);
end
$$;

-- heartbeat: as in 0002, without the state predicate (see above).
create or replace function :pgqueue_schema.heartbeat(
    p_worker        text,
    p_ids           bigint[],
    p_tokens        uuid[],
    p_lease_seconds double precision default 60
) returns setof bigint
language sql
set enable_nestloop = off
set jit = off
as $$
    update :pgqueue_schema.workers set last_seen = now() where id = p_worker;
    -- SKIP LOCKED: a row locked by a completion not yet committed (a batch of
    -- transactional jobs, txbatch.py) is skipped rather than waited for, so one
    -- long transaction never stalls the heartbeat of every other job.
    update :pgqueue_schema.jobs j
       set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where j.id = any(array(
               select h.id
                 from :pgqueue_schema.jobs h
                 join unnest(p_ids, p_tokens) as t(id, token)
                   on h.id = t.id and h.lease_token = t.token
                where h.id = any(p_ids)
                  for update of h skip locked))
    returning j.id
$$;

-- hand_back: as in 0002, without the state predicate (see above).
create or replace function :pgqueue_schema.hand_back(p_ids bigint[], p_tokens uuid[])
returns setof bigint
language plpgsql
set enable_nestloop = off
set jit = off
as $$
declare
    v_queues text[];
begin
    with back as (
        update :pgqueue_schema.jobs j
           set state = 'queued', run_at = least(j.run_at, now()), lease_token = null,
               leased_by = null, leased_at = null, lease_expires_at = null
          from unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
        returning j.id, j.queue
    )
    select array_agg(back.id), array_agg(distinct back.queue)
      into p_ids, v_queues from back;
    perform pg_notify(:pgqueue_channel, q) from unnest(v_queues) q;
    return query select unnest(p_ids);
end
$$;

-- fail: as in 0002, without the state predicate (see above): with it, recording
-- one failure read every running row (0.55 ms with 4,000 running).
create or replace function :pgqueue_schema.fail(
    p_id          bigint,
    p_token       uuid,
    p_error       jsonb,
    p_retry_delay double precision default null
) returns :pgqueue_schema.job_state
language plpgsql as $$
declare
    v_job :pgqueue_schema.jobs;
begin
    select * into v_job from :pgqueue_schema.jobs j
     where j.id = p_id and j.lease_token = p_token
       for update;
    if not found then
        return null;
    end if;
    return :pgqueue_schema._fail_locked(v_job, p_error, p_retry_delay);
end
$$;
