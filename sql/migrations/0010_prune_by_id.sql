-- pgqueue 0010: prune deletes the jobs it picked by primary key, so a batch
-- costs the same whatever the size of the history.
--
-- Until now prune() deleted `where f.id in (select ... limit p_limit for update
-- skip locked)`, which PostgreSQL planned as a hash semi join over a sequential
-- scan of all of finished_jobs: every batch of 10,000 read the whole table.
-- With 2,000,000 finished jobs (half past retention) a batch took 270-380 ms
-- (EXPLAIN: Seq Scan on finished_jobs f, 1,970,000 rows), and the time grows
-- with the history. Now the picked ids are an array, deleted through the
-- primary key, and the idempotency keys of the deleted jobs are found through
-- their job index: 40-53 ms a batch on the same table (2 cores, PostgreSQL 15,
-- with 485,000 idempotency keys). Same rows, same locking: the batch is still
-- chosen with FOR UPDATE SKIP LOCKED, so two workers pruning at once take
-- different jobs.
create or replace function :pgqueue_schema.prune(
    p_older_than interval default interval '7 days',
    p_limit      integer default 10000,
    p_states     :pgqueue_schema.job_state[] default '{succeeded,cancelled,dead}'
) returns integer
language plpgsql
set jit = off  -- see lease()
as $$
declare
    v_count integer;
begin
    if p_limit < 0 then
        raise exception 'prune: the limit must not be negative (got %)', p_limit
            using errcode = '2201W';
    end if;
    with gone as (
        delete from :pgqueue_schema.finished_jobs f
         where f.id = any(array(
                   select g.id from :pgqueue_schema.finished_jobs g
                    where g.finished_at < now() - p_older_than
                      and g.state = any(p_states)
                    order by g.id
                    limit p_limit
                      for update skip locked))
        returning f.id, f.queue, f.idempotency_key
    ), keys as (
        delete from :pgqueue_schema.idempotency_keys k
         where (k.queue, k.key, k.job_id) in (
                   select gone.queue, gone.idempotency_key, gone.id from gone
                    where gone.idempotency_key is not null)
    )
    select count(*) into v_count from gone;
    return v_count;
end
$$;
comment on function :pgqueue_schema.prune(interval, integer, :pgqueue_schema.job_state[]) is
    'Delete up to p_limit finished jobs older than p_older_than, with their '
    'idempotency keys, by primary key. Returns how many were deleted.';
