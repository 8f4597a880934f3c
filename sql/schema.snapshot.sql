-- pgqueue schema 'pgqueue', version 24
create schema if not exists "pgqueue";
create table if not exists "pgqueue".migrations (
    version    integer primary key,
    name       text not null,
    applied_at timestamptz not null default now()
);

-- 0001_initial
begin;
-- pgqueue 0001: tables, indexes and inspection views.
--
-- "pgqueue" is replaced by the quoted schema name when the migration runs
-- (pgqueue/migrations.py); 'pgqueue' by the quoted NOTIFY channel name.
--
-- Layout: live jobs (queued and running) sit in the hot table `jobs`, which stays
-- small however long the history grows, so leasing and its index stay fast.
-- Finished jobs (succeeded, dead, cancelled) move to `finished_jobs` in the same
-- statement that finishes them, and are pruned from there by retention.

create type "pgqueue".job_state as enum (
    'queued', 'running', 'succeeded', 'dead', 'cancelled'
);
comment on type "pgqueue".job_state is
    'Life cycle of a job: queued (waits while run_at > now()), running (leased), '
    'and the final states succeeded, dead (attempts exhausted) and cancelled.';

create sequence "pgqueue".jobs_id_seq as bigint;
comment on sequence "pgqueue".jobs_id_seq is
    'Job ids, shared by jobs and finished_jobs: a job keeps its id for life.';

create table "pgqueue".jobs (
    id               bigint primary key
                     default nextval('"pgqueue".jobs_id_seq'),
    queue            text not null default 'default',
    task             text not null,
    args             jsonb not null default '{}',
    -- Higher runs first; FIFO by run_at, then id, within one priority.
    priority         smallint not null default 0,
    state            "pgqueue".job_state not null default 'queued',
    run_at           timestamptz not null default now(),
    attempts         integer not null default 0,
    max_attempts     integer not null default 25,
    idempotency_key  text,
    -- The fencing token of the current lease: complete, fail, heartbeat and
    -- hand_back touch the row only while it still holds the token they name.
    lease_token      uuid,
    leased_by        text,
    leased_at        timestamptz,
    lease_expires_at timestamptz,
    created_at       timestamptz not null default now(),
    -- One object per failed or lost attempt: attempt, at, error, traceback, worker.
    errors           jsonb not null default '[]',
    -- Every UPDATE re-checks these, so they are written to be cheap: a bounded
    -- repetition such as {0,127} made each lease cost 7 us more per row (1000-row
    -- lease: 16 ms with it, 9.5 ms with a plain * and length()).
    constraint jobs_queue_name check (
        queue ~ '^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$' and length(queue) <= 128),
    constraint jobs_task_name check (
        task ~ '^[A-Za-z_][A-Za-z0-9_.:/-]*$' and length(task) <= 200),
    constraint jobs_attempts check (attempts >= 0 and max_attempts between 1 and 1000),
    constraint jobs_idempotency_key check (length(idempotency_key) between 1 and 255),
    constraint jobs_state_live check (state in ('queued', 'running')),
    constraint jobs_lease check ((state = 'running') = (lease_token is not null))
);
alter sequence "pgqueue".jobs_id_seq owned by "pgqueue".jobs.id;

comment on table "pgqueue".jobs is
    'Live jobs (queued and running). Internal: read the views, change state '
    'through the functions.';

-- The lease order exactly: queue equality, then priority desc, run_at, id. Partial,
-- so running rows never sit in it.
create index jobs_fetch_idx on "pgqueue".jobs (queue, priority desc, run_at, id)
    where state = 'queued';
-- No separate (queue, run_at) index: next_run_at() finds the earliest run_at with
-- a skip scan of jobs_fetch_idx, and every index on this table costs each enqueue
-- (20k-row insert: 125 ms with a (queue, run_at) index, 83 ms without).
-- Expired leases, found by reap.
create index jobs_lease_expiry_idx on "pgqueue".jobs (lease_expires_at)
    where state = 'running';

-- Every row is inserted, updated once or twice, and deleted within seconds, so the
-- table churns: vacuum it after a small fraction of it changed, and leave room
-- in each page for the lease update to stay on the same page.
alter table "pgqueue".jobs set (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

create table "pgqueue".finished_jobs (
    id              bigint primary key,
    queue           text not null,
    task            text not null,
    args            jsonb not null,
    priority        smallint not null,
    state           "pgqueue".job_state not null,
    attempts        integer not null,
    max_attempts    integer not null,
    idempotency_key text,
    created_at      timestamptz not null,
    started_at      timestamptz,
    finished_at     timestamptz not null default now(),
    result          jsonb,
    errors          jsonb not null default '[]',
    constraint finished_jobs_state check (state in ('succeeded', 'dead', 'cancelled'))
);
comment on table "pgqueue".finished_jobs is
    'Jobs that reached a final state, kept until pruned by retention. Internal: '
    'read the views.';
-- BRIN, not btree: finished_at grows with insertion order, and a BRIN index costs
-- almost nothing per completion while still letting prune skip recent pages.
create index finished_jobs_finished_at_idx on "pgqueue".finished_jobs
    using brin (finished_at);
create index finished_jobs_dead_idx on "pgqueue".finished_jobs (queue, finished_at)
    where state = 'dead';

create table "pgqueue".idempotency_keys (
    queue      text not null,
    key        text not null,
    job_id     bigint not null,
    created_at timestamptz not null default now(),
    primary key (queue, key)
);
comment on table "pgqueue".idempotency_keys is
    'One row per idempotency key and queue. A key lives as long as its job: '
    'while queued or running, and after it finished until prune removes it.';
create index idempotency_keys_job_idx on "pgqueue".idempotency_keys (job_id);

create table "pgqueue".workers (
    id         text primary key,
    hostname   text not null,
    pid        integer not null,
    queues     text[] not null,
    started_at timestamptz not null default now(),
    last_seen  timestamptz not null default now()
);
comment on table "pgqueue".workers is
    'Running worker processes and their last heartbeat.';

create table "pgqueue".queues (
    name   text primary key,
    paused boolean not null default false
);
comment on table "pgqueue".queues is
    'Per-queue settings (room for pausing and limits). A queue needs no row here.';

-- Inspection views: the supported way to read the queue.

create view "pgqueue".jobs_overview as
select id, queue, task, args, priority, state, run_at, attempts, max_attempts,
       idempotency_key, leased_by, leased_at as started_at, lease_expires_at,
       created_at, null::timestamptz as finished_at, null::jsonb as result, errors
  from "pgqueue".jobs
union all
select id, queue, task, args, priority, state, null, attempts, max_attempts,
       idempotency_key, null, started_at, null,
       created_at, finished_at, result, errors
  from "pgqueue".finished_jobs;
comment on view "pgqueue".jobs_overview is
    'Every job, live or finished, with its state, attempts and error history.';

create view "pgqueue".running_jobs as
select id, queue, task, attempts, leased_by, leased_at as started_at,
       lease_expires_at, now() - leased_at as running_for
  from "pgqueue".jobs
 where state = 'running';
comment on view "pgqueue".running_jobs is
    'Jobs being run now, the worker that holds each and when its lease expires.';

create view "pgqueue".dead_jobs as
select id, queue, task, args, attempts, finished_at,
       errors -> -1 ->> 'error' as last_error, errors
  from "pgqueue".finished_jobs
 where state = 'dead';
comment on view "pgqueue".dead_jobs is
    'Jobs that exhausted their attempts, with the last error; retry them with '
    'pgqueue.retry(id) or pgqueue.retry_dead(queue).';

create view "pgqueue".queue_depth as
with live as (
    select queue,
           count(*) filter (where state = 'queued' and run_at <= now()) as queued,
           count(*) filter (where state = 'queued' and run_at > now()) as scheduled,
           count(*) filter (where state = 'running') as running,
           now() - min(run_at) filter (where state = 'queued' and run_at <= now())
               as oldest_queued_age
      from "pgqueue".jobs
     group by queue
), done as (
    select queue,
           count(*) filter (where state = 'succeeded') as succeeded,
           count(*) filter (where state = 'dead') as dead,
           count(*) filter (where state = 'cancelled') as cancelled
      from "pgqueue".finished_jobs
     group by queue
)
select coalesce(live.queue, done.queue) as queue,
       coalesce(live.queued, 0) as queued,
       coalesce(live.scheduled, 0) as scheduled,
       coalesce(live.running, 0) as running,
       coalesce(done.succeeded, 0) as succeeded,
       coalesce(done.dead, 0) as dead,
       coalesce(done.cancelled, 0) as cancelled,
       live.oldest_queued_age
  from live full join done on live.queue = done.queue;
comment on view "pgqueue".queue_depth is
    'Per queue: queued (due now), scheduled (run_at later), running, and the '
    'finished counts still in history; oldest_queued_age is how long the oldest '
    'due job has waited.';

insert into "pgqueue".migrations (version, name) values (1, 'initial');
commit;

-- 0002_functions
begin;
-- pgqueue 0002: the stored functions that own every transition of a job.
--
-- Error codes (mapped to Python exceptions in pgqueue/errors.py):
--   PQ001  invalid job (bad name, priority, attempts, key)   -> InvalidJob
--   PQ002  job not found                                     -> JobNotFound
--   PQ003  job is not in a state that allows the transition   -> InvalidState
--   PQ004  the lease was lost (fenced completion refused)     -> LeaseLost
--
-- Time always comes from now(): the database's clock, never a worker's.

-- _notify: wake listening workers of these queues. NOTIFY is delivered at commit,
-- so a rolled-back enqueue wakes nobody, and Postgres folds identical
-- notifications of one transaction into one. The enqueue functions call it once
-- per call and queue. (A statement trigger with a transition table did the same
-- for plain INSERTs too, but cost 20 % of a bulk enqueue; rows inserted by hand
-- are found by the workers' polling instead.)
create function "pgqueue"._notify(p_queues text[]) returns void
language sql as $$
    select pg_notify('pgqueue', q)
      from (select distinct coalesce(q, 'default') as q from unnest(p_queues) q) d
$$;
comment on function "pgqueue"._notify(text[]) is
    'Internal: NOTIFY the workers of each distinct queue (delivered at commit).';

-- Default backoff for attempts the database fails on its own (expired leases):
-- exponential, capped at an hour, with +-50% jitter so a burst of lost jobs does
-- not come back in lockstep. Workers pass their task's own delay to fail().
create function "pgqueue"._backoff(p_attempts integer) returns interval
language sql volatile as $$
    select make_interval(secs => least(3600.0, power(2, least(p_attempts, 20)))
                                 * (0.5 + random()))
$$;
comment on function "pgqueue"._backoff(integer) is
    'Retry delay after the given number of failed attempts (reap uses it).';

-- enqueue_many: insert jobs from parallel arrays in one statement and return one id
-- per input row, in input order. A row whose idempotency key already exists in its
-- queue creates nothing and returns the existing job's id.
--
-- Keys: the key row is inserted first with ON CONFLICT DO NOTHING, which waits
-- for a concurrent transaction holding the same key and then skips if that one
-- committed; the job is inserted only where the key row was ours. The ids of
-- skipped rows are read in a second statement, whose fresh snapshot sees the
-- winner's commit.
create function "pgqueue".enqueue_many(
    p_tasks         text[],
    p_args          jsonb[],
    p_queues        text[] default null,
    p_priorities    integer[] default null,
    p_run_ats       timestamptz[] default null,
    p_max_attempts  integer[] default null,
    p_keys          text[] default null
) returns table (ord bigint, id bigint, created boolean)
language plpgsql
set jit = off  -- see lease()
as $$
declare
    n integer := coalesce(cardinality(p_tasks), 0);
    v_ord bigint[];
    v_id bigint[];
    v_created boolean[];
    v_queue text[];
    v_key text[];
begin
    if coalesce(cardinality(p_args), 0) <> n
       or (p_queues is not null and cardinality(p_queues) <> n)
       or (p_priorities is not null and cardinality(p_priorities) <> n)
       or (p_run_ats is not null and cardinality(p_run_ats) <> n)
       or (p_max_attempts is not null and cardinality(p_max_attempts) <> n)
       or (p_keys is not null and cardinality(p_keys) <> n) then
        raise exception 'enqueue_many: every array must have % elements', n
              using errcode = 'PQ001';
    end if;
    if exists (select from unnest(p_priorities) p where p not between -32768 and 32767)
    then
        raise exception 'priority must be between -32768 and 32767'
              using errcode = 'PQ001';
    end if;
    if exists (select from unnest(p_keys) k where length(k) > 255) then
        raise exception 'idempotency key longer than 255 characters'
              using errcode = 'PQ001';
    end if;

    if not exists (select from unnest(p_keys) k where k is not null) then
        -- No idempotency keys: one INSERT. Ids come from the sequence in insertion
        -- order, which follows ord, so they ascend in input order.
        return query
        with inserted as (
            insert into "pgqueue".jobs
                   (queue, task, args, priority, run_at, max_attempts)
            select coalesce(t.queue, 'default'), t.task, coalesce(t.args, '{}'),
                   coalesce(t.priority, 0), coalesce(t.run_at, now()),
                   coalesce(t.max_attempts, 25)
              from unnest(p_tasks, p_args, p_queues, p_priorities, p_run_ats,
                          p_max_attempts)
                   with ordinality as t(task, args, queue, priority, run_at,
                                        max_attempts, ord)
             order by t.ord
            returning jobs.id
        )
        select row_number() over (order by i.id), i.id, true from inserted i
         order by i.id;
        perform "pgqueue"._notify(coalesce(p_queues, array['default']));
        return;
    end if;

    with input as materialized (
        select t.ord, nextval('"pgqueue".jobs_id_seq') as id, t.task,
               coalesce(t.args, '{}') as args, coalesce(t.queue, 'default') as queue,
               coalesce(t.priority, 0) as priority, coalesce(t.run_at, now()) as run_at,
               coalesce(t.max_attempts, 25) as max_attempts, t.key
          from unnest(p_tasks, p_args, p_queues, p_priorities, p_run_ats,
                      p_max_attempts, p_keys)
               with ordinality as t(task, args, queue, priority, run_at,
                                    max_attempts, key, ord)
    ), won as (
        insert into "pgqueue".idempotency_keys as k (queue, key, job_id)
        select i.queue, i.key, i.id from input i
         where i.key is not null order by i.ord
        on conflict do nothing
        returning k.job_id
    ), inserted as (
        insert into "pgqueue".jobs
               (id, queue, task, args, priority, run_at, max_attempts,
                idempotency_key)
        select i.id, i.queue, i.task, i.args, i.priority, i.run_at, i.max_attempts,
               i.key
          from input i
         where i.key is null or i.id in (select won.job_id from won)
         order by i.ord
        returning jobs.id
    )
    select array_agg(i.ord order by i.ord), array_agg(i.id order by i.ord),
           array_agg(i.id in (select inserted.id from inserted) order by i.ord),
           array_agg(i.queue order by i.ord), array_agg(i.key order by i.ord)
      into v_ord, v_id, v_created, v_queue, v_key
      from input i;

    perform "pgqueue"._notify(v_queue);
    -- Rows that lost their key take the existing job's id. A second statement on
    -- purpose: its snapshot sees a key committed while the insert above waited.
    return query
    select t.ord, case when t.created then t.id else k.job_id end, t.created
      from unnest(v_ord, v_id, v_created, v_queue, v_key)
           as t(ord, id, created, queue, key)
      left join "pgqueue".idempotency_keys k
        on not t.created and k.queue = t.queue and k.key = t.key
     order by t.ord;
end
$$;
comment on function "pgqueue".enqueue_many(
    text[], jsonb[], text[], integer[], timestamptz[], integer[], text[]) is
    'Enqueue many jobs in one call (parallel arrays; null arrays take defaults). '
    'Returns (ord, id, created) per input row; created is false where an '
    'idempotency key matched an existing job, whose id is returned.';

-- enqueue: one job. The fast path (no key) is a single INSERT; a key goes through
-- the same claim-then-insert dance as enqueue_many.
create function "pgqueue".enqueue(
    p_task            text,
    p_args            jsonb default '{}',
    p_queue           text default 'default',
    p_priority        integer default 0,
    p_run_at          timestamptz default null,
    p_max_attempts    integer default 25,
    p_idempotency_key text default null
) returns bigint
language plpgsql as $$
declare
    v_id bigint;
begin
    if p_priority not between -32768 and 32767 then
        raise exception 'priority must be between -32768 and 32767, got %', p_priority
              using errcode = 'PQ001';
    end if;
    if p_idempotency_key is null then
        insert into "pgqueue".jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, now()), p_max_attempts)
        returning id into v_id;
        perform pg_notify('pgqueue', p_queue);
        return v_id;
    end if;
    if length(p_idempotency_key) > 255 then
        raise exception 'idempotency key longer than 255 characters'
              using errcode = 'PQ001';
    end if;
    loop
        v_id := nextval('"pgqueue".jobs_id_seq');
        insert into "pgqueue".idempotency_keys (queue, key, job_id)
        values (p_queue, p_idempotency_key, v_id)
        on conflict do nothing;
        if found then
            insert into "pgqueue".jobs
                   (id, queue, task, args, priority, run_at, max_attempts,
                    idempotency_key)
            values (v_id, p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                    coalesce(p_run_at, now()), p_max_attempts, p_idempotency_key);
            perform pg_notify('pgqueue', p_queue);
            return v_id;
        end if;
        select k.job_id into v_id from "pgqueue".idempotency_keys k
         where k.queue = p_queue and k.key = p_idempotency_key;
        if found then
            return v_id;
        end if;
        -- The key was pruned between the two statements: claim it again.
    end loop;
end
$$;
comment on function "pgqueue".enqueue(
    text, jsonb, text, integer, timestamptz, integer, text) is
    'Enqueue one job in the caller''s transaction and return its id. With an '
    'idempotency key that already exists in the queue, return that job''s id and '
    'create nothing.';

-- lease: take up to p_limit due jobs of the given queues, highest priority first,
-- FIFO within a priority, each with a fresh lease token.
--
-- Per queue, a LATERAL scan walks jobs_fetch_idx in its exact order and locks with
-- SKIP LOCKED, so concurrent workers split the jobs instead of waiting on each
-- other. The MATERIALIZED fence makes the planner lock first and update after;
-- without it an UPDATE ... WHERE id IN (subquery with LIMIT) may update more rows
-- than the limit (the planner trap Oban documents). The UPDATE names its rows
-- with id = any(array(...)) so it walks the primary key: joined to the CTE
-- instead, the planner hashed a sequential scan of the whole table (6.6 ms per
-- lease of 200 at 20k queued, growing with the backlog; 3.8 ms this way,
-- flat). With several queues a scan
-- can lock up to p_limit rows per queue; the ones not taken are unlocked at the
-- end of this statement's transaction, a moment later.
create function "pgqueue".lease(
    p_queues        text[],
    p_limit         integer,
    p_worker        text,
    p_lease_seconds double precision default 60
) returns table (
    id bigint, queue text, task text, args jsonb, priority smallint,
    attempts integer, max_attempts integer, lease_token uuid,
    run_at timestamptz, created_at timestamptz, lease_expires_at timestamptz
)
-- plpgsql so the plan is kept between calls; PostgreSQL < 18 plans a SQL
-- function's statement on every call.
language plpgsql
-- With a parameter for LIMIT the planner assumes a tenth of the table, and past
-- about 100k queued jobs the estimate crossed jit_above_cost: each lease then
-- spent 8 ms compiling (1M queued: 8.1 ms a lease instead of 0.5 ms).
set jit = off
as $$
begin
    return query
    with candidates as materialized (
        select c.id, c.priority, c.run_at
          from unnest(p_queues) as q(name)
         cross join lateral (
               select j.id, j.priority, j.run_at
                 from "pgqueue".jobs j
                where j.queue = q.name and j.state = 'queued' and j.run_at <= now()
                order by j.priority desc, j.run_at, j.id
                limit p_limit
                  for update skip locked
         ) c
         order by c.priority desc, c.run_at, c.id
         limit p_limit
    )
    , leased as (
        -- One token per lease call, not per row: gen_random_uuid() costs ~5 us a
        -- call. Fencing stays per job, because every function that checks a
        -- token matches the (id, token) pair, and a job gets a new token with
        -- every lease.
        update "pgqueue".jobs j
           set state = 'running',
               lease_token = (select gen_random_uuid()),
               leased_by = p_worker,
               leased_at = now(),
               lease_expires_at = now() + make_interval(secs => p_lease_seconds)
         where j.id = any(array(select c.id from candidates c))
        returning j.id, j.queue, j.task, j.args, j.priority, j.attempts,
                  j.max_attempts, j.lease_token, j.run_at, j.created_at,
                  j.lease_expires_at
    )
    select * from leased l order by l.priority desc, l.run_at, l.id;
end
$$;
comment on function "pgqueue".lease(text[], integer, text, double precision) is
    'Lease up to p_limit due jobs of the queues (priority desc, run_at, id) with '
    'FOR UPDATE SKIP LOCKED; each gets a fresh lease token and expiry.';

-- complete: the handlers of these jobs returned. Fenced: a row changes only while
-- it is still running under the token named here. Returns the ids completed; an
-- id missing from the result lost its lease (Python raises LeaseLost), and in a
-- transactional task the caller then rolls back the handler's writes.
create function "pgqueue".complete(
    p_ids     bigint[],
    p_tokens  uuid[],
    p_results jsonb[] default null
) returns setof bigint
-- plpgsql, not sql: PostgreSQL < 18 plans a SQL function's statements on every
-- call, which cost 0.48 ms per one-job completion; plpgsql keeps the plan.
language plpgsql
-- The planner guesses 10 rows for unnest() of a parameter and then loops over it
-- once per job: 47.7 s to complete 20,000 jobs. Hash joins make it 12 ms per 2,000.
set enable_nestloop = off
set jit = off  -- see lease()
as $$
begin
    return query
    -- Each (id, token) pair is matched exactly. The extra id = any() lets the
    -- planner walk the primary key; a join on unnest() alone was planned as a
    -- sequential scan of the table.
    with done as (
        delete from "pgqueue".jobs j
         using unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
           and j.state = 'running'
        returning j.*
    )
    insert into "pgqueue".finished_jobs
           (id, queue, task, args, priority, state, attempts, max_attempts,
            idempotency_key, created_at, started_at, result, errors)
    select d.id, d.queue, d.task, d.args, d.priority, 'succeeded', d.attempts,
           d.max_attempts, d.idempotency_key, d.created_at, d.leased_at, r.result,
           d.errors
      from done d
      left join unnest(p_ids, p_results) as r(id, result) on r.id = d.id
    returning finished_jobs.id;
end
$$;
comment on function "pgqueue".complete(bigint[], uuid[], jsonb[]) is
    'Mark running jobs succeeded (fenced by lease token) and move them to '
    'finished_jobs. Returns the ids it completed.';

-- complete_one: complete one job inside the handler's transaction, or raise
-- PQ004 when its lease was lost. Raising (rather than returning false) aborts the
-- transaction, so the worker can send this and COMMIT in one round trip: a lost
-- lease turns the COMMIT into a rollback of the handler's writes.
create function "pgqueue".complete_one(
    p_id     bigint,
    p_token  uuid,
    p_result jsonb default null
) returns void
language plpgsql as $$
begin
    with done as (
        delete from "pgqueue".jobs j
         where j.id = p_id and j.lease_token = p_token and j.state = 'running'
        returning j.*
    )
    insert into "pgqueue".finished_jobs
           (id, queue, task, args, priority, state, attempts, max_attempts,
            idempotency_key, created_at, started_at, result, errors)
    select d.id, d.queue, d.task, d.args, d.priority, 'succeeded', d.attempts,
           d.max_attempts, d.idempotency_key, d.created_at, d.leased_at, p_result,
           d.errors
      from done d;
    if not found then
        raise exception 'lease of job % was lost: it expired or moved to another '
                        'worker; this attempt is rolled back', p_id
              using errcode = 'PQ004';
    end if;
end
$$;
comment on function "pgqueue".complete_one(bigint, uuid, jsonb) is
    'Complete one running job (fenced by lease token) in the caller''s '
    'transaction; raise PQ004 if the lease was lost.';

-- fail: one attempt failed (handler raised, timed out, or an unknown task). With
-- attempts left the job is queued again at now() + p_retry_delay; otherwise it is
-- dead and moves to finished_jobs. p_error is appended to the error history.
-- Fenced like complete. Returns the new state, or null if the lease was lost.
create function "pgqueue".fail(
    p_id          bigint,
    p_token       uuid,
    p_error       jsonb,
    p_retry_delay double precision default null
) returns "pgqueue".job_state
language plpgsql as $$
declare
    v_job "pgqueue".jobs;
begin
    select * into v_job from "pgqueue".jobs j
     where j.id = p_id and j.lease_token = p_token and j.state = 'running'
       for update;
    if not found then
        return null;
    end if;
    return "pgqueue"._fail_locked(v_job, p_error, p_retry_delay);
end
$$;
comment on function "pgqueue".fail(bigint, uuid, jsonb, double precision) is
    'Record a failed attempt (fenced by lease token): queued again after the delay '
    'while attempts remain, else dead. Returns the new state, null if the lease '
    'was lost.';

-- _fail_locked: the shared end of fail and reap, for a row the caller has locked.
create function "pgqueue"._fail_locked(
    p_job         "pgqueue".jobs,
    p_error       jsonb,
    p_retry_delay double precision
) returns "pgqueue".job_state
language plpgsql as $$
declare
    v_attempts integer := p_job.attempts + 1;
    v_error jsonb := jsonb_build_object('attempt', v_attempts, 'at', now(),
                                        'worker', p_job.leased_by) || p_error;
begin
    if v_attempts < p_job.max_attempts then
        update "pgqueue".jobs
           set state = 'queued', attempts = v_attempts,
               run_at = now() + coalesce(make_interval(secs => p_retry_delay),
                                         "pgqueue"._backoff(v_attempts)),
               lease_token = null, leased_by = null, leased_at = null,
               lease_expires_at = null, errors = errors || jsonb_build_array(v_error)
         where id = p_job.id;
        return 'queued';
    end if;
    delete from "pgqueue".jobs where id = p_job.id;
    insert into "pgqueue".finished_jobs
           (id, queue, task, args, priority, state, attempts, max_attempts,
            idempotency_key, created_at, started_at, errors)
    values (p_job.id, p_job.queue, p_job.task, p_job.args, p_job.priority, 'dead',
            v_attempts, p_job.max_attempts, p_job.idempotency_key, p_job.created_at,
            p_job.leased_at, p_job.errors || jsonb_build_array(v_error));
    return 'dead';
end
$$;
comment on function "pgqueue"._fail_locked(
    "pgqueue".jobs, jsonb, double precision) is
    'Internal: count a failed attempt of a locked running job; retry or dead.';

-- heartbeat: the worker is alive. Extends the leases it still holds (one statement
-- for all in-flight jobs) and its row in workers. Returns the ids whose lease it
-- still holds; a missing id was reaped or handed over, and its attempt is lost.
create function "pgqueue".heartbeat(
    p_worker        text,
    p_ids           bigint[],
    p_tokens        uuid[],
    p_lease_seconds double precision default 60
) returns setof bigint
language sql
set enable_nestloop = off  -- see complete()
set jit = off
as $$
    update "pgqueue".workers set last_seen = now() where id = p_worker;
    -- SKIP LOCKED: a row locked by a completion not yet committed (a batch of
    -- transactional jobs, txbatch.py) is skipped rather than waited for, so one
    -- long transaction never stalls the heartbeat of every other job.
    update "pgqueue".jobs j
       set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where j.id = any(array(
               select h.id
                 from "pgqueue".jobs h
                 join unnest(p_ids, p_tokens) as t(id, token)
                   on h.id = t.id and h.lease_token = t.token
                where h.id = any(p_ids) and h.state = 'running'
                  for update of h skip locked))
    returning j.id
$$;
comment on function "pgqueue".heartbeat(
    text, bigint[], uuid[], double precision) is
    'Extend the leases of running jobs (fenced by token) and record the worker as '
    'alive. Returns the ids still held.';

-- reap: running jobs whose lease expired (their worker crashed, froze or lost its
-- connection) count a failed attempt and go back to queued, or die when out of
-- attempts. SKIP LOCKED lets every worker reap without queueing behind another.
create function "pgqueue".reap(p_limit integer default 1000)
returns table (id bigint, state "pgqueue".job_state)
language plpgsql
set jit = off  -- see lease()
as $$
declare
    v_job "pgqueue".jobs;
begin
    for v_job in
        select * from "pgqueue".jobs j
         where j.state = 'running' and j.lease_expires_at < now()
         order by j.lease_expires_at
         limit p_limit
           for update skip locked
    loop
        id := v_job.id;
        state := "pgqueue"._fail_locked(
            v_job,
            jsonb_build_object('error', 'lease expired: worker '
                               || coalesce(v_job.leased_by, '?')
                               || ' stopped heartbeating', 'kind', 'lease_expired'),
            null);
        return next;
    end loop;
    if found then
        perform pg_notify('pgqueue', q.queue)
           from (select distinct j.queue from "pgqueue".jobs j
                  where j.state = 'queued' and j.run_at <= now()) q;
    end if;
    delete from "pgqueue".workers w
     where w.last_seen < now() - interval '1 hour';
end
$$;
comment on function "pgqueue".reap(integer) is
    'Fail running jobs whose lease expired (counting an attempt) and forget '
    'workers silent for an hour. Returns the jobs it changed and their new state.';

-- hand_back: a worker that stops gracefully returns jobs it did not finish. They
-- are queued again at once and the attempt is not counted.
create function "pgqueue".hand_back(p_ids bigint[], p_tokens uuid[])
returns setof bigint
language plpgsql
set enable_nestloop = off  -- see complete()
set jit = off
as $$
declare
    v_queues text[];
begin
    with back as (
        update "pgqueue".jobs j
           set state = 'queued', run_at = least(j.run_at, now()), lease_token = null,
               leased_by = null, leased_at = null, lease_expires_at = null
          from unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
           and j.state = 'running'
        returning j.id, j.queue
    )
    select array_agg(back.id), array_agg(distinct back.queue)
      into p_ids, v_queues from back;
    perform pg_notify('pgqueue', q) from unnest(v_queues) q;
    return query select unnest(p_ids);
end
$$;
comment on function "pgqueue".hand_back(bigint[], uuid[]) is
    'Return running jobs to queued without counting an attempt (graceful '
    'shutdown). Fenced by token. Returns the ids handed back.';

-- cancel: a queued (or scheduled) job will not run. A running job cannot be
-- cancelled here: it finishes or fails on its own.
create function "pgqueue".cancel(p_id bigint)
returns "pgqueue".job_state
language plpgsql as $$
declare
    v_job "pgqueue".jobs;
    v_state "pgqueue".job_state;
begin
    select * into v_job from "pgqueue".jobs j where j.id = p_id for update;
    if not found then
        select f.state into v_state from "pgqueue".finished_jobs f
         where f.id = p_id;
        if not found then
            raise exception 'job % not found', p_id using errcode = 'PQ002';
        end if;
        raise exception 'job % is %, only a queued job can be cancelled', p_id, v_state
              using errcode = 'PQ003';
    end if;
    if v_job.state <> 'queued' then
        raise exception 'job % is running, only a queued job can be cancelled', p_id
              using errcode = 'PQ003';
    end if;
    delete from "pgqueue".jobs where id = p_id;
    insert into "pgqueue".finished_jobs
           (id, queue, task, args, priority, state, attempts, max_attempts,
            idempotency_key, created_at, errors)
    values (v_job.id, v_job.queue, v_job.task, v_job.args, v_job.priority,
            'cancelled', v_job.attempts, v_job.max_attempts, v_job.idempotency_key,
            v_job.created_at, v_job.errors);
    return 'cancelled';
end
$$;
comment on function "pgqueue".cancel(bigint) is
    'Cancel a queued job: it moves to finished_jobs as cancelled.';

-- retry: a dead (or cancelled) job is queued again now, with its attempts reset and
-- its error history kept.
create function "pgqueue".retry(p_id bigint)
returns "pgqueue".job_state
language plpgsql as $$
declare
    v_job "pgqueue".finished_jobs;
begin
    select * into v_job from "pgqueue".finished_jobs f where f.id = p_id
       for update;
    if not found then
        if exists (select from "pgqueue".jobs j where j.id = p_id) then
            raise exception 'job % is still queued or running', p_id
                  using errcode = 'PQ003';
        end if;
        raise exception 'job % not found', p_id using errcode = 'PQ002';
    end if;
    if v_job.state = 'succeeded' then
        raise exception 'job % succeeded; only dead or cancelled jobs can be retried',
              p_id using errcode = 'PQ003';
    end if;
    delete from "pgqueue".finished_jobs where id = p_id;
    insert into "pgqueue".jobs
           (id, queue, task, args, priority, run_at, attempts, max_attempts,
            idempotency_key, created_at, errors)
    values (v_job.id, v_job.queue, v_job.task, v_job.args, v_job.priority, now(), 0,
            v_job.max_attempts, v_job.idempotency_key, v_job.created_at,
            v_job.errors);
    perform pg_notify('pgqueue', v_job.queue);
    return 'queued';
end
$$;
comment on function "pgqueue".retry(bigint) is
    'Queue a dead or cancelled job again now, attempts reset, errors kept.';

create function "pgqueue".retry_dead(p_queue text)
returns integer
language plpgsql as $$
declare
    v_count integer;
begin
    with moved as (
        delete from "pgqueue".finished_jobs f
         where f.queue = p_queue and f.state = 'dead'
        returning f.*
    )
    insert into "pgqueue".jobs
           (id, queue, task, args, priority, run_at, attempts, max_attempts,
            idempotency_key, created_at, errors)
    select m.id, m.queue, m.task, m.args, m.priority, now(), 0, m.max_attempts,
           m.idempotency_key, m.created_at, m.errors
      from moved m;
    get diagnostics v_count = row_count;
    if v_count > 0 then
        perform pg_notify('pgqueue', p_queue);
    end if;
    return v_count;
end
$$;
comment on function "pgqueue".retry_dead(text) is
    'Queue every dead job of a queue again; returns how many.';

-- next_run_at: when the earliest queued job of these queues is due (null if none).
-- Workers sleep until then instead of polling. A skip scan of jobs_fetch_idx:
-- for each distinct priority (few in practice) the first run_at is one index
-- probe, so no second index has to be kept up to date on every enqueue.
create function "pgqueue".next_run_at(p_queues text[])
returns timestamptz
language plpgsql stable
set jit = off  -- see lease()
as $$
declare
    v_queue text;
    v_priority smallint;
    v_run_at timestamptz;
    v_min timestamptz;
begin
    foreach v_queue in array p_queues loop
        v_priority := 32767;
        loop
            select j.priority, j.run_at into v_priority, v_run_at
              from "pgqueue".jobs j
             where j.queue = v_queue and j.state = 'queued'
               and j.priority <= v_priority
             order by j.priority desc, j.run_at
             limit 1;
            exit when not found;
            if v_min is null or v_run_at < v_min then
                v_min := v_run_at;
            end if;
            exit when v_priority = -32768;
            v_priority := v_priority - 1;
        end loop;
    end loop;
    return v_min;
end
$$;
comment on function "pgqueue".next_run_at(text[]) is
    'The earliest run_at among queued jobs of the queues, or null.';

-- register_worker / unregister_worker: the workers table, for inspection.
create function "pgqueue".register_worker(
    p_worker text, p_hostname text, p_pid integer, p_queues text[])
returns void
language sql as $$
    insert into "pgqueue".workers (id, hostname, pid, queues)
    values (p_worker, p_hostname, p_pid, p_queues)
    on conflict (id) do update set last_seen = now()
$$;
comment on function "pgqueue".register_worker(text, text, integer, text[]) is
    'Record a worker process as alive.';

create function "pgqueue".unregister_worker(p_worker text)
returns void
language sql as $$
    delete from "pgqueue".workers where id = p_worker
$$;
comment on function "pgqueue".unregister_worker(text) is
    'Forget a worker that stopped.';

-- prune: delete finished jobs (and their idempotency keys) that finished before
-- now() - p_older_than, at most p_limit per call so a large history is pruned in
-- short transactions. Returns how many jobs it deleted.
create function "pgqueue".prune(
    p_older_than interval default interval '7 days',
    p_limit      integer default 10000,
    p_states     "pgqueue".job_state[] default '{succeeded,cancelled,dead}'
) returns integer
language plpgsql
set jit = off  -- see lease()
as $$
declare
    v_count integer;
begin
    with gone as (
        delete from "pgqueue".finished_jobs f
         where f.id in (select g.id from "pgqueue".finished_jobs g
                         where g.finished_at < now() - p_older_than
                           and g.state = any(p_states)
                         limit p_limit
                           for update skip locked)
        returning f.id, f.queue, f.idempotency_key
    ), keys as (
        delete from "pgqueue".idempotency_keys k
         using gone
         where gone.idempotency_key is not null
           and k.queue = gone.queue and k.key = gone.idempotency_key
           and k.job_id = gone.id
    )
    select count(*) into v_count from gone;
    return v_count;
end
$$;
comment on function "pgqueue".prune(interval, integer, "pgqueue".job_state[]) is
    'Delete up to p_limit finished jobs older than p_older_than, with their '
    'idempotency keys. Returns how many were deleted.';

insert into "pgqueue".migrations (version, name) values (2, 'functions');
commit;

-- 0003_privileges
begin;
-- pgqueue 0003: least privilege.
--
-- Three kinds of roles (see README, "Roles"):
--   owner     owns the schema and runs `pgqueue migrate`; needs no superuser.
--   worker    runs `pgqueue worker`: reads and changes jobs through the functions;
--             no DDL, no superuser.            select pgqueue.grant_worker('role');
--   producer  may only enqueue: it cannot read jobs (their payloads may hold
--             other tenants' data).            select pgqueue.grant_producer('role');

-- Enqueue runs with the owner's rights, so a producer needs no SELECT on the
-- tables (INSERT ... RETURNING and the idempotency lookup read them). The
-- search_path is pinned, as for any SECURITY DEFINER function; every object is
-- schema-qualified anyway.
alter function "pgqueue".enqueue(
    text, jsonb, text, integer, timestamptz, integer, text)
    security definer set search_path = pg_catalog, pg_temp;
alter function "pgqueue".enqueue_many(
    text[], jsonb[], text[], integer[], timestamptz[], integer[], text[])
    security definer set search_path = pg_catalog, pg_temp;

-- Functions are executable by PUBLIC by default; pgqueue's are granted explicitly.
revoke execute on all functions in schema "pgqueue" from public;

create function "pgqueue".grant_producer(p_role text) returns void
language plpgsql as $$
begin
    execute format('grant usage on schema "pgqueue" to %I', p_role);
    execute format('grant execute on function "pgqueue".enqueue('
                   'text, jsonb, text, integer, timestamptz, integer, text) to %I',
                   p_role);
    execute format('grant execute on function "pgqueue".enqueue_many('
                   'text[], jsonb[], text[], integer[], timestamptz[], integer[], '
                   'text[]) to %I', p_role);
    -- Bulk enqueue from Python streams rows with COPY: INSERT (not SELECT) on
    -- the hot table, ids from the sequence, and the NOTIFY helper.
    execute format('grant insert on "pgqueue".jobs to %I', p_role);
    execute format('grant usage on sequence "pgqueue".jobs_id_seq to %I',
                   p_role);
    execute format('grant execute on function "pgqueue"._notify(text[]) '
                   'to %I', p_role);
end
$$;
comment on function "pgqueue".grant_producer(text) is
    'Let a role enqueue jobs (function, COPY) without reading any job.';

create function "pgqueue".grant_worker(p_role text) returns void
language plpgsql as $$
begin
    execute format('grant usage on schema "pgqueue" to %I', p_role);
    execute format('grant execute on all functions in schema "pgqueue" to %I',
                   p_role);
    execute format('revoke execute on function "pgqueue".grant_worker(text), '
                   '"pgqueue".grant_producer(text) from %I', p_role);
    execute format('grant select, insert, update, delete on all tables in schema '
                   '"pgqueue" to %I', p_role);
    execute format('grant usage on all sequences in schema "pgqueue" to %I',
                   p_role);
end
$$;
comment on function "pgqueue".grant_worker(text) is
    'Let a role run workers and the CLI (no DDL): execute the functions, read '
    'and change the tables.';

revoke execute on function "pgqueue".grant_producer(text) from public;
revoke execute on function "pgqueue".grant_worker(text) from public;

insert into "pgqueue".migrations (version, name) values (3, 'privileges');
commit;

-- 0004_complete_all
begin;
-- pgqueue 0004: complete_all, the fenced completion of a whole transaction batch.
--
-- A worker running transactional jobs in batches (`--tx-batch N`) runs several
-- handlers in one transaction and completes them all at its end, together with
-- the COMMIT. complete_all completes every job named, or none: if one lease was
-- lost it raises PQ004, which aborts the caller's transaction, so no job's
-- writes commit without its own fenced completion. The worker then reruns the
-- batch one savepoint per job (complete_one), which fences each job alone.

create function "pgqueue".complete_all(
    p_ids     bigint[],
    p_tokens  uuid[],
    p_results jsonb[] default null
) returns void
language plpgsql
set enable_nestloop = off  -- see complete()
set jit = off
as $$
declare
    v_done bigint[];
    v_missing bigint;
begin
    v_done := array(select "pgqueue".complete(p_ids, p_tokens, p_results));
    if cardinality(v_done) < coalesce(cardinality(p_ids), 0) then
        select t.id into v_missing
          from unnest(p_ids) as t(id)
         where t.id <> all(v_done)
         limit 1;
        raise exception 'lease of job % was lost (% of % jobs completed); the '
                        'batch is rolled back', v_missing, cardinality(v_done),
                        cardinality(p_ids)
              using errcode = 'PQ004';
    end if;
end
$$;
comment on function "pgqueue".complete_all(bigint[], uuid[], jsonb[]) is
    'Complete every one of these running jobs (fenced by lease token) in the '
    'caller''s transaction, or raise PQ004 if any lease was lost.';

-- Workers granted before this migration get the new function too: it is what
-- `pgqueue worker --tx-batch` calls.
revoke execute on function "pgqueue".complete_all(bigint[], uuid[], jsonb[])
    from public;
do $$
declare
    v_role text;
begin
    for v_role in
        select distinct a.grantee::regrole::text
          from pg_proc p, aclexplode(p.proacl) a
         where p.oid = '"pgqueue".complete(bigint[], uuid[], jsonb[])'
                       ::regprocedure
           and a.privilege_type = 'EXECUTE' and a.grantee <> 0
           and a.grantee <> p.proowner
    loop
        execute format('grant execute on function '
                       '"pgqueue".complete_all(bigint[], uuid[], jsonb[]) to %s',
                       v_role);
    end loop;
end
$$;

insert into "pgqueue".migrations (version, name) values (4, 'complete_all');
commit;

-- 0005_keep_succeeded
begin;
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

alter table "pgqueue".queues
    add column keep_succeeded boolean not null default true;
comment on column "pgqueue".queues.keep_succeeded is
    'false: a succeeded job of this queue is deleted on completion, not moved to '
    'finished_jobs (no result, no row for stats). Set with configure_queue().';

create function "pgqueue".configure_queue(
    p_queue          text,
    p_keep_succeeded boolean
) returns void
language sql as $$
    insert into "pgqueue".queues (name, keep_succeeded)
    values (p_queue, p_keep_succeeded)
    on conflict (name) do update set keep_succeeded = excluded.keep_succeeded
$$;
comment on function "pgqueue".configure_queue(text, boolean) is
    'Set a queue''s options: keep_succeeded (default true) keeps succeeded jobs '
    'in finished_jobs until pruned.';
revoke execute on function "pgqueue".configure_queue(text, boolean)
    from public;

-- _forget_keys: release the idempotency keys of jobs deleted without a history
-- row. One index lookup per keyed job; a join here would be hashed (complete
-- forbids nested loops) and read the whole key table.
create function "pgqueue"._forget_keys(
    p_queues text[], p_keys text[], p_ids bigint[]
) returns void
language plpgsql as $$
declare
    i integer;
begin
    for i in 1 .. coalesce(cardinality(p_ids), 0) loop
        delete from "pgqueue".idempotency_keys k
         where k.queue = p_queues[i] and k.key = p_keys[i] and k.job_id = p_ids[i];
    end loop;
end
$$;
comment on function "pgqueue"._forget_keys(text[], text[], bigint[]) is
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
create or replace function "pgqueue".complete(
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
    v_discard := array(select q.name from "pgqueue".queues q
                        where not q.keep_succeeded);
    with done as (
        delete from "pgqueue".jobs j
         using unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
        returning j.id, j.queue, j.task, j.args, j.priority, j.attempts,
                  j.max_attempts, j.idempotency_key, j.created_at, j.leased_at,
                  j.errors, j.queue = any(v_discard) as discard
    ), forget as (
        select d.id, d.queue, d.idempotency_key from done d
         where d.discard and d.idempotency_key is not null
    ), kept as (
        insert into "pgqueue".finished_jobs
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
    perform "pgqueue"._forget_keys(v_kq, v_kk, v_kid);
    return query select unnest(v_ids);
end
$$;

-- complete_one: as in 0002, and a job of a queue that keeps no succeeded jobs is
-- only deleted.
create or replace function "pgqueue".complete_one(
    p_id     bigint,
    p_token  uuid,
    p_result jsonb default null
) returns void
language plpgsql as $$
declare
    v_job "pgqueue".jobs;
begin
    delete from "pgqueue".jobs j
     where j.id = p_id and j.lease_token = p_token
    returning j.* into v_job;
    if not found then
        raise exception 'lease of job % was lost: it expired or moved to another '
                        'worker; this attempt is rolled back', p_id
              using errcode = 'PQ004';
    end if;
    if exists (select from "pgqueue".queues q
                where q.name = v_job.queue and not q.keep_succeeded) then
        if v_job.idempotency_key is not null then
            perform "pgqueue"._forget_keys(array[v_job.queue],
                                                 array[v_job.idempotency_key],
                                                 array[v_job.id]);
        end if;
        return;
    end if;
    insert into "pgqueue".finished_jobs
           (id, queue, task, args, priority, state, attempts, max_attempts,
            idempotency_key, created_at, started_at, result, errors)
    values (v_job.id, v_job.queue, v_job.task, v_job.args, v_job.priority,
            'succeeded', v_job.attempts, v_job.max_attempts, v_job.idempotency_key,
            v_job.created_at, v_job.leased_at, p_result, v_job.errors);
end
$$;

-- heartbeat: as in 0002, without the state predicate (see above).
create or replace function "pgqueue".heartbeat(
    p_worker        text,
    p_ids           bigint[],
    p_tokens        uuid[],
    p_lease_seconds double precision default 60
) returns setof bigint
language sql
set enable_nestloop = off
set jit = off
as $$
    update "pgqueue".workers set last_seen = now() where id = p_worker;
    -- SKIP LOCKED: a row locked by a completion not yet committed (a batch of
    -- transactional jobs, txbatch.py) is skipped rather than waited for, so one
    -- long transaction never stalls the heartbeat of every other job.
    update "pgqueue".jobs j
       set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where j.id = any(array(
               select h.id
                 from "pgqueue".jobs h
                 join unnest(p_ids, p_tokens) as t(id, token)
                   on h.id = t.id and h.lease_token = t.token
                where h.id = any(p_ids)
                  for update of h skip locked))
    returning j.id
$$;

-- hand_back: as in 0002, without the state predicate (see above).
create or replace function "pgqueue".hand_back(p_ids bigint[], p_tokens uuid[])
returns setof bigint
language plpgsql
set enable_nestloop = off
set jit = off
as $$
declare
    v_queues text[];
begin
    with back as (
        update "pgqueue".jobs j
           set state = 'queued', run_at = least(j.run_at, now()), lease_token = null,
               leased_by = null, leased_at = null, lease_expires_at = null
          from unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
        returning j.id, j.queue
    )
    select array_agg(back.id), array_agg(distinct back.queue)
      into p_ids, v_queues from back;
    perform pg_notify('pgqueue', q) from unnest(v_queues) q;
    return query select unnest(p_ids);
end
$$;

-- fail: as in 0002, without the state predicate (see above): with it, recording
-- one failure read every running row (0.55 ms with 4,000 running).
create or replace function "pgqueue".fail(
    p_id          bigint,
    p_token       uuid,
    p_error       jsonb,
    p_retry_delay double precision default null
) returns "pgqueue".job_state
language plpgsql as $$
declare
    v_job "pgqueue".jobs;
begin
    select * into v_job from "pgqueue".jobs j
     where j.id = p_id and j.lease_token = p_token
       for update;
    if not found then
        return null;
    end if;
    return "pgqueue"._fail_locked(v_job, p_error, p_retry_delay);
end
$$;

insert into "pgqueue".migrations (version, name) values (5, 'keep_succeeded');
commit;

-- 0006_pause_queues
begin;
-- pgqueue 0006: pausing a queue.
--
-- A paused queue keeps its jobs and takes new ones, but no worker leases from
-- it until it is resumed; jobs already running finish as usual. queues.paused
-- has existed since 0001 with nothing reading it; lease and next_run_at now
-- skip paused queues (a probe of the small queues table per queue and call,
-- inside their cached plans), and resume_queue notifies the queue so idle
-- workers look at once.

-- Queue names follow the rule of jobs.queue (jobs_queue_name), so a typo in a
-- name is refused rather than stored as a setting that matches no job. NOT VALID:
-- rows written before this migration are left as they are.
alter table "pgqueue".queues add constraint queues_name check (
    name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$' and length(name) <= 128) not valid;

create function "pgqueue".pause_queue(p_queue text) returns void
language sql as $$
    insert into "pgqueue".queues (name, paused) values (p_queue, true)
    on conflict (name) do update set paused = true
$$;
comment on function "pgqueue".pause_queue(text) is
    'Stop workers leasing jobs of the queue (running jobs finish); resume_queue '
    'undoes it.';

create function "pgqueue".resume_queue(p_queue text) returns void
language plpgsql as $$
begin
    update "pgqueue".queues set paused = false where name = p_queue;
    perform "pgqueue"._notify(array[p_queue]);
end
$$;
comment on function "pgqueue".resume_queue(text) is
    'Let workers lease jobs of a paused queue again, and wake them.';

-- As the other queue settings (configure_queue, 0005): the owner and worker
-- roles (grant_worker, run again for roles granted before this migration).
revoke execute on function "pgqueue".pause_queue(text) from public;
revoke execute on function "pgqueue".resume_queue(text) from public;

-- lease: as in 0002, over the queues that are not paused.
create or replace function "pgqueue".lease(
    p_queues        text[],
    p_limit         integer,
    p_worker        text,
    p_lease_seconds double precision default 60
) returns table (
    id bigint, queue text, task text, args jsonb, priority smallint,
    attempts integer, max_attempts integer, lease_token uuid,
    run_at timestamptz, created_at timestamptz, lease_expires_at timestamptz
)
language plpgsql
set jit = off
as $$
begin
    return query
    with candidates as materialized (
        select c.id, c.priority, c.run_at
          from (select u.name from unnest(p_queues) as u(name)
                 where not exists (select 1 from "pgqueue".queues p
                                    where p.name = u.name and p.paused)) as q
         cross join lateral (
               select j.id, j.priority, j.run_at
                 from "pgqueue".jobs j
                where j.queue = q.name and j.state = 'queued' and j.run_at <= now()
                order by j.priority desc, j.run_at, j.id
                limit p_limit
                  for update skip locked
         ) c
         order by c.priority desc, c.run_at, c.id
         limit p_limit
    )
    , leased as (
        update "pgqueue".jobs j
           set state = 'running',
               lease_token = (select gen_random_uuid()),
               leased_by = p_worker,
               leased_at = now(),
               lease_expires_at = now() + make_interval(secs => p_lease_seconds)
         where j.id = any(array(select c.id from candidates c))
        returning j.id, j.queue, j.task, j.args, j.priority, j.attempts,
                  j.max_attempts, j.lease_token, j.run_at, j.created_at,
                  j.lease_expires_at
    )
    select * from leased l order by l.priority desc, l.run_at, l.id;
end
$$;

-- next_run_at: as in 0002, over the queues that are not paused.
create or replace function "pgqueue".next_run_at(p_queues text[])
returns timestamptz
language plpgsql stable
set jit = off
as $$
declare
    v_queue text;
    v_priority smallint;
    v_run_at timestamptz;
    v_min timestamptz;
begin
    foreach v_queue in array array(
        select q.name from unnest(p_queues) as q(name)
         where not exists (select 1 from "pgqueue".queues p
                            where p.name = q.name and p.paused))
    loop
        v_priority := 32767;
        loop
            select j.priority, j.run_at into v_priority, v_run_at
              from "pgqueue".jobs j
             where j.queue = v_queue and j.state = 'queued'
               and j.priority <= v_priority
             order by j.priority desc, j.run_at
             limit 1;
            exit when not found;
            if v_min is null or v_run_at < v_min then
                v_min := v_run_at;
            end if;
            exit when v_priority = -32768;
            v_priority := v_priority - 1;
        end loop;
    end loop;
    return v_min;
end
$$;

-- queue_depth: as in 0001, with whether each queue is paused.
create or replace view "pgqueue".queue_depth as
with live as (
    select queue,
           count(*) filter (where state = 'queued' and run_at <= now()) as queued,
           count(*) filter (where state = 'queued' and run_at > now()) as scheduled,
           count(*) filter (where state = 'running') as running,
           now() - min(run_at) filter (where state = 'queued' and run_at <= now())
               as oldest_queued_age
      from "pgqueue".jobs
     group by queue
), done as (
    select queue,
           count(*) filter (where state = 'succeeded') as succeeded,
           count(*) filter (where state = 'dead') as dead,
           count(*) filter (where state = 'cancelled') as cancelled
      from "pgqueue".finished_jobs
     group by queue
)
select coalesce(live.queue, done.queue) as queue,
       coalesce(live.queued, 0) as queued,
       coalesce(live.scheduled, 0) as scheduled,
       coalesce(live.running, 0) as running,
       coalesce(done.succeeded, 0) as succeeded,
       coalesce(done.dead, 0) as dead,
       coalesce(done.cancelled, 0) as cancelled,
       live.oldest_queued_age,
       coalesce((select q.paused from "pgqueue".queues q
                  where q.name = coalesce(live.queue, done.queue)), false) as paused
  from live full join done on done.queue = live.queue;
comment on view "pgqueue".queue_depth is
    'Per queue: queued (due now), scheduled (run_at later), running, and the '
    'finished counts still in history; oldest_queued_age is how long the oldest '
    'due job has waited; paused whether workers lease from it (pause_queue).';
comment on function "pgqueue".lease(text[], integer, text, double precision) is
    'Lease up to p_limit due jobs of the queues that are not paused (priority '
    'desc, run_at, id) with FOR UPDATE SKIP LOCKED; each gets a fresh lease '
    'token and expiry.';
comment on table "pgqueue".queues is
    'Per-queue settings: paused (pause_queue, resume_queue) and keep_succeeded '
    '(configure_queue). A queue needs no row here.';

insert into "pgqueue".migrations (version, name) values (6, 'pause_queues');
commit;

-- 0007_queue_settings_grants
begin;
-- pgqueue 0007: worker roles granted before 0005 and 0006 may set queue options.
--
-- configure_queue (0005), pause_queue and resume_queue (0006) are revoked from
-- PUBLIC and reach worker roles through grant_worker, which grants the functions
-- that exist when it runs. A role granted before those migrations lacked them
-- until grant_worker was run again. Here every role that may lease (what
-- grant_worker gives and grant_producer does not) gets the three; producers get
-- nothing. Later migrations that add a function for workers do the same through
-- _grant_to_workers.

create function "pgqueue"._grant_to_workers(p_function regprocedure)
returns void
language plpgsql as $$
declare
    v_role text;
begin
    for v_role in
        select distinct a.grantee::regrole::text
          from pg_proc p, aclexplode(p.proacl) a
         where p.oid = '"pgqueue".lease(text[], integer, text, double precision)'
                       ::regprocedure
           and a.privilege_type = 'EXECUTE' and a.grantee <> 0
           and a.grantee <> p.proowner
    loop
        execute format('grant execute on function %s to %s', p_function, v_role);
    end loop;
end
$$;
comment on function "pgqueue"._grant_to_workers(regprocedure) is
    'Internal (migrations): grant EXECUTE on a function to every role that may '
    'lease, i.e. the worker roles, those granted before the function existed '
    'included.';
revoke execute on function "pgqueue"._grant_to_workers(regprocedure)
    from public;

select "pgqueue"._grant_to_workers(f)
  from unnest(array['"pgqueue".configure_queue(text, boolean)',
                    '"pgqueue".pause_queue(text)',
                    '"pgqueue".resume_queue(text)']::regprocedure[]) as f;

insert into "pgqueue".migrations (version, name) values (7, 'queue_settings_grants');
commit;

-- 0008_quiet_queues
begin;
-- pgqueue 0008: quiet queues, whose enqueues send no NOTIFY.
--
-- A transaction that NOTIFYs takes a lock that PostgreSQL holds from just
-- before its commit until the commit is durable, and the lock is one for the
-- whole server: such commits run one at a time, each waiting out the WAL flush
-- of the one before. An enqueue NOTIFYs, so every transaction that enqueues,
-- business writes included, commits in single file. Measured (pgbench, 2 cores,
-- PostgreSQL 15, durable commits): enqueue() one job per transaction ran
-- 4,609/s with 1 client and 4,831/s with 8; the same function without the
-- NOTIFY ran 4,927/s and 13,449/s; as shipped here (the NOTIFY skipped after a
-- look at the queue's setting) a quiet queue took 10,891-11,094/s from 8.
--
-- A quiet queue (queues.notify = false, set with set_queue_notify) gets no
-- NOTIFY when jobs are enqueued: by enqueue, and by enqueue_many and the COPY
-- path, which go through _notify. Workers find its jobs by polling, so their
-- pickup latency becomes the workers' poll interval. The rarer transitions
-- still NOTIFY: resume_queue (an operator's "go now"), retry and retry_dead,
-- reap and hand_back.

alter table "pgqueue".queues
    add column notify boolean not null default true;
comment on column "pgqueue".queues.notify is
    'false: enqueueing into this queue sends no NOTIFY (workers find its jobs by '
    'polling). Set with set_queue_notify().';
comment on table "pgqueue".queues is
    'Per-queue settings: paused (pause_queue, resume_queue), keep_succeeded '
    '(configure_queue) and notify (set_queue_notify). A queue needs no row here.';

create function "pgqueue".set_queue_notify(p_queue text, p_notify boolean)
returns void
language sql as $$
    insert into "pgqueue".queues (name, notify) values (p_queue, p_notify)
    on conflict (name) do update set notify = excluded.notify
$$;
comment on function "pgqueue".set_queue_notify(text, boolean) is
    'Make enqueueing into the queue NOTIFY its workers (true, the default) or not '
    '(false: a quiet queue, found by polling).';

-- As the other queue settings: the owner and worker roles, those granted before
-- this migration included (0007).
revoke execute on function "pgqueue".set_queue_notify(text, boolean)
    from public;
select "pgqueue"._grant_to_workers(
    '"pgqueue".set_queue_notify(text, boolean)'::regprocedure);

-- _notify: as in 0002, skipping quiet queues. It runs with the owner's rights:
-- producers call it (bulk enqueue by COPY) and may not read the queues table.
-- plpgsql, so the plan is kept between calls.
create or replace function "pgqueue"._notify(p_queues text[]) returns void
language plpgsql
security definer set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_notify('pgqueue', d.q)
       from (select distinct coalesce(u.q, 'default') as q
               from unnest(p_queues) as u(q)) as d
      where not exists (select 1 from "pgqueue".queues s
                         where s.name = d.q and not s.notify);
end
$$;

-- enqueue: as in 0002 (and 0003's rights), skipping the NOTIFY of quiet queues.
create or replace function "pgqueue".enqueue(
    p_task            text,
    p_args            jsonb default '{}',
    p_queue           text default 'default',
    p_priority        integer default 0,
    p_run_at          timestamptz default null,
    p_max_attempts    integer default 25,
    p_idempotency_key text default null
) returns bigint
language plpgsql
security definer set search_path = pg_catalog, pg_temp
as $$
declare
    v_id bigint;
begin
    if p_priority not between -32768 and 32767 then
        raise exception 'priority must be between -32768 and 32767, got %', p_priority
              using errcode = 'PQ001';
    end if;
    if p_idempotency_key is null then
        insert into "pgqueue".jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, now()), p_max_attempts)
        returning id into v_id;
    else
        if length(p_idempotency_key) > 255 then
            raise exception 'idempotency key longer than 255 characters'
                  using errcode = 'PQ001';
        end if;
        loop
            v_id := nextval('"pgqueue".jobs_id_seq');
            insert into "pgqueue".idempotency_keys (queue, key, job_id)
            values (p_queue, p_idempotency_key, v_id)
            on conflict do nothing;
            if found then
                insert into "pgqueue".jobs
                       (id, queue, task, args, priority, run_at, max_attempts,
                        idempotency_key)
                values (v_id, p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                        coalesce(p_run_at, now()), p_max_attempts, p_idempotency_key);
                exit;
            end if;
            select k.job_id into v_id from "pgqueue".idempotency_keys k
             where k.queue = p_queue and k.key = p_idempotency_key;
            if found then
                return v_id;  -- the key's job exists: nothing new, no NOTIFY
            end if;
            -- The key was pruned between the two statements: claim it again.
        end loop;
    end if;
    perform pg_notify('pgqueue', p_queue)
      where not exists (select 1 from "pgqueue".queues s
                         where s.name = p_queue and not s.notify);
    return v_id;
end
$$;

-- resume_queue: as in 0006, but waking the queue's workers directly rather than
-- through _notify, so that resuming a quiet queue wakes them too.
create or replace function "pgqueue".resume_queue(p_queue text) returns void
language plpgsql as $$
begin
    update "pgqueue".queues set paused = false where name = p_queue;
    perform pg_notify('pgqueue', p_queue);
end
$$;

insert into "pgqueue".migrations (version, name) values (8, 'quiet_queues');
commit;

-- 0009_lease_by_priority_level
begin;
-- pgqueue 0009: lease walks the priority levels, so jobs scheduled for later
-- cost a lease nothing.
--
-- Until now lease() read the queue's fetch index (queue, priority desc, run_at,
-- id) from its start and passed over every job not yet due. Jobs scheduled for
-- later at a higher priority than the due ones, such as a backlog of retries
-- waiting out their backoff, all sat in front of the due jobs: with 1,000,000
-- of them ahead of 1,000 due jobs, a lease of 100 took 47-67 ms against
-- 0.5 ms (EXPLAIN: 6,030 index buffers read for 100 rows).
--
-- Now each queue's priority levels are walked, highest first, with one index
-- descent per level (a loose index scan in a recursive CTE), and each level
-- reads only its due jobs, in (run_at, id) order: an index range that ends at
-- now(). The walk is lazy: the LIMIT stops it at the level that fills the
-- lease. Past 256 levels, the rest of the queue is read in lease order as
-- before. The order is the same as before: priority desc, run_at, id, across
-- the queues named. Measured on 2 cores, PostgreSQL 15 (/tmp harness, medians
-- of 300 calls in rolled-back transactions, old -> new):
--   1,000 due behind 100,000 scheduled at a higher priority, lease(10): 4.4 -> 0.41 ms
--   1,000 due behind 100 levels x 10,000 scheduled, lease(10):          46 -> 1.2 ms
--   one queue of 1,000 due, lease(250):                                2.5 -> 2.3 ms
--   one due job, lease(250):                                          0.50 -> 0.29 ms
--   an empty queue:                                                   0.33 -> 0.18 ms
--   4 queues of 1,000 due, lease(250):                                3.2 -> 3.1 ms
--   100 queues, one due job each at its own priority, lease(100):     1.45 -> 1.78 ms
-- The price: a level that holds only jobs for later costs two descents
-- (~3 us) where the old scan passed its jobs at well under 1 us each, so many
-- sparse levels cost more: one due job behind 1,000 levels of one job each
-- 0.57 -> 1.9 ms; behind 30,000 such levels 1.7 -> 3.6 ms (the cap of 256
-- levels bounds this; walking them all took 174 ms).
create or replace function "pgqueue".lease(
    p_queues        text[],
    p_limit         integer,
    p_worker        text,
    p_lease_seconds double precision default 60
) returns table (
    id bigint, queue text, task text, args jsonb, priority smallint,
    attempts integer, max_attempts integer, lease_token uuid,
    run_at timestamptz, created_at timestamptz, lease_expires_at timestamptz
)
language plpgsql
set jit = off  -- see 0002
-- A LIMIT given as a parameter makes the generic plan look costly (a tenth of
-- the table), so plpgsql planned this statement again on every call. The
-- generic plan is the same index walk; keeping it cut a lease of one job from
-- 0.49 to 0.31 ms and an empty lease from 0.39 to 0.17 ms.
set plan_cache_mode = force_generic_plan
-- A generic plan is made once per connection and kept, so it must not depend
-- on the table's size when it was made: planned on an empty table it read the
-- whole table (a lease(10) took 151 ms once 300,000 jobs had arrived, until
-- the next ANALYZE). Every step here has an index; with sequential scans off
-- the plan is the index walk whatever the statistics said (0.55 ms).
set enable_seqscan = off
as $$
begin
    if p_limit < 0 then
        raise exception 'lease limit must not be negative, got %', p_limit
              using errcode = 'invalid_row_count_in_limit_clause';
    end if;
    return query
    with picked as (
        select c.id
          -- The queues named, once each, that are not paused.
          from (select distinct u.name from unnest(p_queues) as u(name)
                 where not exists (select 1 from "pgqueue".queues p
                                    where p.name = u.name and p.paused)) as q
         cross join lateral (
               -- This queue's levels, highest first: the first with a queued
               -- job (due or not), then each next lower one, one index descent
               -- each. For each level, its due jobs in (run_at, id) order: an
               -- index range that ends at now(). The walk is lazy: the LIMIT
               -- stops it at the level that fills the lease. It walks at most
               -- 256 levels; below the 256th, the jobs are read in lease order
               -- as before 0009, so thousands of levels holding a few jobs for
               -- later each cost their index entries, not two descents apiece.
               with recursive levels(priority, n) as (
                   select (select j.priority from "pgqueue".jobs j
                            where j.queue = q.name and j.state = 'queued'
                            order by j.priority desc
                            limit 1), 1
                   union all
                   select (select j.priority from "pgqueue".jobs j
                            where j.queue = q.name and j.state = 'queued'
                              and j.priority < l.priority
                            order by j.priority desc
                            limit 1), l.n + 1
                     from levels l
                    where l.priority is not null and l.n < 256
               )
               (select d.id, d.priority, d.run_at
                  from levels l
                 cross join lateral (
                       select j.id, j.priority, j.run_at
                         from "pgqueue".jobs j
                        where j.queue = q.name and j.state = 'queued'
                          and j.priority = l.priority and j.run_at <= now()
                        order by j.run_at, j.id
                        limit p_limit
                          for update skip locked) d
                 where l.priority is not null)
               union all
               -- Read only once the walk is exhausted, and only when it
               -- stopped at its 256th level: everything below that level.
               select b.id, b.priority, b.run_at
                 from (select j.id, j.priority, j.run_at
                         from "pgqueue".jobs j
                        where j.queue = q.name and j.state = 'queued'
                          and j.priority < (select l.priority from levels l
                                             where l.n = 256)
                          and j.run_at <= now()
                        order by j.priority desc, j.run_at, j.id
                        limit p_limit
                          for update skip locked) b
               limit p_limit
         ) c
         -- Several queues: each locks up to p_limit, the surplus is released
         -- at commit (as before).
         order by c.priority desc, c.run_at, c.id
         limit p_limit
    ), leased as (
        -- One token per lease call, not per row (see 0002).
        update "pgqueue".jobs j
           set state = 'running',
               lease_token = (select gen_random_uuid()),
               leased_by = p_worker,
               leased_at = now(),
               lease_expires_at = now() + make_interval(secs => p_lease_seconds)
         where j.id = any(array(select p.id from picked p))
        returning j.id, j.queue, j.task, j.args, j.priority, j.attempts,
                  j.max_attempts, j.lease_token, j.run_at, j.created_at,
                  j.lease_expires_at
    )
    select * from leased l order by l.priority desc, l.run_at, l.id;
end
$$;
comment on function "pgqueue".lease(text[], integer, text, double precision) is
    'Lease up to p_limit due jobs of the queues that are not paused (priority '
    'desc, run_at, id) with FOR UPDATE SKIP LOCKED, walking the priority levels; '
    'each gets a fresh lease token and expiry.';

insert into "pgqueue".migrations (version, name) values (9, 'lease_by_priority_level');
commit;

-- 0010_prune_oldest_first
begin;
-- pgqueue 0010: prune reads only the jobs it deletes, so its cost no longer
-- grows with the history it keeps.
--
-- Until now prune() deleted `where f.id in (select ... limit p_limit for update
-- skip locked)`, which PostgreSQL planned as a hash semi join over a sequential
-- scan of all of finished_jobs: every batch read the whole table. With
-- 2,000,000 finished jobs, half past retention, a batch of 10,000 took 270-380 ms
-- (EXPLAIN: Seq Scan on finished_jobs f, 1,970,000 rows), and the time grows
-- with the history. The candidates' scan was no better: finished_at had only a
-- BRIN index, whose ranges widen as pruned pages are reused and never narrow,
-- so once the table had turned over it matched every range.
--
-- Now finished_at has a btree index, the batch is the oldest jobs in
-- finished_at order (a range scan that stops at the cut-off), and the picked
-- jobs are deleted through the primary key. With 2,000,000 finished jobs, the
-- young half first in the heap and a quarter with idempotency keys (2 cores,
-- PostgreSQL 15): a batch of 10,000 took 33-68 ms; a call that found nothing
-- 0.43 ms after vacuum, 7.5-8.8 ms right after a million deletions, against
-- 209-295 ms for the old function. The batch is still chosen with FOR UPDATE
-- SKIP LOCKED, so two prunes at once take different jobs.
--
-- The index costs each completion one more index entry, always at the right
-- end of the index (finished_at is the completion's now()): inserting 500
-- history rows took 2.1-3.1 ms (median 2.3) with it against 1.9-2.0 (median
-- 1.95) with the BRIN index it replaces (pgbench, 4 alternating runs each:
-- ~0.8 us a row). Building it locks finished_jobs against completions for as
-- long as the build takes (0.3 s per million finished jobs here), and dropping
-- the BRIN index locks the table briefly against everything. On a large
-- history, do both beforehand without blocking,
--   create index concurrently finished_jobs_finished_idx
--       on <schema>.finished_jobs (finished_at);
--   drop index concurrently if exists <schema>.finished_jobs_finished_at_idx;
-- and this migration keeps them as they are. An index of that name left
-- invalid by a failed concurrent build stops the migration with an error.
do $$
begin
    if exists (select from pg_index
                where indexrelid = to_regclass(
                          '"pgqueue".finished_jobs_finished_idx')
                  and not indisvalid) then
        raise exception 'finished_jobs_finished_idx is invalid (a failed '
                        'concurrent build?): drop it and migrate again';
    end if;
end
$$;
create index if not exists finished_jobs_finished_idx
    on "pgqueue".finished_jobs (finished_at);
drop index if exists "pgqueue".finished_jobs_finished_at_idx;

create or replace function "pgqueue".prune(
    p_older_than interval default interval '7 days',
    p_limit      integer default 10000,
    p_states     "pgqueue".job_state[] default '{succeeded,cancelled,dead}'
) returns integer
language plpgsql
set jit = off  -- see lease()
as $$
declare
    v_count integer;
begin
    if p_limit < 0 then
        raise exception 'prune limit must not be negative, got %', p_limit
            using errcode = '2201W';
    end if;
    with gone as (
        delete from "pgqueue".finished_jobs f
         where f.id = any(array(
                   select g.id from "pgqueue".finished_jobs g
                    where g.finished_at < now() - p_older_than
                      and g.state = any(p_states)
                    order by g.finished_at
                    limit p_limit
                      for update skip locked))
        returning f.id, f.queue, f.idempotency_key
    ), keys as (
        delete from "pgqueue".idempotency_keys k
         where (k.queue, k.key, k.job_id) in (
                   select gone.queue, gone.idempotency_key, gone.id from gone
                    where gone.idempotency_key is not null)
    )
    select count(*) into v_count from gone;
    return v_count;
end
$$;
comment on function "pgqueue".prune(interval, integer, "pgqueue".job_state[]) is
    'Delete up to p_limit finished jobs older than p_older_than, oldest first, '
    'with their idempotency keys. Returns how many were deleted.';

insert into "pgqueue".migrations (version, name) values (10, 'prune_oldest_first');
commit;

-- 0011_reap_notifies_its_queues
begin;
-- pgqueue 0011: reap wakes the workers of the queues it requeued jobs into,
-- and no longer reads the whole queue to find whom to wake.
--
-- After failing expired leases, reap notified every queue that had a due job,
-- found with `select distinct queue from jobs where state = 'queued' and
-- run_at <= now()`: a sequential scan of the live table. With 1,000,000 queued
-- jobs a reap of one expired lease took 97-108 ms (2 cores, PostgreSQL 15, a
-- new session each time), and every worker reaps every 15 s. It also woke queues
-- that had nothing to do with the reaped jobs, and missed the reaped jobs' own
-- queues when nothing else there was due: a requeued job waits out a backoff,
-- and its workers learn of its run_at from the wake-up.
--
-- Now reap collects the queues of the jobs it put back (state queued) as it
-- goes and notifies those: 3.4-3.8 ms for one expired lease in the same table,
-- planning included.
create or replace function "pgqueue".reap(p_limit integer default 1000)
returns table (id bigint, state "pgqueue".job_state)
language plpgsql
set jit = off  -- see lease()
as $$
declare
    v_job "pgqueue".jobs;
    v_queues text[] := '{}';
begin
    for v_job in
        select * from "pgqueue".jobs j
         where j.state = 'running' and j.lease_expires_at < now()
         order by j.lease_expires_at
         limit p_limit
           for update skip locked
    loop
        id := v_job.id;
        state := "pgqueue"._fail_locked(
            v_job,
            jsonb_build_object('error', 'lease expired: worker '
                               || coalesce(v_job.leased_by, '?')
                               || ' stopped heartbeating', 'kind', 'lease_expired'),
            null);
        if state = 'queued' and not v_job.queue = any(v_queues) then
            v_queues := v_queues || v_job.queue;
        end if;
        return next;
    end loop;
    perform pg_notify('pgqueue', q) from unnest(v_queues) q;
    delete from "pgqueue".workers w
     where w.last_seen < now() - interval '1 hour';
end
$$;
comment on function "pgqueue".reap(integer) is
    'Fail running jobs whose lease expired (counting an attempt), wake the '
    'workers of the queues they went back to, and forget workers silent for an '
    'hour. Returns the jobs it changed and their new state.';

insert into "pgqueue".migrations (version, name) values (11, 'reap_notifies_its_queues');
commit;

-- 0012_enqueue_checks_its_input
begin;
-- pgqueue 0012: enqueue checks the names and keys it is given itself, so that
-- an INSERT into the hot table no longer pays for those checks.
--
-- PostgreSQL prepares a table's CHECK constraints again for every statement
-- that writes to it: it reads each one back from its stored node text
-- (pg_strtok was a third of the profile) and plans it. For a one-row INSERT
-- that is most of the work: into a table shaped like jobs, 4.5 us a row
-- without constraints and 26.5 us with jobs' six (20,000 single-row INSERTs
-- in one transaction; one INSERT of 20,000 rows paid 0.6 us a row for them).
-- Every single enqueue paid it, and each lease, heartbeat and failure paid it
-- once per statement.
--
-- The three checks on names and keys (jobs_queue_name, jobs_task_name,
-- jobs_idempotency_key) move into enqueue and enqueue_many, which raise the
-- same error as before: SQLSTATE 23514 (check_violation) under the old
-- constraint's name, now with the offending value in the message, in the
-- order the table reported them (PQ001 for priority and an overlong key first,
-- then the constraints by name). The Python producer checks the same rules
-- before it sends anything, the COPY path included. jobs_attempts stays: it
-- bounds max_attempts, which guarantee 4 (every failure path ends) rests on,
-- whoever writes the row. So do the two checks on the job's state
-- (jobs_state_live, jobs_lease): they guard pgqueue's own transitions, and the
-- planner uses the first to skip jobs when a query asks for a final state.
--
-- What is given up: a role that INSERTs into jobs directly, bypassing the
-- functions (producers hold INSERT for COPY), is no longer stopped by the
-- table from storing a queue or task name that no worker would take. The
-- table was never an interface (README, "Roles"). And a call with an
-- idempotency key that already exists now fails on a bad name or max_attempts
-- too, where it used to return the existing job's id without looking.
--
-- Dropping the constraints takes jobs' ACCESS EXCLUSIVE lock for an instant,
-- but the wait for it queues every lease and enqueue behind it: the wait is
-- capped at 5 s (lock_timeout). If it times out, nothing has changed; run
-- `pgqueue migrate` again when no long transaction holds jobs.
--
-- Measured on 2 cores, PostgreSQL 15, pgbench -M prepared, one client, one
-- statement per transaction, 3 s runs interleaved, 4 rounds (tps):
--   INSERT into the raw-SQL ceiling's 5-column table            5,358-5,844
--   INSERT into a table shaped like jobs, no checks              5,155-5,502
--   INSERT into jobs as it was (six checks)                      4,367-4,712
--   INSERT into jobs with the three kept                         4,788-5,062
--   enqueue(): 0011                                              3,193-3,691
--              0012                                              3,395-4,086
-- One INSERT of 50,000 rows: 221-226 ms with the six, 185-196 ms with three.
-- Each check costs 2-4 us a statement. Server time of 20,000 enqueue() calls
-- in one transaction: 798-804 ms before, 566-576 ms after; enqueue_many of
-- 50,000 jobs: 269-281 ms before, 248-262 ms after. Bulk enqueue from Python
-- (COPY, 2 x 10,000 jobs, medians of 8 alternating rounds): 142,243 before,
-- 155,705 jobs/s after.

-- _job_input_ok: the rules on one job's input, in one place. Names follow the
-- Python producer's rules (producer.QUEUE_NAME, TASK_NAME), written as * and
-- length() rather than a bounded repetition, which is slower (see 0001), and
-- compared under the "C" collation: a caller's argument may carry a
-- nondeterministic collation, under which PostgreSQL refuses regular
-- expressions. Plain SQL, so the planner inlines it into its callers' cached
-- plans: no call per job. Null where an input is null and nothing else is
-- wrong (the columns' NOT NULL and defaults deal with those).
create function "pgqueue"._job_input_ok(
    p_task text, p_queue text, p_priority integer, p_max_attempts integer,
    p_key text
) returns boolean
language sql immutable
as $$
    select p_priority between -32768 and 32767
       and (length(p_key) between 1 and 255 or p_key is null)
       and p_max_attempts between 1 and 1000
       and p_queue collate "C" ~ '^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$'
       and length(p_queue) <= 128
       and p_task collate "C" ~ '^[A-Za-z_][A-Za-z0-9_.:/-]*$'
       and length(p_task) <= 200
$$;
comment on function "pgqueue"._job_input_ok(text, text, integer, integer, text) is
    'Internal: whether one job''s input follows the rules enqueue checks.';

-- _raise_bad_input: called once _job_input_ok said false, it raises what the
-- table's checks raised: PQ001 for the priority or an overlong key first,
-- then check_violation (23514) under the name of the first rule broken, by
-- constraint name, with the table's name ('pgqueue' is the schema's
-- name as a literal) and now the offending value.
create function "pgqueue"._raise_bad_input(
    p_task text, p_queue text, p_priority integer, p_max_attempts integer,
    p_key text
) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if p_priority not between -32768 and 32767 then
        raise exception 'priority must be between -32768 and 32767, got %', p_priority
              using errcode = 'PQ001';
    elsif length(p_key) > 255 then
        raise exception 'idempotency key longer than 255 characters'
              using errcode = 'PQ001';
    elsif p_max_attempts not between 1 and 1000 then
        raise exception 'max_attempts must be between 1 and 1000, got %',
                        p_max_attempts
              using errcode = 'check_violation', constraint = 'jobs_attempts',
                    table = 'jobs', schema = 'pgqueue';
    elsif p_key = '' then
        raise exception 'idempotency key must not be empty'
              using errcode = 'check_violation', constraint = 'jobs_idempotency_key',
                    table = 'jobs', schema = 'pgqueue';
    -- The queue's rule alone: the other inputs given as valid ones.
    elsif not "pgqueue"._job_input_ok('t', p_queue, 0, 1, null) then
        raise exception 'invalid queue name %: 1-128 characters of letters, digits '
                        'and _ . : / -, not starting with a punctuation mark',
                        quote_literal(p_queue)
              using errcode = 'check_violation', constraint = 'jobs_queue_name',
                    table = 'jobs', schema = 'pgqueue';
    else
        raise exception 'invalid task name %: 1-200 characters of letters, digits '
                        'and _ . : / -, starting with a letter or _',
                        quote_literal(p_task)
              using errcode = 'check_violation', constraint = 'jobs_task_name',
                    table = 'jobs', schema = 'pgqueue';
    end if;
end
$$;
comment on function "pgqueue"._raise_bad_input(
    text, text, integer, integer, text) is
    'Internal: raise the error for input _job_input_ok refused.';

create or replace function "pgqueue".enqueue(
    p_task            text,
    p_args            jsonb default '{}',
    p_queue           text default 'default',
    p_priority        integer default 0,
    p_run_at          timestamptz default null,
    p_max_attempts    integer default 25,
    p_idempotency_key text default null
) returns bigint
language plpgsql
security definer set search_path = pg_catalog, pg_temp
as $$
declare
    v_id    bigint;
    v_quiet boolean;
begin
    if not "pgqueue"._job_input_ok(p_task, p_queue, p_priority,
                                         p_max_attempts, p_idempotency_key) then
        perform "pgqueue"._raise_bad_input(p_task, p_queue, p_priority,
                                                 p_max_attempts, p_idempotency_key);
    end if;
    if p_idempotency_key is null then
        -- The queue's notify setting is read by the INSERT itself: one statement
        -- fewer per enqueue than a separate lookup.
        insert into "pgqueue".jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, now()), p_max_attempts)
        returning id, exists (select 1 from "pgqueue".queues s
                               where s.name = p_queue and not s.notify)
             into v_id, v_quiet;
    else
        loop
            v_id := nextval('"pgqueue".jobs_id_seq');
            insert into "pgqueue".idempotency_keys (queue, key, job_id)
            values (p_queue, p_idempotency_key, v_id)
            on conflict do nothing;
            if found then
                insert into "pgqueue".jobs
                       (id, queue, task, args, priority, run_at, max_attempts,
                        idempotency_key)
                values (v_id, p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                        coalesce(p_run_at, now()), p_max_attempts, p_idempotency_key)
                returning exists (select 1 from "pgqueue".queues s
                                   where s.name = p_queue and not s.notify)
                     into v_quiet;
                exit;
            end if;
            select k.job_id into v_id from "pgqueue".idempotency_keys k
             where k.queue = p_queue and k.key = p_idempotency_key;
            if found then
                return v_id;  -- the key's job exists: nothing new, no NOTIFY
            end if;
            -- The key was pruned between the two statements: claim it again.
        end loop;
    end if;
    if not v_quiet then
        perform pg_notify('pgqueue', p_queue);
    end if;
    return v_id;
end
$$;

-- _check_jobs: enqueue_many's input checks, one pass over the arrays. As the
-- table did, a priority out of range or an overlong key in any job comes
-- first, else the first bad job. A null queue is the default queue, a null
-- max_attempts the default 25.
create function "pgqueue"._check_jobs(
    p_tasks        text[],
    p_queues       text[],
    p_priorities   integer[],
    p_max_attempts integer[],
    p_keys         text[]
) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_bad record;
begin
    select t.task, t.queue, t.priority, t.max_attempts, t.key into v_bad
      from unnest(p_tasks, p_queues, p_priorities, p_max_attempts, p_keys)
           with ordinality as t(task, queue, priority, max_attempts, key, ord)
     where not "pgqueue"._job_input_ok(t.task, t.queue, t.priority,
                                             t.max_attempts, t.key)
     order by coalesce(t.priority not between -32768 and 32767, false) desc,
              coalesce(length(t.key) > 255, false) desc, t.ord
     limit 1;
    if found then
        perform "pgqueue"._raise_bad_input(v_bad.task, v_bad.queue,
                                                 v_bad.priority, v_bad.max_attempts,
                                                 v_bad.key);
    end if;
end
$$;
comment on function "pgqueue"._check_jobs(
    text[], text[], integer[], integer[], text[]) is
    'Internal: enqueue_many''s input checks; raises for the first bad job.';

-- Internal, reached through enqueue and enqueue_many (which run as the owner).
revoke execute on function
    "pgqueue"._job_input_ok(text, text, integer, integer, text),
    "pgqueue"._raise_bad_input(text, text, integer, integer, text),
    "pgqueue"._check_jobs(text[], text[], integer[], integer[], text[])
    from public;

-- enqueue_many: as in 0002 (and 0003's rights), its input checked by _check_jobs
-- (which took over the priority and key-length checks).
create or replace function "pgqueue".enqueue_many(
    p_tasks         text[],
    p_args          jsonb[],
    p_queues        text[] default null,
    p_priorities    integer[] default null,
    p_run_ats       timestamptz[] default null,
    p_max_attempts  integer[] default null,
    p_keys          text[] default null
) returns table (ord bigint, id bigint, created boolean)
language plpgsql
security definer set search_path = pg_catalog, pg_temp
set jit = off  -- see lease()
as $$
declare
    n integer := coalesce(cardinality(p_tasks), 0);
    v_ord bigint[];
    v_id bigint[];
    v_created boolean[];
    v_queue text[];
    v_key text[];
begin
    if coalesce(cardinality(p_args), 0) <> n
       or (p_queues is not null and cardinality(p_queues) <> n)
       or (p_priorities is not null and cardinality(p_priorities) <> n)
       or (p_run_ats is not null and cardinality(p_run_ats) <> n)
       or (p_max_attempts is not null and cardinality(p_max_attempts) <> n)
       or (p_keys is not null and cardinality(p_keys) <> n) then
        raise exception 'enqueue_many: every array must have % elements', n
              using errcode = 'PQ001';
    end if;
    perform "pgqueue"._check_jobs(p_tasks, p_queues, p_priorities,
                                        p_max_attempts, p_keys);

    if not exists (select from unnest(p_keys) k where k is not null) then
        -- No idempotency keys: one INSERT. Ids come from the sequence in insertion
        -- order, which follows ord, so they ascend in input order.
        return query
        with inserted as (
            insert into "pgqueue".jobs
                   (queue, task, args, priority, run_at, max_attempts)
            select coalesce(t.queue, 'default'), t.task, coalesce(t.args, '{}'),
                   coalesce(t.priority, 0), coalesce(t.run_at, now()),
                   coalesce(t.max_attempts, 25)
              from unnest(p_tasks, p_args, p_queues, p_priorities, p_run_ats,
                          p_max_attempts)
                   with ordinality as t(task, args, queue, priority, run_at,
                                        max_attempts, ord)
             order by t.ord
            returning jobs.id
        )
        select row_number() over (order by i.id), i.id, true from inserted i
         order by i.id;
        perform "pgqueue"._notify(coalesce(p_queues, array['default']));
        return;
    end if;

    with input as materialized (
        select t.ord, nextval('"pgqueue".jobs_id_seq') as id, t.task,
               coalesce(t.args, '{}') as args, coalesce(t.queue, 'default') as queue,
               coalesce(t.priority, 0) as priority, coalesce(t.run_at, now()) as run_at,
               coalesce(t.max_attempts, 25) as max_attempts, t.key
          from unnest(p_tasks, p_args, p_queues, p_priorities, p_run_ats,
                      p_max_attempts, p_keys)
               with ordinality as t(task, args, queue, priority, run_at,
                                    max_attempts, key, ord)
    ), won as (
        insert into "pgqueue".idempotency_keys as k (queue, key, job_id)
        select i.queue, i.key, i.id from input i
         where i.key is not null order by i.ord
        on conflict do nothing
        returning k.job_id
    ), inserted as (
        insert into "pgqueue".jobs
               (id, queue, task, args, priority, run_at, max_attempts,
                idempotency_key)
        select i.id, i.queue, i.task, i.args, i.priority, i.run_at, i.max_attempts,
               i.key
          from input i
         where i.key is null or i.id in (select won.job_id from won)
         order by i.ord
        returning jobs.id
    )
    select array_agg(i.ord order by i.ord), array_agg(i.id order by i.ord),
           array_agg(i.id in (select inserted.id from inserted) order by i.ord),
           array_agg(i.queue order by i.ord), array_agg(i.key order by i.ord)
      into v_ord, v_id, v_created, v_queue, v_key
      from input i;

    perform "pgqueue"._notify(v_queue);
    -- Rows that lost their key take the existing job's id. A second statement on
    -- purpose: its snapshot sees a key committed while the insert above waited.
    return query
    select t.ord, case when t.created then t.id else k.job_id end, t.created
      from unnest(v_ord, v_id, v_created, v_queue, v_key)
           as t(ord, id, created, queue, key)
      left join "pgqueue".idempotency_keys k
        on not t.created and k.queue = t.queue and k.key = t.key
     order by t.ord;
end
$$;

set local lock_timeout = '5s';
alter table "pgqueue".jobs
    drop constraint jobs_queue_name,
    drop constraint jobs_task_name,
    drop constraint jobs_idempotency_key;

insert into "pgqueue".migrations (version, name) values (12, 'enqueue_checks_its_input');
commit;

-- 0013_producers_insert_only_what_copy_sends
begin;
-- pgqueue 0013: producers may INSERT into jobs only the columns the bulk COPY
-- sends.
--
-- grant_producer gave producers INSERT on the whole hot table, for the COPY
-- that bulk enqueue streams (id, queue, task, args, priority, run_at,
-- max_attempts). With it a producer could also write the columns that only
-- the transitions own: a row born 'running' with a lease token of its own
-- choosing, attempts and errors already filled in, an idempotency key that
-- no idempotency_keys row stands for. Now a producer gets INSERT on the
-- seven columns COPY sends, and every other column takes its default.
--
-- Producers granted before this migration are found as the roles that may
-- INSERT into jobs but not UPDATE it (workers may do both): their INSERT is
-- revoked and grant_producer run again for them.

create or replace function "pgqueue".grant_producer(p_role text) returns void
language plpgsql as $$
begin
    execute format('grant usage on schema "pgqueue" to %I', p_role);
    execute format('grant execute on function "pgqueue".enqueue('
                   'text, jsonb, text, integer, timestamptz, integer, text) to %I',
                   p_role);
    execute format('grant execute on function "pgqueue".enqueue_many('
                   'text[], jsonb[], text[], integer[], timestamptz[], integer[], '
                   'text[]) to %I', p_role);
    -- Bulk enqueue from Python streams rows with COPY: INSERT on the columns it
    -- sends (not SELECT), ids from the sequence, and the NOTIFY helper.
    execute format('grant insert (id, queue, task, args, priority, run_at, '
                   'max_attempts) on "pgqueue".jobs to %I', p_role);
    execute format('grant usage on sequence "pgqueue".jobs_id_seq to %I',
                   p_role);
    execute format('grant execute on function "pgqueue"._notify(text[]) '
                   'to %I', p_role);
end
$$;

do $$
declare
    v_role text;
begin
    for v_role in
        select distinct pg_get_userbyid(a.grantee)
          from pg_class c, aclexplode(c.relacl) a
         where c.oid = '"pgqueue".jobs'::regclass
           and a.privilege_type = 'INSERT' and a.grantee <> 0
           and a.grantee <> c.relowner
           and not has_table_privilege(a.grantee, c.oid, 'UPDATE')
    loop
        execute format('revoke insert on "pgqueue".jobs from %I', v_role);
        -- The producer's grants as they are now; the others it holds already.
        perform "pgqueue".grant_producer(v_role);
    end loop;
end
$$;

insert into "pgqueue".migrations (version, name) values (13, 'producers_insert_only_what_copy_sends');
commit;

-- 0014_enqueue_names_everything
begin;
-- pgqueue 0014: enqueue runs without switching search_path, and sends its
-- NOTIFY from the INSERT.
--
-- enqueue runs with the owner's rights (SECURITY DEFINER), so a caller must
-- not be able to put objects of its own in front of the ones it uses. Until
-- now a pinned search_path (SET search_path = pg_catalog, pg_temp) saw to
-- that, and on PostgreSQL 15 switching search_path costs every call a GUC
-- save and restore and two recomputations of the path: 7-10 us of server
-- time of an enqueue's ~112. Now enqueue names everything itself: tables and
-- functions with their schema, operators as operator(pg_catalog.=) and so on,
-- so that no search_path a caller sets changes what it calls; the statements
-- it runs name no type (the parameters' types are fixed when the function is
-- created, and bigint and boolean are keywords, not names). _job_input_ok,
-- which PostgreSQL inlines into enqueue under the caller's search_path, is
-- written the same way. This is PostgreSQL's other documented way to write a
-- SECURITY DEFINER function safely ("schema-qualify every reference");
-- tests/reliability/test_privileges.py calls enqueue as a producer whose
-- search_path puts temp tables named like pgqueue's and a schema of raising
-- look-alikes (=, >=, <=, ~, unary -, length, now, nextval, pg_notify) before
-- pg_catalog, and fails if any is reached.
-- enqueue_many and the other definer functions keep the pinned search_path:
-- they run once per batch, where the switch costs nothing measurable.
--
-- The NOTIFY is now part of the INSERT's RETURNING (a CASE, so it is sent only
-- when the queue is not quiet): one statement per enqueue instead of two.
--
-- Measured on 2 cores, PostgreSQL 15, pgbench -M prepared, one client, one
-- enqueue per transaction, 8,000 transactions a run, interleaved rounds (tps,
-- median and range). Copies of the function side by side, 4 rounds:
--   0013's enqueue                                   4,860 (4,497-4,989)
--   the same without the search_path switch          5,224 (4,694-5,597)
--   and the NOTIFY in the INSERT (this migration)    5,386 (5,009-5,455)
-- The schema migrated to 0013 against one migrated to 0014, 5 rounds, later
-- the same day: 5,446 (5,405-5,530) -> 5,608 (5,379-5,710). Through
-- Task.enqueue from Python (8 alternating rounds of 4,000 calls): server time
-- 115 -> 110 us an enqueue, 4,485 -> 4,549 jobs/s (the client's share and the
-- commit are unchanged).

create or replace function "pgqueue"._job_input_ok(
    p_task text, p_queue text, p_priority integer, p_max_attempts integer,
    p_key text
) returns boolean
language sql immutable
as $$
    select p_priority operator(pg_catalog.>=) -32768
       and p_priority operator(pg_catalog.<=) 32767
       and (pg_catalog.length(p_key) operator(pg_catalog.>=) 1
            and pg_catalog.length(p_key) operator(pg_catalog.<=) 255
            or p_key is null)
       and p_max_attempts operator(pg_catalog.>=) 1
       and p_max_attempts operator(pg_catalog.<=) 1000
       and p_queue collate pg_catalog."C"
           operator(pg_catalog.~) '^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$'
       and pg_catalog.length(p_queue) operator(pg_catalog.<=) 128
       and p_task collate pg_catalog."C"
           operator(pg_catalog.~) '^[A-Za-z_][A-Za-z0-9_.:/-]*$'
       and pg_catalog.length(p_task) operator(pg_catalog.<=) 200
$$;

create or replace function "pgqueue".enqueue(
    p_task            text,
    p_args            jsonb default '{}',
    p_queue           text default 'default',
    p_priority        integer default 0,
    p_run_at          timestamptz default null,
    p_max_attempts    integer default 25,
    p_idempotency_key text default null
) returns bigint
language plpgsql
-- No SET search_path: every name below carries its schema (see the header).
security definer
as $$
declare
    v_id   bigint;
    v_sent boolean;  -- what the RETURNING's CASE gives back; not used
begin
    if not "pgqueue"._job_input_ok(p_task, p_queue, p_priority,
                                         p_max_attempts, p_idempotency_key) then
        perform "pgqueue"._raise_bad_input(p_task, p_queue, p_priority,
                                                 p_max_attempts, p_idempotency_key);
    end if;
    if p_idempotency_key is null then
        -- NOTIFY unless the queue is quiet, in the INSERT's own statement. A
        -- CASE fixes the order: the queue's setting is read first.
        insert into "pgqueue".jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, pg_catalog.now()), p_max_attempts)
        returning id,
                  case when exists (select from "pgqueue".queues s
                                     where s.name operator(pg_catalog.=) p_queue
                                       and not s.notify)
                       then false
                       else pg_catalog.pg_notify('pgqueue', p_queue) is null
                  end
             into v_id, v_sent;
        return v_id;
    end if;
    loop
        v_id := pg_catalog.nextval('"pgqueue".jobs_id_seq');
        insert into "pgqueue".idempotency_keys (queue, key, job_id)
        values (p_queue, p_idempotency_key, v_id)
        on conflict do nothing;
        if found then
            insert into "pgqueue".jobs
                   (id, queue, task, args, priority, run_at, max_attempts,
                    idempotency_key)
            values (v_id, p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                    coalesce(p_run_at, pg_catalog.now()), p_max_attempts,
                    p_idempotency_key)
            returning case when exists (select from "pgqueue".queues s
                                         where s.name operator(pg_catalog.=) p_queue
                                           and not s.notify)
                           then false
                           else pg_catalog.pg_notify('pgqueue', p_queue) is null
                      end
                 into v_sent;
            return v_id;
        end if;
        select k.job_id into v_id from "pgqueue".idempotency_keys k
         where k.queue operator(pg_catalog.=) p_queue
           and k.key operator(pg_catalog.=) p_idempotency_key;
        if found then
            return v_id;  -- the key's job exists: nothing new, no NOTIFY
        end if;
        -- The key was pruned between the two statements: claim it again.
    end loop;
end
$$;

insert into "pgqueue".migrations (version, name) values (14, 'enqueue_names_everything');
commit;

-- 0015_fail_many
begin;
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

create function "pgqueue".fail_many(
    p_ids          bigint[],
    p_tokens       uuid[],
    p_errors       jsonb[],
    p_retry_delays double precision[]
) returns table (id bigint, token uuid, state "pgqueue".job_state)
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
          from "pgqueue".jobs j
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
        state := "pgqueue"._fail_locked(v_failed.job, v_failed.error,
                                              v_failed.delay);
        return next;
    end loop;
end
$$;
comment on function "pgqueue".fail_many(
    bigint[], uuid[], jsonb[], double precision[]) is
    'Record failed attempts (fenced by lease token, as fail does for one): each '
    'job is queued again after its delay while attempts remain, else dead. '
    'Returns (id, token, new state) of the jobs whose lease was still held.';

revoke execute on function "pgqueue".fail_many(
    bigint[], uuid[], jsonb[], double precision[]) from public;
select "pgqueue"._grant_to_workers(
    '"pgqueue".fail_many(bigint[], uuid[], jsonb[], double precision[])'
    ::regprocedure);

insert into "pgqueue".migrations (version, name) values (15, 'fail_many');
commit;

-- 0016_notify_only_listeners
begin;
-- pgqueue 0016: an enqueue sends its NOTIFY only while some worker listens.
--
-- PostgreSQL serializes the commits of transactions that NOTIFY: each holds
-- one database-wide lock from the moment it queues its notifications until
-- its commit is flushed, so concurrent producers cannot share a WAL flush.
-- With 8 producers enqueueing one job per transaction (2 cores, PostgreSQL
-- 15, pgbench -M prepared, -T 6, two rounds) the enqueue function ran
-- 5,110-5,254 tps; the same function without its NOTIFY ran 11,670-11,932.
-- A NOTIFY wakes a worker that is waiting; a worker that is busy leasing full
-- batches does not need it, and neither does a queue nobody serves yet.
--
-- The listening locks. A worker about to wait for NOTIFY takes
-- start_listening(): a shared session-level advisory lock on each of 16 keys
-- (one key per stripe, per schema). It lets them go (stop_listening) when a
-- lease comes back full, that is while it has more work than it can take,
-- and takes them again before it next waits. An enqueue tries an exclusive
-- transaction-level lock on the key of its stripe (its backend pid modulo
-- 16): when it gets it, no worker is waiting, and it sends no NOTIFY; when it
-- cannot, some worker waits, and it NOTIFYs as before.
--
-- Why no wake-up is lost: a producer that sent no NOTIFY holds its stripe's
-- lock until its transaction ends, so start_listening waits for that (20 ms
-- at most; then the worker leases and tries again). While it waits, enqueues
-- that try the stripe fail behind it, and NOTIFY. Once
-- start_listening succeeds, every enqueue that sent no NOTIFY has committed
-- or rolled back, and the worker leases once more before it waits, so it
-- sees their jobs; every enqueue after that finds the lock taken and
-- NOTIFYs. Locks are not rows: no snapshot can hide them, so this holds for
-- producers in any isolation level.
--
-- Stripes: producers that try the same key at once conflict, and the loser
-- NOTIFYs (harmless, but serialized again). With 8 producers, 4 stripes ran
-- 9,384-9,556 tps, 16 ran 11,461-11,777. An idle worker holds 16 locks of
-- the server's shared lock table (max_locks_per_transaction x connections).
--
-- The locks live on the worker's lease connection, which it watches while
-- it waits: a backend that goes away takes them along, and the worker
-- reconnects and takes them again. start_listening holds nothing when it
-- fails, whether it timed out or was cancelled part way.
--
-- Workers older than this release LISTEN without taking the locks: while
-- only they serve a queue, its enqueues send no NOTIFY and they find new
-- jobs by polling (every poll interval). Upgrade the workers with the schema.
-- A session of your own that LISTENs for enqueues must call start_listening
-- too.

-- The key of a stripe: the class is pgqueue's (the prune lock uses the class
-- before it); the key tells schemas apart by their channel name.
create function "pgqueue"._listening_key(p_stripe integer) returns integer
language sql immutable
as $$
    select pg_catalog.hashtext('pgqueue') operator(pg_catalog.#) p_stripe
$$;
comment on function "pgqueue"._listening_key(integer) is
    'Internal: the second half of the advisory lock key of a listening stripe '
    '(the first is 1885827446).';

-- Inlined into enqueue, which runs as its owner under the caller's
-- search_path: every name carries its schema (see 0014).
create function "pgqueue"._nobody_listening() returns boolean
language sql volatile
as $$
    select pg_catalog.pg_try_advisory_xact_lock(
               1885827446,
               "pgqueue"._listening_key(
                   pg_catalog.pg_backend_pid() operator(pg_catalog.%) 16))
$$;
comment on function "pgqueue"._nobody_listening() is
    'Internal: true when no worker waits for NOTIFY; this transaction then '
    'holds its stripe''s listening lock until it ends, so no worker starts '
    'waiting before its jobs are visible.';

create function "pgqueue".start_listening(p_wait_ms integer default 20)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_taken  integer := 0;
    v_stripe integer;
    v_old    text := current_setting('lock_timeout');
begin
    -- Waits (up to p_wait_ms for each stripe) for producers whose transaction
    -- sent no NOTIFY to end. While this waits, a producer's try of the same
    -- stripe fails behind it, so new enqueues NOTIFY already.
    perform set_config('lock_timeout', greatest(p_wait_ms, 1)::text || 'ms', true);
    begin
        while v_taken < 16 loop
            perform pg_advisory_lock_shared(
                1885827446, "pgqueue"._listening_key(v_taken));
            v_taken := v_taken + 1;
        end loop;
    exception
        when lock_not_available then
            -- A producer's transaction is still open: let go of the stripes
            -- taken (session locks outlive the failed block); the caller tries
            -- again.
            for v_stripe in 0 .. v_taken - 1 loop
                perform pg_advisory_unlock_shared(
                    1885827446, "pgqueue"._listening_key(v_stripe));
            end loop;
            perform set_config('lock_timeout', v_old, true);
            return false;
        when query_canceled or others then
            -- Cancelled (statement_timeout, a cancel request) or failed part
            -- way: hold nothing, so that what the caller believes is true.
            for v_stripe in 0 .. v_taken - 1 loop
                perform pg_advisory_unlock_shared(
                    1885827446, "pgqueue"._listening_key(v_stripe));
            end loop;
            raise;
    end;
    perform set_config('lock_timeout', v_old, true);
    return true;
end
$$;
comment on function "pgqueue".start_listening(integer) is
    'Tell producers that this session waits for NOTIFY: takes the 16 listening '
    'locks (shared, for the session), all or none, waiting up to p_wait_ms for '
    'each. False when a producer''s transaction that sent no NOTIFY stayed open '
    'that long: try again. Call it once, then lease before waiting.';

create function "pgqueue".stop_listening() returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_stripe integer;
begin
    for v_stripe in 0 .. 15 loop
        perform pg_advisory_unlock_shared(
            1885827446, "pgqueue"._listening_key(v_stripe));
    end loop;
end
$$;
comment on function "pgqueue".stop_listening() is
    'Let go of the listening locks start_listening took: enqueues stop '
    'NOTIFYing for this session. Call it only after start_listening returned '
    'true (a lock not held gives a WARNING).';

revoke execute on function "pgqueue"._listening_key(integer) from public;
revoke execute on function "pgqueue"._nobody_listening() from public;
revoke execute on function "pgqueue".start_listening(integer) from public;
revoke execute on function "pgqueue".stop_listening() from public;
-- start_listening and stop_listening run with the caller's rights and call
-- _listening_key: worker roles need all three (grant_worker grants every
-- function to roles granted from now on).
select "pgqueue"._grant_to_workers(f)
  from unnest(array['"pgqueue".start_listening(integer)',
                    '"pgqueue".stop_listening()',
                    '"pgqueue"._listening_key(integer)']::regprocedure[]) as f;

-- _notify (enqueue_many, the COPY path, hand_back, reap, retry, resume_queue):
-- as in 0008, and only while a worker listens.
create or replace function "pgqueue"._notify(p_queues text[]) returns void
language plpgsql
security definer set search_path = pg_catalog, pg_temp
as $$
declare
    v_queues text[];
begin
    v_queues := array(
        select d.q
          from (select distinct coalesce(u.q, 'default') as q
                  from unnest(p_queues) as u(q)) as d
         where not exists (select 1 from "pgqueue".queues s
                            where s.name = d.q and not s.notify));
    -- Quiet queues only: no listening lock is tried (and held), as in enqueue.
    if cardinality(v_queues) = 0 then
        return;
    end if;
    if "pgqueue"._nobody_listening() then
        return;
    end if;
    perform pg_notify('pgqueue', q) from unnest(v_queues) as q;
end
$$;

-- enqueue: as in 0014, and the NOTIFY only while a worker listens.
create or replace function "pgqueue".enqueue(
    p_task            text,
    p_args            jsonb default '{}',
    p_queue           text default 'default',
    p_priority        integer default 0,
    p_run_at          timestamptz default null,
    p_max_attempts    integer default 25,
    p_idempotency_key text default null
) returns bigint
language plpgsql
-- No SET search_path: every name below carries its schema (see the header).
security definer
as $$
declare
    v_id   bigint;
    v_sent boolean;  -- what the RETURNING's CASE gives back; not used
begin
    if not "pgqueue"._job_input_ok(p_task, p_queue, p_priority,
                                         p_max_attempts, p_idempotency_key) then
        perform "pgqueue"._raise_bad_input(p_task, p_queue, p_priority,
                                                 p_max_attempts, p_idempotency_key);
    end if;
    if p_idempotency_key is null then
        -- NOTIFY unless the queue is quiet or no worker listens, in the
        -- INSERT's own statement. A CASE fixes the order: the queue's setting
        -- is read first, then the listening lock is tried.
        insert into "pgqueue".jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, pg_catalog.now()), p_max_attempts)
        returning id,
                  case when exists (select from "pgqueue".queues s
                                     where s.name operator(pg_catalog.=) p_queue
                                       and not s.notify)
                       then false
                       when "pgqueue"._nobody_listening() then false
                       else pg_catalog.pg_notify('pgqueue', p_queue) is null
                  end
             into v_id, v_sent;
        return v_id;
    end if;
    loop
        v_id := pg_catalog.nextval('"pgqueue".jobs_id_seq');
        insert into "pgqueue".idempotency_keys (queue, key, job_id)
        values (p_queue, p_idempotency_key, v_id)
        on conflict do nothing;
        if found then
            insert into "pgqueue".jobs
                   (id, queue, task, args, priority, run_at, max_attempts,
                    idempotency_key)
            values (v_id, p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                    coalesce(p_run_at, pg_catalog.now()), p_max_attempts,
                    p_idempotency_key)
            returning case when exists (select from "pgqueue".queues s
                                         where s.name operator(pg_catalog.=) p_queue
                                           and not s.notify)
                           then false
                           when "pgqueue"._nobody_listening() then false
                           else pg_catalog.pg_notify('pgqueue', p_queue) is null
                      end
                 into v_sent;
            return v_id;
        end if;
        select k.job_id into v_id from "pgqueue".idempotency_keys k
         where k.queue operator(pg_catalog.=) p_queue
           and k.key operator(pg_catalog.=) p_idempotency_key;
        if found then
            return v_id;  -- the key's job exists: nothing new, no NOTIFY
        end if;
        -- The key was pruned between the two statements: claim it again.
    end loop;
end
$$;

insert into "pgqueue".migrations (version, name) values (16, 'notify_only_listeners');
commit;

-- 0017_hand_back_skips_completing_rows
begin;
-- pgqueue 0017: hand_back skips the rows a completion in flight has locked.
--
-- A worker that stops hands back the jobs it did not finish. One of them may
-- be completing in a transaction still open: in a transaction batch's careful
-- path (txbatch.py) each job's fenced completion holds its row lock until the
-- batch commits, after the handlers behind it have run. hand_back's UPDATE
-- waited for that lock, so a stopping worker waited for its slowest batch
-- mate, past its shutdown grace (20 s with a grace of 1 s, measured). The
-- worker now leaves out the jobs it knows are completing, and SKIP LOCKED
-- covers a completion that started as the worker stopped. A job skipped here
-- is completed by that transaction or, if it rolls back, waits out its lease
-- and is reaped, as after a crash.
create or replace function "pgqueue".hand_back(p_ids bigint[], p_tokens uuid[])
returns setof bigint
language plpgsql
set enable_nestloop = off  -- see complete()
set jit = off
as $$
declare
    v_queues text[];
begin
    with free as (
        -- Read committed: a row changed since this statement's snapshot is
        -- checked again, token included, once its lock is taken.
        select j.id
          from "pgqueue".jobs j, unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
           for update of j skip locked
    ), back as (
        update "pgqueue".jobs j
           set state = 'queued', run_at = least(j.run_at, now()), lease_token = null,
               leased_by = null, leased_at = null, lease_expires_at = null
          from free
         where j.id = free.id
        returning j.id, j.queue
    )
    select array_agg(back.id), array_agg(distinct back.queue)
      into p_ids, v_queues from back;
    perform pg_notify('pgqueue', q) from unnest(v_queues) q;
    return query select unnest(p_ids);
end
$$;
comment on function "pgqueue".hand_back(bigint[], uuid[]) is
    'Return running jobs to queued without counting an attempt (graceful '
    'shutdown). Fenced by token; skips rows locked by a completion in flight. '
    'Returns the ids handed back.';

insert into "pgqueue".migrations (version, name) values (17, 'hand_back_skips_completing_rows');
commit;

-- 0018_enqueue_many_claims_keys_again
begin;
-- pgqueue 0018: enqueue_many claims a key again when its job left between its
-- two statements, and takes keys in one order.
--
-- A row whose idempotency key was taken gets the existing job's id from a
-- second statement (a newer snapshot: it sees a key committed while the first
-- waited). When that job left in between (pruned, or succeeded in a queue that
-- keeps no succeeded jobs, either of which deletes its key), the lookup found
-- nothing: the row came back with a NULL id and no job was made. enqueue() has
-- looped on this case since 0002; now enqueue_many does as well, through
-- enqueue() for each such row (rare: 5 rows in 10,066 calls of a stress loop
-- that pruned as fast as it enqueued).
--
-- Keys were inserted in input order, so two calls holding the same keys in
-- different orders could each wait for a key the other had inserted: a
-- deadlock. They are inserted in (queue, key) order now; the ids were fixed
-- before (input), so nothing else changes.
create or replace function "pgqueue".enqueue_many(
    p_tasks         text[],
    p_args          jsonb[],
    p_queues        text[] default null,
    p_priorities    integer[] default null,
    p_run_ats       timestamptz[] default null,
    p_max_attempts  integer[] default null,
    p_keys          text[] default null
) returns table (ord bigint, id bigint, created boolean)
language plpgsql
security definer set search_path = pg_catalog, pg_temp
set jit = off  -- see lease()
as $$
declare
    n integer := coalesce(cardinality(p_tasks), 0);
    v_ord bigint[];
    v_id bigint[];
    v_created boolean[];
    v_queue text[];
    v_key text[];
    r record;
begin
    if coalesce(cardinality(p_args), 0) <> n
       or (p_queues is not null and cardinality(p_queues) <> n)
       or (p_priorities is not null and cardinality(p_priorities) <> n)
       or (p_run_ats is not null and cardinality(p_run_ats) <> n)
       or (p_max_attempts is not null and cardinality(p_max_attempts) <> n)
       or (p_keys is not null and cardinality(p_keys) <> n) then
        raise exception 'enqueue_many: every array must have % elements', n
              using errcode = 'PQ001';
    end if;
    perform "pgqueue"._check_jobs(p_tasks, p_queues, p_priorities,
                                        p_max_attempts, p_keys);

    if not exists (select from unnest(p_keys) k where k is not null) then
        -- No idempotency keys: one INSERT. Ids come from the sequence in insertion
        -- order, which follows ord, so they ascend in input order.
        return query
        with inserted as (
            insert into "pgqueue".jobs
                   (queue, task, args, priority, run_at, max_attempts)
            select coalesce(t.queue, 'default'), t.task, coalesce(t.args, '{}'),
                   coalesce(t.priority, 0), coalesce(t.run_at, now()),
                   coalesce(t.max_attempts, 25)
              from unnest(p_tasks, p_args, p_queues, p_priorities, p_run_ats,
                          p_max_attempts)
                   with ordinality as t(task, args, queue, priority, run_at,
                                        max_attempts, ord)
             order by t.ord
            returning jobs.id
        )
        select row_number() over (order by i.id), i.id, true from inserted i
         order by i.id;
        perform "pgqueue"._notify(coalesce(p_queues, array['default']));
        return;
    end if;

    with input as materialized (
        select t.ord, nextval('"pgqueue".jobs_id_seq') as id, t.task,
               coalesce(t.args, '{}') as args, coalesce(t.queue, 'default') as queue,
               coalesce(t.priority, 0) as priority, coalesce(t.run_at, now()) as run_at,
               coalesce(t.max_attempts, 25) as max_attempts, t.key
          from unnest(p_tasks, p_args, p_queues, p_priorities, p_run_ats,
                      p_max_attempts, p_keys)
               with ordinality as t(task, args, queue, priority, run_at,
                                    max_attempts, key, ord)
    ), won as (
        insert into "pgqueue".idempotency_keys as k (queue, key, job_id)
        select i.queue, i.key, i.id from input i
         where i.key is not null order by i.queue, i.key
        on conflict do nothing
        returning k.job_id
    ), inserted as (
        insert into "pgqueue".jobs
               (id, queue, task, args, priority, run_at, max_attempts,
                idempotency_key)
        select i.id, i.queue, i.task, i.args, i.priority, i.run_at, i.max_attempts,
               i.key
          from input i
         where i.key is null or i.id in (select won.job_id from won)
         order by i.ord
        returning jobs.id
    )
    select array_agg(i.ord order by i.ord), array_agg(i.id order by i.ord),
           array_agg(i.id in (select inserted.id from inserted) order by i.ord),
           array_agg(i.queue order by i.ord), array_agg(i.key order by i.ord)
      into v_ord, v_id, v_created, v_queue, v_key
      from input i;

    perform "pgqueue"._notify(v_queue);
    -- Rows that lost their key take the existing job's id. A second statement on
    -- purpose: its snapshot sees a key committed while the insert above waited.
    for r in
        select t.ord, t.id, t.created, t.queue, t.key, k.job_id as existing
          from unnest(v_ord, v_id, v_created, v_queue, v_key)
               as t(ord, id, created, queue, key)
          left join "pgqueue".idempotency_keys k
            on not t.created and k.queue = t.queue and k.key = t.key
         order by t.ord
    loop
        ord := r.ord;
        if r.created then
            id := r.id;
            created := true;
        elsif r.existing is not null then
            id := r.existing;
            created := false;
        else
            -- The key's job left in between: claim the key again, as enqueue()
            -- does. It made the job if the id it returns is the one it drew.
            id := "pgqueue".enqueue(
                p_tasks[r.ord], p_args[r.ord], r.queue,
                coalesce(p_priorities[r.ord], 0), p_run_ats[r.ord],
                coalesce(p_max_attempts[r.ord], 25), r.key);
            created := id = currval('"pgqueue".jobs_id_seq');
        end if;
        return next;
    end loop;
end
$$;

insert into "pgqueue".migrations (version, name) values (18, 'enqueue_many_claims_keys_again');
commit;

-- 0019_lease_lengths_are_checked
begin;
-- pgqueue 0019: lease and heartbeat refuse a lease length that is not a
-- positive number of seconds, at most a year.
--
-- A NULL length made a NULL expiry: the job stayed running, and reap (which
-- looks for expiries in the past) never took it back, so a crash of its worker
-- lost it for good. A negative or zero length made a lease that had expired
-- before its job started, so the next reap ran it again beside the first
-- worker; NaN and infinity stopped the lease with a bare "interval out of
-- range". The worker never sends these (it checks its options, at most a
-- year); SQL callers get a clear error now (22023), and nothing is leased or
-- renewed.
create function "pgqueue"._check_lease_seconds(p_lease_seconds double precision)
returns void
language plpgsql immutable
as $$
begin
    -- NaN compares above every number, so it fails the second test.
    if p_lease_seconds is null
       or not (p_lease_seconds > 0 and p_lease_seconds <= 31622400) then
        raise exception 'lease length must be a number of seconds above 0 and '
                        'at most 31622400 (366 days), got %',
                        coalesce(p_lease_seconds::text, 'null')
              using errcode = 'invalid_parameter_value';
    end if;
end
$$;
comment on function "pgqueue"._check_lease_seconds(double precision) is
    'Internal: raises 22023 unless the lease length is above 0 and at most '
    '366 days (lease, heartbeat).';
revoke execute on function "pgqueue"._check_lease_seconds(double precision)
    from public;
select "pgqueue"._grant_to_workers(
    '"pgqueue"._check_lease_seconds(double precision)'::regprocedure);

-- lease: as in 0009, and the lease length is checked first.
create or replace function "pgqueue".lease(
    p_queues        text[],
    p_limit         integer,
    p_worker        text,
    p_lease_seconds double precision default 60
) returns table (
    id bigint, queue text, task text, args jsonb, priority smallint,
    attempts integer, max_attempts integer, lease_token uuid,
    run_at timestamptz, created_at timestamptz, lease_expires_at timestamptz
)
language plpgsql
set jit = off  -- see 0002
-- A LIMIT given as a parameter makes the generic plan look costly (a tenth of
-- the table), so plpgsql planned this statement again on every call. The
-- generic plan is the same index walk; keeping it cut a lease of one job from
-- 0.49 to 0.31 ms and an empty lease from 0.39 to 0.17 ms.
set plan_cache_mode = force_generic_plan
-- A generic plan is made once per connection and kept, so it must not depend
-- on the table's size when it was made: planned on an empty table it read the
-- whole table (a lease(10) took 151 ms once 300,000 jobs had arrived, until
-- the next ANALYZE). Every step here has an index; with sequential scans off
-- the plan is the index walk whatever the statistics said (0.55 ms).
set enable_seqscan = off
as $$
begin
    perform "pgqueue"._check_lease_seconds(p_lease_seconds);
    if p_limit < 0 then
        raise exception 'lease limit must not be negative, got %', p_limit
              using errcode = 'invalid_row_count_in_limit_clause';
    end if;
    return query
    with picked as (
        select c.id
          -- The queues named, once each, that are not paused.
          from (select distinct u.name from unnest(p_queues) as u(name)
                 where not exists (select 1 from "pgqueue".queues p
                                    where p.name = u.name and p.paused)) as q
         cross join lateral (
               -- This queue's levels, highest first: the first with a queued
               -- job (due or not), then each next lower one, one index descent
               -- each. For each level, its due jobs in (run_at, id) order: an
               -- index range that ends at now(). The walk is lazy: the LIMIT
               -- stops it at the level that fills the lease. It walks at most
               -- 256 levels; below the 256th, the jobs are read in lease order
               -- as before 0009, so thousands of levels holding a few jobs for
               -- later each cost their index entries, not two descents apiece.
               with recursive levels(priority, n) as (
                   select (select j.priority from "pgqueue".jobs j
                            where j.queue = q.name and j.state = 'queued'
                            order by j.priority desc
                            limit 1), 1
                   union all
                   select (select j.priority from "pgqueue".jobs j
                            where j.queue = q.name and j.state = 'queued'
                              and j.priority < l.priority
                            order by j.priority desc
                            limit 1), l.n + 1
                     from levels l
                    where l.priority is not null and l.n < 256
               )
               (select d.id, d.priority, d.run_at
                  from levels l
                 cross join lateral (
                       select j.id, j.priority, j.run_at
                         from "pgqueue".jobs j
                        where j.queue = q.name and j.state = 'queued'
                          and j.priority = l.priority and j.run_at <= now()
                        order by j.run_at, j.id
                        limit p_limit
                          for update skip locked) d
                 where l.priority is not null)
               union all
               -- Read only once the walk is exhausted, and only when it
               -- stopped at its 256th level: everything below that level.
               select b.id, b.priority, b.run_at
                 from (select j.id, j.priority, j.run_at
                         from "pgqueue".jobs j
                        where j.queue = q.name and j.state = 'queued'
                          and j.priority < (select l.priority from levels l
                                             where l.n = 256)
                          and j.run_at <= now()
                        order by j.priority desc, j.run_at, j.id
                        limit p_limit
                          for update skip locked) b
               limit p_limit
         ) c
         -- Several queues: each locks up to p_limit, the surplus is released
         -- at commit (as before).
         order by c.priority desc, c.run_at, c.id
         limit p_limit
    ), leased as (
        -- One token per lease call, not per row (see 0002).
        update "pgqueue".jobs j
           set state = 'running',
               lease_token = (select gen_random_uuid()),
               leased_by = p_worker,
               leased_at = now(),
               lease_expires_at = now() + make_interval(secs => p_lease_seconds)
         where j.id = any(array(select p.id from picked p))
        returning j.id, j.queue, j.task, j.args, j.priority, j.attempts,
                  j.max_attempts, j.lease_token, j.run_at, j.created_at,
                  j.lease_expires_at
    )
    select * from leased l order by l.priority desc, l.run_at, l.id;
end
$$;

-- heartbeat: as in 0005, and the lease length is checked first.
create or replace function "pgqueue".heartbeat(
    p_worker        text,
    p_ids           bigint[],
    p_tokens        uuid[],
    p_lease_seconds double precision default 60
) returns setof bigint
language sql
set enable_nestloop = off
set jit = off
as $$
    select "pgqueue"._check_lease_seconds(p_lease_seconds);
    update "pgqueue".workers set last_seen = now() where id = p_worker;
    -- SKIP LOCKED: a row locked by a completion not yet committed (a batch of
    -- transactional jobs, txbatch.py) is skipped rather than waited for, so one
    -- long transaction never stalls the heartbeat of every other job.
    update "pgqueue".jobs j
       set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where j.id = any(array(
               select h.id
                 from "pgqueue".jobs h
                 join unnest(p_ids, p_tokens) as t(id, token)
                   on h.id = t.id and h.lease_token = t.token
                where h.id = any(p_ids)
                  for update of h skip locked))
    returning j.id
$$;

insert into "pgqueue".migrations (version, name) values (19, 'lease_lengths_are_checked');
commit;

-- 0020_completions_wait_briefly_for_row_locks
begin;
-- pgqueue 0020: the worker's completions and failures wait only briefly for a
-- row lock.
--
-- A worker writes its completions (and its failures) one statement at a time.
-- When another session held the row of one of them (a transaction that ran
-- SELECT ... FOR UPDATE on pgqueue.jobs and stayed open), the statement waited
-- for that lock until the worker's deadline cancelled it, and then again, with
-- every completion and failure of the worker held up behind it; at shutdown
-- they were dropped, and their jobs ran again once their leases ran out.
--
-- complete_waiting and fail_many_waiting are complete and fail_many with a
-- lock wait of the caller's choosing: they set lock_timeout for the rest of
-- the transaction (the worker's statement is a transaction of its own), so
-- that one gives up with 55P03 (lock_not_available), and the worker writes
-- the others and sets the locked one aside for a while (worker.py). The
-- worker waits a quarter of its deadline (--db-timeout), at most 2 s, so its
-- own cancel at half the deadline never comes first. complete and fail_many
-- themselves are unchanged: complete_all calls complete inside a batch's
-- transaction, where a lock error would run the batch's handlers again.
create function "pgqueue"._wait_for_locks_at_most(p_lock_wait_ms integer)
returns void
language plpgsql
as $$
begin
    if p_lock_wait_ms is null or p_lock_wait_ms < 1 then
        raise exception 'lock wait must be at least 1 ms, got %',
                        coalesce(p_lock_wait_ms::text, 'null')
              using errcode = 'invalid_parameter_value';
    end if;
    perform pg_catalog.set_config('lock_timeout', p_lock_wait_ms::text, true);
end
$$;
comment on function "pgqueue"._wait_for_locks_at_most(integer) is
    'Internal: lock_timeout until the end of the transaction (22023 under 1 ms).';

create function "pgqueue".complete_waiting(
    p_ids          bigint[],
    p_tokens       uuid[],
    p_results      jsonb[],
    p_lock_wait_ms integer
) returns setof bigint
language plpgsql
as $$
begin
    perform "pgqueue"._wait_for_locks_at_most(p_lock_wait_ms);
    return query select c from "pgqueue".complete(p_ids, p_tokens, p_results) c;
end
$$;
comment on function "pgqueue".complete_waiting(bigint[], uuid[], jsonb[], integer) is
    'complete(), waiting at most p_lock_wait_ms for a row lock (55P03 after '
    'that); sets lock_timeout until the end of the transaction. The worker''s '
    'batched completions.';

create function "pgqueue".fail_many_waiting(
    p_ids          bigint[],
    p_tokens       uuid[],
    p_errors       jsonb[],
    p_delays       double precision[],
    p_lock_wait_ms integer
) returns table (id bigint, token uuid, state "pgqueue".job_state)
language plpgsql
as $$
begin
    perform "pgqueue"._wait_for_locks_at_most(p_lock_wait_ms);
    return query select f.id, f.token, f.state
                   from "pgqueue".fail_many(p_ids, p_tokens, p_errors, p_delays) f;
end
$$;
comment on function "pgqueue".fail_many_waiting(
    bigint[], uuid[], jsonb[], double precision[], integer) is
    'fail_many(), waiting at most p_lock_wait_ms for a row lock (55P03 after '
    'that); sets lock_timeout until the end of the transaction. The worker''s '
    'batched failures.';

revoke execute on function "pgqueue"._wait_for_locks_at_most(integer)
    from public;
revoke execute on function "pgqueue".complete_waiting(
    bigint[], uuid[], jsonb[], integer) from public;
revoke execute on function "pgqueue".fail_many_waiting(
    bigint[], uuid[], jsonb[], double precision[], integer) from public;
select "pgqueue"._grant_to_workers(f)
  from unnest(array[
      '"pgqueue"._wait_for_locks_at_most(integer)',
      '"pgqueue".complete_waiting(bigint[], uuid[], jsonb[], integer)',
      '"pgqueue".fail_many_waiting(bigint[], uuid[], jsonb[], double precision[], integer)'
  ]::regprocedure[]) as f;

insert into "pgqueue".migrations (version, name) values (20, 'completions_wait_briefly_for_row_locks');
commit;

-- 0021_worker_rows_follow_their_process
begin;
-- pgqueue 0021: a worker's row describes the process that registered last; no
-- pgqueue function is left to PUBLIC.
--
-- register_worker kept the first process's hostname, pid, queues and
-- started_at when an id was registered again: a fixed worker id (a pod's
-- name, say) reused by the next process while the last one was still in its
-- grace showed the old process. It now records the new one, and keeps
-- started_at only when the same process registers again, which a worker now
-- does at every reap (worker.py): reap deletes the rows of workers silent for
-- an hour, and a live worker's row went for good when its heartbeats were an
-- hour or more apart (a lease of 3 hours or more), or when it came back after
-- an hour stopped (SIGSTOP) or cut off from the database.
--
-- _forget_keys (0005) stayed executable by PUBLIC so that worker roles granted
-- before it existed could run complete(), which calls it with their rights.
-- Those roles (the ones that may lease) now get it by name, and PUBLIC loses it.
create or replace function "pgqueue".register_worker(
    p_worker text, p_hostname text, p_pid integer, p_queues text[])
returns void
language sql as $$
    insert into "pgqueue".workers as w (id, hostname, pid, queues)
    values (p_worker, p_hostname, p_pid, p_queues)
    on conflict (id) do update
       set hostname = excluded.hostname,
           pid = excluded.pid,
           queues = excluded.queues,
           started_at = case when w.hostname = excluded.hostname
                              and w.pid = excluded.pid
                             then w.started_at
                             else now() end,
           last_seen = now()
$$;
comment on function "pgqueue".register_worker(text, text, integer, text[]) is
    'Record a worker process as alive (again: its row then describes the '
    'process that registered last).';

select "pgqueue"._grant_to_workers(
    '"pgqueue"._forget_keys(text[], text[], bigint[])'::regprocedure);
revoke execute on function "pgqueue"._forget_keys(text[], text[], bigint[])
    from public;

comment on table "pgqueue".migrations is
    'The migrations applied to this schema (pgqueue migrate).';

insert into "pgqueue".migrations (version, name) values (21, 'worker_rows_follow_their_process');
commit;

-- 0022_run_at_within_what_clients_read
begin;
-- pgqueue 0022: a job's run_at stays within the years clients can read.
--
-- Python's datetime holds years 1 to 9999. enqueue and enqueue_many took any
-- run_at, 'infinity' and '-infinity' included, and so did a producer's COPY:
-- a worker whose lease met such a row could not read the lease's answer,
-- after the database had leased the whole batch, so every job leased with it
-- waited out its lease and was reaped with an attempt counted (dead, with one
-- attempt allowed), none of them run; 'infinity' made next_run_at's
-- arithmetic fail at every poll, and '-infinity' that of queue_depth
-- (pgqueue stats). The pgqueue Python API refused them already.
--
-- A day's margin on either side keeps the value readable in any time zone.
-- The check comes first, NOT VALID (no scan of the table under its
-- strongest lock), so that no new row can be written out of range; then the
-- rows already out of range, all of them now visible, are brought to its edge,
-- so that a lease that meets one can write it (the check holds for every row
-- written). The other way round, a row committed between the two escaped the
-- UPDATE, and every lease of its queue then failed on the check. The lock is
-- waited for at most 5 s, as in 0012: behind it every enqueue and lease would
-- wait too; migrate again when the transaction that held it is gone.
set local lock_timeout = '5s';
alter table "pgqueue".jobs
    add constraint jobs_run_at_range check (
        run_at >= timestamptz '0001-01-02 00:00:00+00'
        and run_at <= timestamptz '9999-12-30 00:00:00+00') not valid;
comment on constraint jobs_run_at_range on "pgqueue".jobs is
    'run_at within the years clients read (Python: 1 to 9999), a day inside '
    'them for any time zone.';

update "pgqueue".jobs
   set run_at = greatest(
           least(run_at, timestamptz '9999-12-30 00:00:00+00'),
           timestamptz '0001-01-02 00:00:00+00')
 where not (run_at >= timestamptz '0001-01-02 00:00:00+00'
            and run_at <= timestamptz '9999-12-30 00:00:00+00');

insert into "pgqueue".migrations (version, name) values (22, 'run_at_within_what_clients_read');
commit;

-- 0023_prune_refuses_a_negative_age
begin;
-- pgqueue 0023: prune refuses an age that is negative or missing.
--
-- prune('-1 hour') deleted every finished job, those finished a moment ago
-- included (older than an hour from now), and a NULL age or NULL states
-- deleted nothing without a word. The CLI and the worker never send either;
-- an operator's own SQL, or an age computed by a script that went wrong, did.
-- Each now raises 22023 (invalid_parameter_value). The rest is 0010's prune.
create or replace function "pgqueue".prune(
    p_older_than interval default interval '7 days',
    p_limit      integer default 10000,
    p_states     "pgqueue".job_state[] default '{succeeded,cancelled,dead}'
) returns integer
language plpgsql
set jit = off  -- see lease()
as $$
declare
    v_count integer;
begin
    if p_limit < 0 then
        raise exception 'prune limit must not be negative, got %', p_limit
            using errcode = '2201W';
    end if;
    if p_older_than is null or p_older_than < interval '0' then
        raise exception 'prune needs an age of 0 or more, got %',
                        coalesce(p_older_than::text, 'null')
            using errcode = 'invalid_parameter_value';
    end if;
    if p_states is null then
        raise exception 'prune needs the states to delete, got null'
            using errcode = 'invalid_parameter_value';
    end if;
    with gone as (
        delete from "pgqueue".finished_jobs f
         where f.id = any(array(
                   select g.id from "pgqueue".finished_jobs g
                    where g.finished_at < now() - p_older_than
                      and g.state = any(p_states)
                    order by g.finished_at
                    limit p_limit
                      for update skip locked))
        returning f.id, f.queue, f.idempotency_key
    ), keys as (
        delete from "pgqueue".idempotency_keys k
         where (k.queue, k.key, k.job_id) in (
                   select gone.queue, gone.idempotency_key, gone.id from gone
                    where gone.idempotency_key is not null)
    )
    select count(*) into v_count from gone;
    return v_count;
end
$$;

insert into "pgqueue".migrations (version, name) values (23, 'prune_refuses_a_negative_age');
commit;

-- 0024_pausing_hands_back_jobs_leased_ahead
begin;
-- pgqueue 0024: pausing a queue tells its workers, and they hand back the jobs
-- of the queue they leased ahead.
--
-- A paused queue is leased no more, but a worker still started the jobs it had
-- leased before the pause and kept waiting for a free slot (--prefetch): up to
-- that many jobs per worker ran after the pause, the drains' 500 each. Whoever
-- pauses a queue in an incident wants no job of it to start. pause_queue now
-- sends NOTIFY 'paused <queue>' (with a space, which no queue name holds), and
-- a worker that listens hands such jobs back at once (worker.py); jobs already
-- running finish. Workers of earlier versions read the payload as no queue of
-- theirs and ignore it.
create or replace function "pgqueue".pause_queue(p_queue text) returns void
language plpgsql as $$
begin
    insert into "pgqueue".queues (name, paused) values (p_queue, true)
    on conflict (name) do update set paused = true;
    perform pg_notify('pgqueue', 'paused ' || p_queue);
end
$$;
comment on function "pgqueue".pause_queue(text) is
    'Stop workers leasing jobs of the queue; they hand back the jobs of it they '
    'leased ahead and have not started (running jobs finish). resume_queue '
    'undoes it.';

insert into "pgqueue".migrations (version, name) values (24, 'pausing_hands_back_jobs_leased_ahead');
commit;

