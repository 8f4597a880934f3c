-- pgqueue 0014: enqueue runs without switching search_path, and sends its
-- NOTIFY from the INSERT.
--
-- enqueue runs with the owner's rights (SECURITY DEFINER), so a caller must
-- not be able to put objects of its own in front of the ones it uses. Until
-- now a pinned search_path (SET search_path = pg_catalog, pg_temp) saw to
-- that, and on PostgreSQL 15 switching search_path costs every call a GUC
-- save and restore and two recomputations of the path: 7-10 us of server
-- time of an enqueue's ~112. Now enqueue names everything itself: tables and
-- functions with their schema, operators as operator(pg_catalog.=) and so on,
-- so that no search_path a caller sets changes what it calls; the statements
-- it runs name no type (the parameters' types are fixed when the function is
-- created, and bigint and boolean are keywords, not names). _job_input_ok,
-- which PostgreSQL inlines into enqueue under the caller's search_path, is
-- written the same way. This is PostgreSQL's other documented way to write a
-- SECURITY DEFINER function safely ("schema-qualify every reference");
-- tests/reliability/test_privileges.py calls enqueue as a producer whose
-- search_path puts temp tables named like pgqueue's and a schema of raising
-- look-alikes (=, >=, <=, ~, unary -, length, now, nextval, pg_notify) before
-- pg_catalog, and fails if any is reached.
-- enqueue_many and the other definer functions keep the pinned search_path:
-- they run once per batch, where the switch costs nothing measurable.
--
-- The NOTIFY is now part of the INSERT's RETURNING (a CASE, so it is sent only
-- when the queue is not quiet): one statement per enqueue instead of two.
--
-- Measured on 2 cores, PostgreSQL 15, pgbench -M prepared, one client, one
-- enqueue per transaction, 8,000 transactions a run, interleaved rounds (tps,
-- median and range). Copies of the function side by side, 4 rounds:
--   0013's enqueue                                   4,860 (4,497-4,989)
--   the same without the search_path switch          5,224 (4,694-5,597)
--   and the NOTIFY in the INSERT (this migration)    5,386 (5,009-5,455)
-- The schema migrated to 0013 against one migrated to 0014, 5 rounds, later
-- the same day: 5,446 (5,405-5,530) -> 5,608 (5,379-5,710). Through
-- Task.enqueue from Python (8 alternating rounds of 4,000 calls): server time
-- 115 -> 110 us an enqueue, 4,485 -> 4,549 jobs/s (the client's share and the
-- commit are unchanged).

create or replace function :pgqueue_schema._job_input_ok(
    p_task text, p_queue text, p_priority integer, p_max_attempts integer,
    p_key text
) returns boolean
language sql immutable
as $$
    select p_priority operator(pg_catalog.>=) -32768
       and p_priority operator(pg_catalog.<=) 32767
       and (pg_catalog.length(p_key) operator(pg_catalog.>=) 1
            and pg_catalog.length(p_key) operator(pg_catalog.<=) 255
            or p_key is null)
       and p_max_attempts operator(pg_catalog.>=) 1
       and p_max_attempts operator(pg_catalog.<=) 1000
       and p_queue collate pg_catalog."C"
           operator(pg_catalog.~) '^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$'
       and pg_catalog.length(p_queue) operator(pg_catalog.<=) 128
       and p_task collate pg_catalog."C"
           operator(pg_catalog.~) '^[A-Za-z_][A-Za-z0-9_.:/-]*$'
       and pg_catalog.length(p_task) operator(pg_catalog.<=) 200
$$;

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
-- No SET search_path: every name below carries its schema (see the header).
security definer
as $$
declare
    v_id   bigint;
    v_sent boolean;  -- what the RETURNING's CASE gives back; not used
begin
    if not :pgqueue_schema._job_input_ok(p_task, p_queue, p_priority,
                                         p_max_attempts, p_idempotency_key) then
        perform :pgqueue_schema._raise_bad_input(p_task, p_queue, p_priority,
                                                 p_max_attempts, p_idempotency_key);
    end if;
    if p_idempotency_key is null then
        -- NOTIFY unless the queue is quiet, in the INSERT's own statement. A
        -- CASE fixes the order: the queue's setting is read first.
        insert into :pgqueue_schema.jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, pg_catalog.now()), p_max_attempts)
        returning id,
                  case when exists (select from :pgqueue_schema.queues s
                                     where s.name operator(pg_catalog.=) p_queue
                                       and not s.notify)
                       then false
                       else pg_catalog.pg_notify(:pgqueue_channel, p_queue) is null
                  end
             into v_id, v_sent;
        return v_id;
    end if;
    loop
        v_id := pg_catalog.nextval(':pgqueue_schema.jobs_id_seq');
        insert into :pgqueue_schema.idempotency_keys (queue, key, job_id)
        values (p_queue, p_idempotency_key, v_id)
        on conflict do nothing;
        if found then
            insert into :pgqueue_schema.jobs
                   (id, queue, task, args, priority, run_at, max_attempts,
                    idempotency_key)
            values (v_id, p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                    coalesce(p_run_at, pg_catalog.now()), p_max_attempts,
                    p_idempotency_key)
            returning case when exists (select from :pgqueue_schema.queues s
                                         where s.name operator(pg_catalog.=) p_queue
                                           and not s.notify)
                           then false
                           else pg_catalog.pg_notify(:pgqueue_channel, p_queue) is null
                      end
                 into v_sent;
            return v_id;
        end if;
        select k.job_id into v_id from :pgqueue_schema.idempotency_keys k
         where k.queue operator(pg_catalog.=) p_queue
           and k.key operator(pg_catalog.=) p_idempotency_key;
        if found then
            return v_id;  -- the key's job exists: nothing new, no NOTIFY
        end if;
        -- The key was pruned between the two statements: claim it again.
    end loop;
end
$$;
