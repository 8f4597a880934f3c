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
alter table :pgqueue_schema.queues add constraint queues_name check (
    name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$' and length(name) <= 128) not valid;

create function :pgqueue_schema.pause_queue(p_queue text) returns void
language sql as $$
    insert into :pgqueue_schema.queues (name, paused) values (p_queue, true)
    on conflict (name) do update set paused = true
$$;
comment on function :pgqueue_schema.pause_queue(text) is
    'Stop workers leasing jobs of the queue (running jobs finish); resume_queue '
    'undoes it.';

create function :pgqueue_schema.resume_queue(p_queue text) returns void
language plpgsql as $$
begin
    update :pgqueue_schema.queues set paused = false where name = p_queue;
    perform :pgqueue_schema._notify(array[p_queue]);
end
$$;
comment on function :pgqueue_schema.resume_queue(text) is
    'Let workers lease jobs of a paused queue again, and wake them.';

-- As the other queue settings (configure_queue, 0005): the owner and worker
-- roles (grant_worker, run again for roles granted before this migration).
revoke execute on function :pgqueue_schema.pause_queue(text) from public;
revoke execute on function :pgqueue_schema.resume_queue(text) from public;

-- lease: as in 0002, over the queues that are not paused.
create or replace function :pgqueue_schema.lease(
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
                 where not exists (select 1 from :pgqueue_schema.queues p
                                    where p.name = u.name and p.paused)) as q
         cross join lateral (
               select j.id, j.priority, j.run_at
                 from :pgqueue_schema.jobs j
                where j.queue = q.name and j.state = 'queued' and j.run_at <= now()
                order by j.priority desc, j.run_at, j.id
                limit p_limit
                  for update skip locked
         ) c
         order by c.priority desc, c.run_at, c.id
         limit p_limit
    )
    , leased as (
        update :pgqueue_schema.jobs j
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
create or replace function :pgqueue_schema.next_run_at(p_queues text[])
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
         where not exists (select 1 from :pgqueue_schema.queues p
                            where p.name = q.name and p.paused))
    loop
        v_priority := 32767;
        loop
            select j.priority, j.run_at into v_priority, v_run_at
              from :pgqueue_schema.jobs j
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
create or replace view :pgqueue_schema.queue_depth as
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
       live.oldest_queued_age,
       coalesce((select q.paused from :pgqueue_schema.queues q
                  where q.name = coalesce(live.queue, done.queue)), false) as paused
  from live full join done on done.queue = live.queue;
comment on view :pgqueue_schema.queue_depth is
    'Per queue: queued (due now), scheduled (run_at later), running, and the '
    'finished counts still in history; oldest_queued_age is how long the oldest '
    'due job has waited; paused whether workers lease from it (pause_queue).';
comment on function :pgqueue_schema.lease(text[], integer, text, double precision) is
    'Lease up to p_limit due jobs of the queues that are not paused (priority '
    'desc, run_at, id) with FOR UPDATE SKIP LOCKED; each gets a fresh lease '
    'token and expiry.';
comment on table :pgqueue_schema.queues is
    'Per-queue settings: paused (pause_queue, resume_queue) and keep_succeeded '
    '(configure_queue). A queue needs no row here.';
