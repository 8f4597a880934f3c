-- pgqueue 0008: quiet queues, whose enqueues send no NOTIFY.
--
-- A transaction that NOTIFYs takes a lock that PostgreSQL holds from just
-- before its commit until the commit is durable, and the lock is one for the
-- whole server: such commits run one at a time, each waiting out the WAL flush
-- of the one before. An enqueue NOTIFYs, so every transaction that enqueues,
-- business writes included, commits in single file. Measured (pgbench, 2 cores,
-- PostgreSQL 15, durable commits): enqueue() one job per transaction ran
-- 4,609/s with 1 client and 4,831/s with 8; the same function without the
-- NOTIFY ran 4,927/s and 13,449/s; as shipped here (the NOTIFY skipped after a
-- look at the queue's setting) a quiet queue took 10,891-11,094/s from 8.
--
-- A quiet queue (queues.notify = false, set with set_queue_notify) gets no
-- NOTIFY when jobs are enqueued: by enqueue, and by enqueue_many and the COPY
-- path, which go through _notify. Workers find its jobs by polling, so their
-- pickup latency becomes the workers' poll interval. The rarer transitions
-- still NOTIFY: resume_queue (an operator's "go now"), retry and retry_dead,
-- reap and hand_back.

alter table :pgqueue_schema.queues
    add column notify boolean not null default true;
comment on column :pgqueue_schema.queues.notify is
    'false: enqueueing into this queue sends no NOTIFY (workers find its jobs by '
    'polling). Set with set_queue_notify().';
comment on table :pgqueue_schema.queues is
    'Per-queue settings: paused (pause_queue, resume_queue), keep_succeeded '
    '(configure_queue) and notify (set_queue_notify). A queue needs no row here.';

create function :pgqueue_schema.set_queue_notify(p_queue text, p_notify boolean)
returns void
language sql as $$
    insert into :pgqueue_schema.queues (name, notify) values (p_queue, p_notify)
    on conflict (name) do update set notify = excluded.notify
$$;
comment on function :pgqueue_schema.set_queue_notify(text, boolean) is
    'Make enqueueing into the queue NOTIFY its workers (true, the default) or not '
    '(false: a quiet queue, found by polling).';

-- As the other queue settings: the owner and worker roles, those granted before
-- this migration included (0007).
revoke execute on function :pgqueue_schema.set_queue_notify(text, boolean)
    from public;
select :pgqueue_schema._grant_to_workers(
    ':pgqueue_schema.set_queue_notify(text, boolean)'::regprocedure);

-- _notify: as in 0002, skipping quiet queues. It runs with the owner's rights:
-- producers call it (bulk enqueue by COPY) and may not read the queues table.
-- plpgsql, so the plan is kept between calls.
create or replace function :pgqueue_schema._notify(p_queues text[]) returns void
language plpgsql
security definer set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_notify(:pgqueue_channel, d.q)
       from (select distinct coalesce(u.q, 'default') as q
               from unnest(p_queues) as u(q)) as d
      where not exists (select 1 from :pgqueue_schema.queues s
                         where s.name = d.q and not s.notify);
end
$$;

-- enqueue: as in 0002 (and 0003's rights), skipping the NOTIFY of quiet queues.
create or replace function :pgqueue_schema.enqueue(
    p_task            text,
    p_args            jsonb default '{}',
    p_queue           text default 'default',
    p_priority        integer default 0,
    p_run_at          timestamptz default null,
    p_max_attempts    integer default 25,
    p_idempotency_key text default null
) returns bigint
language plpgsql
security definer set search_path = pg_catalog, pg_temp
as $$
declare
    v_id bigint;
begin
    if p_priority not between -32768 and 32767 then
        raise exception 'priority must be between -32768 and 32767, got %', p_priority
              using errcode = 'PQ001';
    end if;
    if p_idempotency_key is null then
        insert into :pgqueue_schema.jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, now()), p_max_attempts)
        returning id into v_id;
    else
        if length(p_idempotency_key) > 255 then
            raise exception 'idempotency key longer than 255 characters'
                  using errcode = 'PQ001';
        end if;
        loop
            v_id := nextval(':pgqueue_schema.jobs_id_seq');
            insert into :pgqueue_schema.idempotency_keys (queue, key, job_id)
            values (p_queue, p_idempotency_key, v_id)
            on conflict do nothing;
            if found then
                insert into :pgqueue_schema.jobs
                       (id, queue, task, args, priority, run_at, max_attempts,
                        idempotency_key)
                values (v_id, p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                        coalesce(p_run_at, now()), p_max_attempts, p_idempotency_key);
                exit;
            end if;
            select k.job_id into v_id from :pgqueue_schema.idempotency_keys k
             where k.queue = p_queue and k.key = p_idempotency_key;
            if found then
                return v_id;  -- the key's job exists: nothing new, no NOTIFY
            end if;
            -- The key was pruned between the two statements: claim it again.
        end loop;
    end if;
    perform pg_notify(:pgqueue_channel, p_queue)
      where not exists (select 1 from :pgqueue_schema.queues s
                         where s.name = p_queue and not s.notify);
    return v_id;
end
$$;

-- resume_queue: as in 0006, but waking the queue's workers directly rather than
-- through _notify, so that resuming a quiet queue wakes them too.
create or replace function :pgqueue_schema.resume_queue(p_queue text) returns void
language plpgsql as $$
begin
    update :pgqueue_schema.queues set paused = false where name = p_queue;
    perform pg_notify(:pgqueue_channel, p_queue);
end
$$;
