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
create or replace function :pgqueue_schema.enqueue_many(
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
    perform :pgqueue_schema._check_jobs(p_tasks, p_queues, p_priorities,
                                        p_max_attempts, p_keys);

    if not exists (select from unnest(p_keys) k where k is not null) then
        -- No idempotency keys: one INSERT. Ids come from the sequence in insertion
        -- order, which follows ord, so they ascend in input order.
        return query
        with inserted as (
            insert into :pgqueue_schema.jobs
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
        perform :pgqueue_schema._notify(coalesce(p_queues, array['default']));
        return;
    end if;

    with input as materialized (
        select t.ord, nextval(':pgqueue_schema.jobs_id_seq') as id, t.task,
               coalesce(t.args, '{}') as args, coalesce(t.queue, 'default') as queue,
               coalesce(t.priority, 0) as priority, coalesce(t.run_at, now()) as run_at,
               coalesce(t.max_attempts, 25) as max_attempts, t.key
          from unnest(p_tasks, p_args, p_queues, p_priorities, p_run_ats,
                      p_max_attempts, p_keys)
               with ordinality as t(task, args, queue, priority, run_at,
                                    max_attempts, key, ord)
    ), won as (
        insert into :pgqueue_schema.idempotency_keys as k (queue, key, job_id)
        select i.queue, i.key, i.id from input i
         where i.key is not null order by i.queue, i.key
        on conflict do nothing
        returning k.job_id
    ), inserted as (
        insert into :pgqueue_schema.jobs
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

    perform :pgqueue_schema._notify(v_queue);
    -- Rows that lost their key take the existing job's id. A second statement on
    -- purpose: its snapshot sees a key committed while the insert above waited.
    for r in
        select t.ord, t.id, t.created, t.queue, t.key, k.job_id as existing
          from unnest(v_ord, v_id, v_created, v_queue, v_key)
               as t(ord, id, created, queue, key)
          left join :pgqueue_schema.idempotency_keys k
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
            id := :pgqueue_schema.enqueue(
                p_tasks[r.ord], p_args[r.ord], r.queue,
                coalesce(p_priorities[r.ord], 0), p_run_ats[r.ord],
                coalesce(p_max_attempts[r.ord], 25), r.key);
            created := id = currval(':pgqueue_schema.jobs_id_seq');
        end if;
        return next;
    end loop;
end
$$;
