-- pgqueue 0012: enqueue checks the names and keys it is given itself, so that
-- an INSERT into the hot table no longer pays for those checks.
--
-- PostgreSQL prepares a table's CHECK constraints again for every statement
-- that writes to it: it reads each one back from its stored node text
-- (pg_strtok was a third of the profile) and plans it. For a one-row INSERT
-- that is most of the work: into a table shaped like jobs, 4.5 us a row
-- without constraints and 26.5 us with jobs' six (20,000 single-row INSERTs
-- in one transaction; one INSERT of 20,000 rows paid 0.6 us a row for them).
-- Every single enqueue paid it, and each lease, heartbeat and failure paid it
-- once per statement.
--
-- The three checks on names and keys (jobs_queue_name, jobs_task_name,
-- jobs_idempotency_key) move into enqueue and enqueue_many, which raise the
-- same error as before: SQLSTATE 23514 (check_violation) under the old
-- constraint's name, now with the offending value in the message, in the
-- order the table reported them (PQ001 for priority and an overlong key first,
-- then the constraints by name). The Python producer checks the same rules
-- before it sends anything, the COPY path included. jobs_attempts stays: it
-- bounds max_attempts, which guarantee 4 (every failure path ends) rests on,
-- whoever writes the row. So do the two checks on the job's state
-- (jobs_state_live, jobs_lease): they guard pgqueue's own transitions, and the
-- planner uses the first to skip jobs when a query asks for a final state.
--
-- What is given up: a role that INSERTs into jobs directly, bypassing the
-- functions (producers hold INSERT for COPY), is no longer stopped by the
-- table from storing a queue or task name that no worker would take. The
-- table was never an interface (README, "Roles"). And a call with an
-- idempotency key that already exists now fails on a bad name or max_attempts
-- too, where it used to return the existing job's id without looking.
--
-- Dropping the constraints takes jobs' ACCESS EXCLUSIVE lock for an instant,
-- but the wait for it queues every lease and enqueue behind it: the wait is
-- capped at 5 s (lock_timeout). If it times out, nothing has changed; run
-- `pgqueue migrate` again when no long transaction holds jobs.
--
-- Measured on 2 cores, PostgreSQL 15, pgbench -M prepared, one client, one
-- statement per transaction, 3 s runs interleaved, 4 rounds (tps):
--   INSERT into the raw-SQL ceiling's 5-column table            5,358-5,844
--   INSERT into a table shaped like jobs, no checks              5,155-5,502
--   INSERT into jobs as it was (six checks)                      4,367-4,712
--   INSERT into jobs with the three kept                         4,788-5,062
--   enqueue(): 0011                                              3,193-3,691
--              0012                                              3,395-4,086
-- One INSERT of 50,000 rows: 221-226 ms with the six, 185-196 ms with three.
-- Each check costs 2-4 us a statement. Server time of 20,000 enqueue() calls
-- in one transaction: 798-804 ms before, 566-576 ms after; enqueue_many of
-- 50,000 jobs: 269-281 ms before, 248-262 ms after. Bulk enqueue from Python
-- (COPY, 2 x 10,000 jobs, medians of 8 alternating rounds): 142,243 before,
-- 155,705 jobs/s after.

-- _job_input_ok: the rules on one job's input, in one place. Names follow the
-- Python producer's rules (producer.QUEUE_NAME, TASK_NAME), written as * and
-- length() rather than a bounded repetition, which is slower (see 0001), and
-- compared under the "C" collation: a caller's argument may carry a
-- nondeterministic collation, under which PostgreSQL refuses regular
-- expressions. Plain SQL, so the planner inlines it into its callers' cached
-- plans: no call per job. Null where an input is null and nothing else is
-- wrong (the columns' NOT NULL and defaults deal with those).
create function :pgqueue_schema._job_input_ok(
    p_task text, p_queue text, p_priority integer, p_max_attempts integer,
    p_key text
) returns boolean
language sql immutable
as $$
    select p_priority between -32768 and 32767
       and (length(p_key) between 1 and 255 or p_key is null)
       and p_max_attempts between 1 and 1000
       and p_queue collate "C" ~ '^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$'
       and length(p_queue) <= 128
       and p_task collate "C" ~ '^[A-Za-z_][A-Za-z0-9_.:/-]*$'
       and length(p_task) <= 200
$$;
comment on function :pgqueue_schema._job_input_ok(text, text, integer, integer, text) is
    'Internal: whether one job''s input follows the rules enqueue checks.';

-- _raise_bad_input: called once _job_input_ok said false, it raises what the
-- table's checks raised: PQ001 for the priority or an overlong key first,
-- then check_violation (23514) under the name of the first rule broken, by
-- constraint name, with the table's name (:pgqueue_channel is the schema's
-- name as a literal) and now the offending value.
create function :pgqueue_schema._raise_bad_input(
    p_task text, p_queue text, p_priority integer, p_max_attempts integer,
    p_key text
) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if p_priority not between -32768 and 32767 then
        raise exception 'priority must be between -32768 and 32767, got %', p_priority
              using errcode = 'PQ001';
    elsif length(p_key) > 255 then
        raise exception 'idempotency key longer than 255 characters'
              using errcode = 'PQ001';
    elsif p_max_attempts not between 1 and 1000 then
        raise exception 'max_attempts must be between 1 and 1000, got %',
                        p_max_attempts
              using errcode = 'check_violation', constraint = 'jobs_attempts',
                    table = 'jobs', schema = :pgqueue_channel;
    elsif p_key = '' then
        raise exception 'idempotency key must not be empty'
              using errcode = 'check_violation', constraint = 'jobs_idempotency_key',
                    table = 'jobs', schema = :pgqueue_channel;
    -- The queue's rule alone: the other inputs given as valid ones.
    elsif not :pgqueue_schema._job_input_ok('t', p_queue, 0, 1, null) then
        raise exception 'invalid queue name %: 1-128 characters of letters, digits '
                        'and _ . : / -, not starting with a punctuation mark',
                        quote_literal(p_queue)
              using errcode = 'check_violation', constraint = 'jobs_queue_name',
                    table = 'jobs', schema = :pgqueue_channel;
    else
        raise exception 'invalid task name %: 1-200 characters of letters, digits '
                        'and _ . : / -, starting with a letter or _',
                        quote_literal(p_task)
              using errcode = 'check_violation', constraint = 'jobs_task_name',
                    table = 'jobs', schema = :pgqueue_channel;
    end if;
end
$$;
comment on function :pgqueue_schema._raise_bad_input(
    text, text, integer, integer, text) is
    'Internal: raise the error for input _job_input_ok refused.';

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
    v_id    bigint;
    v_quiet boolean;
begin
    if not :pgqueue_schema._job_input_ok(p_task, p_queue, p_priority,
                                         p_max_attempts, p_idempotency_key) then
        perform :pgqueue_schema._raise_bad_input(p_task, p_queue, p_priority,
                                                 p_max_attempts, p_idempotency_key);
    end if;
    if p_idempotency_key is null then
        -- The queue's notify setting is read by the INSERT itself: one statement
        -- fewer per enqueue than a separate lookup.
        insert into :pgqueue_schema.jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, now()), p_max_attempts)
        returning id, exists (select 1 from :pgqueue_schema.queues s
                               where s.name = p_queue and not s.notify)
             into v_id, v_quiet;
    else
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
                        coalesce(p_run_at, now()), p_max_attempts, p_idempotency_key)
                returning exists (select 1 from :pgqueue_schema.queues s
                                   where s.name = p_queue and not s.notify)
                     into v_quiet;
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
    if not v_quiet then
        perform pg_notify(:pgqueue_channel, p_queue);
    end if;
    return v_id;
end
$$;

-- _check_jobs: enqueue_many's input checks, one pass over the arrays. As the
-- table did, a priority out of range or an overlong key in any job comes
-- first, else the first bad job. A null queue is the default queue, a null
-- max_attempts the default 25.
create function :pgqueue_schema._check_jobs(
    p_tasks        text[],
    p_queues       text[],
    p_priorities   integer[],
    p_max_attempts integer[],
    p_keys         text[]
) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_bad record;
begin
    select t.task, t.queue, t.priority, t.max_attempts, t.key into v_bad
      from unnest(p_tasks, p_queues, p_priorities, p_max_attempts, p_keys)
           with ordinality as t(task, queue, priority, max_attempts, key, ord)
     where not :pgqueue_schema._job_input_ok(t.task, t.queue, t.priority,
                                             t.max_attempts, t.key)
     order by coalesce(t.priority not between -32768 and 32767, false) desc,
              coalesce(length(t.key) > 255, false) desc, t.ord
     limit 1;
    if found then
        perform :pgqueue_schema._raise_bad_input(v_bad.task, v_bad.queue,
                                                 v_bad.priority, v_bad.max_attempts,
                                                 v_bad.key);
    end if;
end
$$;
comment on function :pgqueue_schema._check_jobs(
    text[], text[], integer[], integer[], text[]) is
    'Internal: enqueue_many''s input checks; raises for the first bad job.';

-- Internal, reached through enqueue and enqueue_many (which run as the owner).
revoke execute on function
    :pgqueue_schema._job_input_ok(text, text, integer, integer, text),
    :pgqueue_schema._raise_bad_input(text, text, integer, integer, text),
    :pgqueue_schema._check_jobs(text[], text[], integer[], integer[], text[])
    from public;

-- enqueue_many: as in 0002 (and 0003's rights), its input checked by _check_jobs
-- (which took over the priority and key-length checks).
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
         where i.key is not null order by i.ord
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
    return query
    select t.ord, case when t.created then t.id else k.job_id end, t.created
      from unnest(v_ord, v_id, v_created, v_queue, v_key)
           as t(ord, id, created, queue, key)
      left join :pgqueue_schema.idempotency_keys k
        on not t.created and k.queue = t.queue and k.key = t.key
     order by t.ord;
end
$$;

set local lock_timeout = '5s';
alter table :pgqueue_schema.jobs
    drop constraint jobs_queue_name,
    drop constraint jobs_task_name,
    drop constraint jobs_idempotency_key;
