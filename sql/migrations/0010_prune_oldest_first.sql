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
                          ':pgqueue_schema.finished_jobs_finished_idx')
                  and not indisvalid) then
        raise exception 'finished_jobs_finished_idx is invalid (a failed '
                        'concurrent build?): drop it and migrate again';
    end if;
end
$$;
create index if not exists finished_jobs_finished_idx
    on :pgqueue_schema.finished_jobs (finished_at);
drop index if exists :pgqueue_schema.finished_jobs_finished_at_idx;

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
        raise exception 'prune limit must not be negative, got %', p_limit
            using errcode = '2201W';
    end if;
    with gone as (
        delete from :pgqueue_schema.finished_jobs f
         where f.id = any(array(
                   select g.id from :pgqueue_schema.finished_jobs g
                    where g.finished_at < now() - p_older_than
                      and g.state = any(p_states)
                    order by g.finished_at
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
    'Delete up to p_limit finished jobs older than p_older_than, oldest first, '
    'with their idempotency keys. Returns how many were deleted.';
