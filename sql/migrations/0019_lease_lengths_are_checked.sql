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
create function :pgqueue_schema._check_lease_seconds(p_lease_seconds double precision)
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
comment on function :pgqueue_schema._check_lease_seconds(double precision) is
    'Internal: raises 22023 unless the lease length is above 0 and at most '
    '366 days (lease, heartbeat).';
revoke execute on function :pgqueue_schema._check_lease_seconds(double precision)
    from public;
select :pgqueue_schema._grant_to_workers(
    ':pgqueue_schema._check_lease_seconds(double precision)'::regprocedure);

-- lease: as in 0009, and the lease length is checked first.
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
    perform :pgqueue_schema._check_lease_seconds(p_lease_seconds);
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

-- heartbeat: as in 0005, and the lease length is checked first.
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
    select :pgqueue_schema._check_lease_seconds(p_lease_seconds);
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
