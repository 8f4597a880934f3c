-- pgqueue 0016: an enqueue sends its NOTIFY only while some worker listens.
--
-- PostgreSQL serializes the commits of transactions that NOTIFY: each holds
-- one database-wide lock from the moment it queues its notifications until
-- its commit is flushed, so concurrent producers cannot share a WAL flush.
-- With 8 producers enqueueing one job per transaction (2 cores, PostgreSQL
-- 15, pgbench -M prepared, -T 6, two rounds) the enqueue function ran
-- 5,110-5,254 tps; the same function without its NOTIFY ran 11,670-11,932.
-- A NOTIFY wakes a worker that is waiting; a worker that is busy leasing full
-- batches does not need it, and neither does a queue nobody serves yet.
--
-- The listening locks. A worker about to wait for NOTIFY takes
-- start_listening(): a shared session-level advisory lock on each of 16 keys
-- (one key per stripe, per schema). It lets them go (stop_listening) when a
-- lease comes back full, that is while it has more work than it can take,
-- and takes them again before it next waits. An enqueue tries an exclusive
-- transaction-level lock on the key of its stripe (its backend pid modulo
-- 16): when it gets it, no worker is waiting, and it sends no NOTIFY; when it
-- cannot, some worker waits, and it NOTIFYs as before.
--
-- Why no wake-up is lost: a producer that sent no NOTIFY holds its stripe's
-- lock until its transaction ends, so start_listening waits for that (20 ms
-- at most; then the worker leases and tries again). While it waits, enqueues
-- that try the stripe fail behind it, and NOTIFY. Once
-- start_listening succeeds, every enqueue that sent no NOTIFY has committed
-- or rolled back, and the worker leases once more before it waits, so it
-- sees their jobs; every enqueue after that finds the lock taken and
-- NOTIFYs. Locks are not rows: no snapshot can hide them, so this holds for
-- producers in any isolation level.
--
-- Stripes: producers that try the same key at once conflict, and the loser
-- NOTIFYs (harmless, but serialized again). With 8 producers, 4 stripes ran
-- 9,384-9,556 tps, 16 ran 11,461-11,777. An idle worker holds 16 locks of
-- the server's shared lock table (max_locks_per_transaction x connections).
--
-- The locks live on the worker's lease connection, which it watches while
-- it waits: a backend that goes away takes them along, and the worker
-- reconnects and takes them again. start_listening holds nothing when it
-- fails, whether it timed out or was cancelled part way.
--
-- Workers older than this release LISTEN without taking the locks: while
-- only they serve a queue, its enqueues send no NOTIFY and they find new
-- jobs by polling (every poll interval). Upgrade the workers with the schema.
-- A session of your own that LISTENs for enqueues must call start_listening
-- too.

-- The key of a stripe: the class is pgqueue's (the prune lock uses the class
-- before it); the key tells schemas apart by their channel name.
create function :pgqueue_schema._listening_key(p_stripe integer) returns integer
language sql immutable
as $$
    select pg_catalog.hashtext(:pgqueue_channel) operator(pg_catalog.#) p_stripe
$$;
comment on function :pgqueue_schema._listening_key(integer) is
    'Internal: the second half of the advisory lock key of a listening stripe '
    '(the first is 1885827446).';

-- Inlined into enqueue, which runs as its owner under the caller's
-- search_path: every name carries its schema (see 0014).
create function :pgqueue_schema._nobody_listening() returns boolean
language sql volatile
as $$
    select pg_catalog.pg_try_advisory_xact_lock(
               1885827446,
               :pgqueue_schema._listening_key(
                   pg_catalog.pg_backend_pid() operator(pg_catalog.%) 16))
$$;
comment on function :pgqueue_schema._nobody_listening() is
    'Internal: true when no worker waits for NOTIFY; this transaction then '
    'holds its stripe''s listening lock until it ends, so no worker starts '
    'waiting before its jobs are visible.';

create function :pgqueue_schema.start_listening(p_wait_ms integer default 20)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_taken  integer := 0;
    v_stripe integer;
    v_old    text := current_setting('lock_timeout');
begin
    -- Waits (up to p_wait_ms for each stripe) for producers whose transaction
    -- sent no NOTIFY to end. While this waits, a producer's try of the same
    -- stripe fails behind it, so new enqueues NOTIFY already.
    perform set_config('lock_timeout', greatest(p_wait_ms, 1)::text || 'ms', true);
    begin
        while v_taken < 16 loop
            perform pg_advisory_lock_shared(
                1885827446, :pgqueue_schema._listening_key(v_taken));
            v_taken := v_taken + 1;
        end loop;
    exception
        when lock_not_available then
            -- A producer's transaction is still open: let go of the stripes
            -- taken (session locks outlive the failed block); the caller tries
            -- again.
            for v_stripe in 0 .. v_taken - 1 loop
                perform pg_advisory_unlock_shared(
                    1885827446, :pgqueue_schema._listening_key(v_stripe));
            end loop;
            perform set_config('lock_timeout', v_old, true);
            return false;
        when query_canceled or others then
            -- Cancelled (statement_timeout, a cancel request) or failed part
            -- way: hold nothing, so that what the caller believes is true.
            for v_stripe in 0 .. v_taken - 1 loop
                perform pg_advisory_unlock_shared(
                    1885827446, :pgqueue_schema._listening_key(v_stripe));
            end loop;
            raise;
    end;
    perform set_config('lock_timeout', v_old, true);
    return true;
end
$$;
comment on function :pgqueue_schema.start_listening(integer) is
    'Tell producers that this session waits for NOTIFY: takes the 16 listening '
    'locks (shared, for the session), all or none, waiting up to p_wait_ms for '
    'each. False when a producer''s transaction that sent no NOTIFY stayed open '
    'that long: try again. Call it once, then lease before waiting.';

create function :pgqueue_schema.stop_listening() returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_stripe integer;
begin
    for v_stripe in 0 .. 15 loop
        perform pg_advisory_unlock_shared(
            1885827446, :pgqueue_schema._listening_key(v_stripe));
    end loop;
end
$$;
comment on function :pgqueue_schema.stop_listening() is
    'Let go of the listening locks start_listening took: enqueues stop '
    'NOTIFYing for this session. Call it only after start_listening returned '
    'true (a lock not held gives a WARNING).';

revoke execute on function :pgqueue_schema._listening_key(integer) from public;
revoke execute on function :pgqueue_schema._nobody_listening() from public;
revoke execute on function :pgqueue_schema.start_listening(integer) from public;
revoke execute on function :pgqueue_schema.stop_listening() from public;
-- start_listening and stop_listening run with the caller's rights and call
-- _listening_key: worker roles need all three (grant_worker grants every
-- function to roles granted from now on).
select :pgqueue_schema._grant_to_workers(f)
  from unnest(array[':pgqueue_schema.start_listening(integer)',
                    ':pgqueue_schema.stop_listening()',
                    ':pgqueue_schema._listening_key(integer)']::regprocedure[]) as f;

-- _notify (enqueue_many, the COPY path, hand_back, reap, retry, resume_queue):
-- as in 0008, and only while a worker listens.
create or replace function :pgqueue_schema._notify(p_queues text[]) returns void
language plpgsql
security definer set search_path = pg_catalog, pg_temp
as $$
declare
    v_queues text[];
begin
    v_queues := array(
        select d.q
          from (select distinct coalesce(u.q, 'default') as q
                  from unnest(p_queues) as u(q)) as d
         where not exists (select 1 from :pgqueue_schema.queues s
                            where s.name = d.q and not s.notify));
    -- Quiet queues only: no listening lock is tried (and held), as in enqueue.
    if cardinality(v_queues) = 0 then
        return;
    end if;
    if :pgqueue_schema._nobody_listening() then
        return;
    end if;
    perform pg_notify(:pgqueue_channel, q) from unnest(v_queues) as q;
end
$$;

-- enqueue: as in 0014, and the NOTIFY only while a worker listens.
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
        -- NOTIFY unless the queue is quiet or no worker listens, in the
        -- INSERT's own statement. A CASE fixes the order: the queue's setting
        -- is read first, then the listening lock is tried.
        insert into :pgqueue_schema.jobs (queue, task, args, priority, run_at, max_attempts)
        values (p_queue, p_task, coalesce(p_args, '{}'), p_priority,
                coalesce(p_run_at, pg_catalog.now()), p_max_attempts)
        returning id,
                  case when exists (select from :pgqueue_schema.queues s
                                     where s.name operator(pg_catalog.=) p_queue
                                       and not s.notify)
                       then false
                       when :pgqueue_schema._nobody_listening() then false
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
                           when :pgqueue_schema._nobody_listening() then false
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
