-- pgqueue 0001: tables, indexes and inspection views.
--
-- :pgqueue_schema is replaced by the quoted schema name when the migration runs
-- (pgqueue/migrations.py); :pgqueue_channel by the quoted NOTIFY channel name.
--
-- Layout: live jobs (queued and running) sit in the hot table `jobs`, which stays
-- small however long the history grows, so leasing and its index stay fast.
-- Finished jobs (succeeded, dead, cancelled) move to `finished_jobs` in the same
-- statement that finishes them, and are pruned from there by retention.

create type :pgqueue_schema.job_state as enum (
    'queued', 'running', 'succeeded', 'dead', 'cancelled'
);
comment on type :pgqueue_schema.job_state is
    'Life cycle of a job: queued (waits while run_at > now()), running (leased), '
    'and the final states succeeded, dead (attempts exhausted) and cancelled.';

create sequence :pgqueue_schema.jobs_id_seq as bigint;
comment on sequence :pgqueue_schema.jobs_id_seq is
    'Job ids, shared by jobs and finished_jobs: a job keeps its id for life.';

create table :pgqueue_schema.jobs (
    id               bigint primary key
                     default nextval(':pgqueue_schema.jobs_id_seq'),
    queue            text not null default 'default',
    task             text not null,
    args             jsonb not null default '{}',
    -- Higher runs first; FIFO by run_at, then id, within one priority.
    priority         smallint not null default 0,
    state            :pgqueue_schema.job_state not null default 'queued',
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
alter sequence :pgqueue_schema.jobs_id_seq owned by :pgqueue_schema.jobs.id;

comment on table :pgqueue_schema.jobs is
    'Live jobs (queued and running). Internal: read the views, change state '
    'through the functions.';

-- The lease order exactly: queue equality, then priority desc, run_at, id. Partial,
-- so running rows never sit in it.
create index jobs_fetch_idx on :pgqueue_schema.jobs (queue, priority desc, run_at, id)
    where state = 'queued';
-- No separate (queue, run_at) index: next_run_at() finds the earliest run_at with
-- a skip scan of jobs_fetch_idx, and every index on this table costs each enqueue
-- (20k-row insert: 125 ms with a (queue, run_at) index, 83 ms without).
-- Expired leases, found by reap.
create index jobs_lease_expiry_idx on :pgqueue_schema.jobs (lease_expires_at)
    where state = 'running';

-- Every row is inserted, updated once or twice, and deleted within seconds, so the
-- table churns: vacuum it after a small fraction of it changed, and leave room
-- in each page for the lease update to stay on the same page.
alter table :pgqueue_schema.jobs set (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

create table :pgqueue_schema.finished_jobs (
    id              bigint primary key,
    queue           text not null,
    task            text not null,
    args            jsonb not null,
    priority        smallint not null,
    state           :pgqueue_schema.job_state not null,
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
comment on table :pgqueue_schema.finished_jobs is
    'Jobs that reached a final state, kept until pruned by retention. Internal: '
    'read the views.';
-- BRIN, not btree: finished_at grows with insertion order, and a BRIN index costs
-- almost nothing per completion while still letting prune skip recent pages.
create index finished_jobs_finished_at_idx on :pgqueue_schema.finished_jobs
    using brin (finished_at);
create index finished_jobs_dead_idx on :pgqueue_schema.finished_jobs (queue, finished_at)
    where state = 'dead';

create table :pgqueue_schema.idempotency_keys (
    queue      text not null,
    key        text not null,
    job_id     bigint not null,
    created_at timestamptz not null default now(),
    primary key (queue, key)
);
comment on table :pgqueue_schema.idempotency_keys is
    'One row per idempotency key and queue. A key lives as long as its job: '
    'while queued or running, and after it finished until prune removes it.';
create index idempotency_keys_job_idx on :pgqueue_schema.idempotency_keys (job_id);

create table :pgqueue_schema.workers (
    id         text primary key,
    hostname   text not null,
    pid        integer not null,
    queues     text[] not null,
    started_at timestamptz not null default now(),
    last_seen  timestamptz not null default now()
);
comment on table :pgqueue_schema.workers is
    'Running worker processes and their last heartbeat.';

create table :pgqueue_schema.queues (
    name   text primary key,
    paused boolean not null default false
);
comment on table :pgqueue_schema.queues is
    'Per-queue settings (room for pausing and limits). A queue needs no row here.';

-- Inspection views: the supported way to read the queue.

create view :pgqueue_schema.jobs_overview as
select id, queue, task, args, priority, state, run_at, attempts, max_attempts,
       idempotency_key, leased_by, leased_at as started_at, lease_expires_at,
       created_at, null::timestamptz as finished_at, null::jsonb as result, errors
  from :pgqueue_schema.jobs
union all
select id, queue, task, args, priority, state, null, attempts, max_attempts,
       idempotency_key, null, started_at, null,
       created_at, finished_at, result, errors
  from :pgqueue_schema.finished_jobs;
comment on view :pgqueue_schema.jobs_overview is
    'Every job, live or finished, with its state, attempts and error history.';

create view :pgqueue_schema.running_jobs as
select id, queue, task, attempts, leased_by, leased_at as started_at,
       lease_expires_at, now() - leased_at as running_for
  from :pgqueue_schema.jobs
 where state = 'running';
comment on view :pgqueue_schema.running_jobs is
    'Jobs being run now, the worker that holds each and when its lease expires.';

create view :pgqueue_schema.dead_jobs as
select id, queue, task, args, attempts, finished_at,
       errors -> -1 ->> 'error' as last_error, errors
  from :pgqueue_schema.finished_jobs
 where state = 'dead';
comment on view :pgqueue_schema.dead_jobs is
    'Jobs that exhausted their attempts, with the last error; retry them with '
    'pgqueue.retry(id) or pgqueue.retry_dead(queue).';

create view :pgqueue_schema.queue_depth as
with live as (
    select queue,
           count(*) filter (where state = 'queued' and run_at <= now()) as queued,
           count(*) filter (where state = 'queued' and run_at > now()) as scheduled,
           count(*) filter (where state = 'running') as running,
           now() - min(run_at) filter (where state = 'queued' and run_at <= now())
               as oldest_queued_age
      from :pgqueue_schema.jobs
     group by queue
), done as (
    select queue,
           count(*) filter (where state = 'succeeded') as succeeded,
           count(*) filter (where state = 'dead') as dead,
           count(*) filter (where state = 'cancelled') as cancelled
      from :pgqueue_schema.finished_jobs
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
comment on view :pgqueue_schema.queue_depth is
    'Per queue: queued (due now), scheduled (run_at later), running, and the '
    'finished counts still in history; oldest_queued_age is how long the oldest '
    'due job has waited.';
