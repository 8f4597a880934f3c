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
create or replace function :pgqueue_schema.reap(p_limit integer default 1000)
returns table (id bigint, state :pgqueue_schema.job_state)
language plpgsql
set jit = off  -- see lease()
as $$
declare
    v_job :pgqueue_schema.jobs;
    v_queues text[] := '{}';
begin
    for v_job in
        select * from :pgqueue_schema.jobs j
         where j.state = 'running' and j.lease_expires_at < now()
         order by j.lease_expires_at
         limit p_limit
           for update skip locked
    loop
        id := v_job.id;
        state := :pgqueue_schema._fail_locked(
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
    perform pg_notify(:pgqueue_channel, q) from unnest(v_queues) q;
    delete from :pgqueue_schema.workers w
     where w.last_seen < now() - interval '1 hour';
end
$$;
comment on function :pgqueue_schema.reap(integer) is
    'Fail running jobs whose lease expired (counting an attempt), wake the '
    'workers of the queues they went back to, and forget workers silent for an '
    'hour. Returns the jobs it changed and their new state.';
