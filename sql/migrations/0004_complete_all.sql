-- pgqueue 0004: complete_all, the fenced completion of a whole transaction batch.
--
-- A worker running transactional jobs in batches (`--tx-batch N`) runs several
-- handlers in one transaction and completes them all at its end, together with
-- the COMMIT. complete_all completes every job named, or none: if one lease was
-- lost it raises PQ004, which aborts the caller's transaction, so no job's
-- writes commit without its own fenced completion. The worker then reruns the
-- batch one savepoint per job (complete_one), which fences each job alone.

create function :pgqueue_schema.complete_all(
    p_ids     bigint[],
    p_tokens  uuid[],
    p_results jsonb[] default null
) returns void
language plpgsql
set enable_nestloop = off  -- see complete()
set jit = off
as $$
declare
    v_done bigint[];
    v_missing bigint;
begin
    v_done := array(select :pgqueue_schema.complete(p_ids, p_tokens, p_results));
    if cardinality(v_done) < coalesce(cardinality(p_ids), 0) then
        select t.id into v_missing
          from unnest(p_ids) as t(id)
         where t.id <> all(v_done)
         limit 1;
        raise exception 'lease of job % was lost (% of % jobs completed); the '
                        'batch is rolled back', v_missing, cardinality(v_done),
                        cardinality(p_ids)
              using errcode = 'PQ004';
    end if;
end
$$;
comment on function :pgqueue_schema.complete_all(bigint[], uuid[], jsonb[]) is
    'Complete every one of these running jobs (fenced by lease token) in the '
    'caller''s transaction, or raise PQ004 if any lease was lost.';

-- Workers granted before this migration get the new function too: it is what
-- `pgqueue worker --tx-batch` calls.
revoke execute on function :pgqueue_schema.complete_all(bigint[], uuid[], jsonb[])
    from public;
do $$
declare
    v_role text;
begin
    for v_role in
        select distinct a.grantee::regrole::text
          from pg_proc p, aclexplode(p.proacl) a
         where p.oid = ':pgqueue_schema.complete(bigint[], uuid[], jsonb[])'
                       ::regprocedure
           and a.privilege_type = 'EXECUTE' and a.grantee <> 0
           and a.grantee <> p.proowner
    loop
        execute format('grant execute on function '
                       ':pgqueue_schema.complete_all(bigint[], uuid[], jsonb[]) to %s',
                       v_role);
    end loop;
end
$$;
