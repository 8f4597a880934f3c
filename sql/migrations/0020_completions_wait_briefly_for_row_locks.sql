-- pgqueue 0020: the worker's completions and failures wait only briefly for a
-- row lock.
--
-- A worker writes its completions (and its failures) one statement at a time.
-- When another session held the row of one of them (a transaction that ran
-- SELECT ... FOR UPDATE on pgqueue.jobs and stayed open), the statement waited
-- for that lock until the worker's deadline cancelled it, and then again, with
-- every completion and failure of the worker held up behind it; at shutdown
-- they were dropped, and their jobs ran again once their leases ran out.
--
-- complete_waiting and fail_many_waiting are complete and fail_many with a
-- lock wait of the caller's choosing: they set lock_timeout for the rest of
-- the transaction (the worker's statement is a transaction of its own), so
-- that one gives up with 55P03 (lock_not_available), and the worker writes
-- the others and sets the locked one aside for a while (worker.py). The
-- worker waits a quarter of its deadline (--db-timeout), at most 2 s, so its
-- own cancel at half the deadline never comes first. complete and fail_many
-- themselves are unchanged: complete_all calls complete inside a batch's
-- transaction, where a lock error would run the batch's handlers again.
create function :pgqueue_schema._wait_for_locks_at_most(p_lock_wait_ms integer)
returns void
language plpgsql
as $$
begin
    if p_lock_wait_ms is null or p_lock_wait_ms < 1 then
        raise exception 'lock wait must be at least 1 ms, got %',
                        coalesce(p_lock_wait_ms::text, 'null')
              using errcode = 'invalid_parameter_value';
    end if;
    perform pg_catalog.set_config('lock_timeout', p_lock_wait_ms::text, true);
end
$$;
comment on function :pgqueue_schema._wait_for_locks_at_most(integer) is
    'Internal: lock_timeout until the end of the transaction (22023 under 1 ms).';

create function :pgqueue_schema.complete_waiting(
    p_ids          bigint[],
    p_tokens       uuid[],
    p_results      jsonb[],
    p_lock_wait_ms integer
) returns setof bigint
language plpgsql
as $$
begin
    perform :pgqueue_schema._wait_for_locks_at_most(p_lock_wait_ms);
    return query select c from :pgqueue_schema.complete(p_ids, p_tokens, p_results) c;
end
$$;
comment on function :pgqueue_schema.complete_waiting(bigint[], uuid[], jsonb[], integer) is
    'complete(), waiting at most p_lock_wait_ms for a row lock (55P03 after '
    'that); sets lock_timeout until the end of the transaction. The worker''s '
    'batched completions.';

create function :pgqueue_schema.fail_many_waiting(
    p_ids          bigint[],
    p_tokens       uuid[],
    p_errors       jsonb[],
    p_delays       double precision[],
    p_lock_wait_ms integer
) returns table (id bigint, token uuid, state :pgqueue_schema.job_state)
language plpgsql
as $$
begin
    perform :pgqueue_schema._wait_for_locks_at_most(p_lock_wait_ms);
    return query select f.id, f.token, f.state
                   from :pgqueue_schema.fail_many(p_ids, p_tokens, p_errors, p_delays) f;
end
$$;
comment on function :pgqueue_schema.fail_many_waiting(
    bigint[], uuid[], jsonb[], double precision[], integer) is
    'fail_many(), waiting at most p_lock_wait_ms for a row lock (55P03 after '
    'that); sets lock_timeout until the end of the transaction. The worker''s '
    'batched failures.';

revoke execute on function :pgqueue_schema._wait_for_locks_at_most(integer)
    from public;
revoke execute on function :pgqueue_schema.complete_waiting(
    bigint[], uuid[], jsonb[], integer) from public;
revoke execute on function :pgqueue_schema.fail_many_waiting(
    bigint[], uuid[], jsonb[], double precision[], integer) from public;
select :pgqueue_schema._grant_to_workers(f)
  from unnest(array[
      ':pgqueue_schema._wait_for_locks_at_most(integer)',
      ':pgqueue_schema.complete_waiting(bigint[], uuid[], jsonb[], integer)',
      ':pgqueue_schema.fail_many_waiting(bigint[], uuid[], jsonb[], double precision[], integer)'
  ]::regprocedure[]) as f;
