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
-- lease. The order is the same as before: priority desc, run_at, id, across
-- the queues named. Measured on 2 cores, PostgreSQL 15 (/tmp harness, medians
-- of 300 calls, old -> new): 1,000 due behind 100,000 scheduled at a higher
-- priority, lease(10) 8.8 -> 0.5-0.7 ms; one queue of 1,000 due, lease(250)
-- 4.3 -> 4.1; one due job 0.85 -> 0.6; an empty queue 0.65 -> 0.38; 4 or 100
-- queues, or 100,000 jobs over 30,000 priorities, within 10 %. The price: a
-- level that holds only jobs for later costs two descents (~3 us) where the
-- old scan passed its jobs at ~0.5 us each, so 1,000 such levels of one job
-- each made a lease 0.7 -> 5.8 ms.
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
declare
    v_queues text[];
begin
    if p_limit < 0 then
        raise exception 'lease limit must not be negative, got %', p_limit
              using errcode = 'invalid_row_count_in_limit_clause';
    end if;
    v_queues := array(
        select distinct u.name from unnest(p_queues) as u(name)
         where not exists (select 1 from :pgqueue_schema.queues p
                            where p.name = u.name and p.paused));
    return query
    with picked as (
        select c.id
          from unnest(v_queues) as q(name)
         cross join lateral (
               -- This queue's levels, highest first: the first with a queued
               -- job (due or not), then each next lower one, one index descent
               -- each. For each level, its due jobs in (run_at, id) order: an
               -- index range that ends at now(). The walk is lazy: the LIMIT
               -- stops it at the level that fills the lease.
               with recursive levels(priority) as (
                   select (select j.priority from :pgqueue_schema.jobs j
                            where j.queue = q.name and j.state = 'queued'
                            order by j.priority desc
                            limit 1)
                   union all
                   select (select j.priority from :pgqueue_schema.jobs j
                            where j.queue = q.name and j.state = 'queued'
                              and j.priority < l.priority
                            order by j.priority desc
                            limit 1)
                     from levels l
                    where l.priority is not null
               )
               select d.id, d.priority, d.run_at
                 from levels l
                cross join lateral (
                      select j.id, j.priority, j.run_at
                        from :pgqueue_schema.jobs j
                       where j.queue = q.name and j.state = 'queued'
                         and j.priority = l.priority and j.run_at <= now()
                       order by j.run_at, j.id
                       limit p_limit
                         for update skip locked) d
                where l.priority is not null
                limit p_limit
         ) c
         -- Several queues: each locks up to p_limit, the surplus is released
         -- at commit (as before).
         order by c.priority desc, c.run_at, c.id
         limit p_limit
    ), leased as (
        -- One token per lease call, not per row (see 0002).
        update :pgqueue_schema.jobs j
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
comment on function :pgqueue_schema.lease(text[], integer, text, double precision) is
    'Lease up to p_limit due jobs of the queues that are not paused (priority '
    'desc, run_at, id) with FOR UPDATE SKIP LOCKED, walking the priority levels; '
    'each gets a fresh lease token and expiry.';
