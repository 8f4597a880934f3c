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
                 where not exists (select 1 from :pgqueue_schema.queues p
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
                   select (select j.priority from :pgqueue_schema.jobs j
                            where j.queue = q.name and j.state = 'queued'
                            order by j.priority desc
                            limit 1), 1
                   union all
                   select (select j.priority from :pgqueue_schema.jobs j
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
                         from :pgqueue_schema.jobs j
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
                         from :pgqueue_schema.jobs j
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
