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
create or replace function :pgqueue_schema.hand_back(p_ids bigint[], p_tokens uuid[])
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
          from :pgqueue_schema.jobs j, unnest(p_ids, p_tokens) as t(id, token)
         where j.id = any(p_ids) and j.id = t.id and j.lease_token = t.token
           for update of j skip locked
    ), back as (
        update :pgqueue_schema.jobs j
           set state = 'queued', run_at = least(j.run_at, now()), lease_token = null,
               leased_by = null, leased_at = null, lease_expires_at = null
          from free
         where j.id = free.id
        returning j.id, j.queue
    )
    select array_agg(back.id), array_agg(distinct back.queue)
      into p_ids, v_queues from back;
    perform pg_notify(:pgqueue_channel, q) from unnest(v_queues) q;
    return query select unnest(p_ids);
end
$$;
comment on function :pgqueue_schema.hand_back(bigint[], uuid[]) is
    'Return running jobs to queued without counting an attempt (graceful '
    'shutdown). Fenced by token; skips rows locked by a completion in flight. '
    'Returns the ids handed back.';
