-- pgqueue 0013: producers may INSERT into jobs only the columns the bulk COPY
-- sends.
--
-- grant_producer gave producers INSERT on the whole hot table, for the COPY
-- that bulk enqueue streams (id, queue, task, args, priority, run_at,
-- max_attempts). With it a producer could also write the columns that only
-- the transitions own: a row born 'running' with a lease token of its own
-- choosing, attempts and errors already filled in, an idempotency key that
-- no idempotency_keys row stands for. Now a producer gets INSERT on the
-- seven columns COPY sends, and every other column takes its default.
--
-- Producers granted before this migration are found as the roles that may
-- INSERT into jobs but not UPDATE it (workers may do both): their INSERT is
-- revoked and grant_producer run again for them.

create or replace function :pgqueue_schema.grant_producer(p_role text) returns void
language plpgsql as $$
begin
    execute format('grant usage on schema :pgqueue_schema to %I', p_role);
    execute format('grant execute on function :pgqueue_schema.enqueue('
                   'text, jsonb, text, integer, timestamptz, integer, text) to %I',
                   p_role);
    execute format('grant execute on function :pgqueue_schema.enqueue_many('
                   'text[], jsonb[], text[], integer[], timestamptz[], integer[], '
                   'text[]) to %I', p_role);
    -- Bulk enqueue from Python streams rows with COPY: INSERT on the columns it
    -- sends (not SELECT), ids from the sequence, and the NOTIFY helper.
    execute format('grant insert (id, queue, task, args, priority, run_at, '
                   'max_attempts) on :pgqueue_schema.jobs to %I', p_role);
    execute format('grant usage on sequence :pgqueue_schema.jobs_id_seq to %I',
                   p_role);
    execute format('grant execute on function :pgqueue_schema._notify(text[]) '
                   'to %I', p_role);
end
$$;

do $$
declare
    v_role text;
begin
    for v_role in
        select distinct pg_get_userbyid(a.grantee)
          from pg_class c, aclexplode(c.relacl) a
         where c.oid = ':pgqueue_schema.jobs'::regclass
           and a.privilege_type = 'INSERT' and a.grantee <> 0
           and a.grantee <> c.relowner
           and not has_table_privilege(a.grantee, c.oid, 'UPDATE')
    loop
        execute format('revoke insert on :pgqueue_schema.jobs from %I', v_role);
        -- The producer's grants as they are now; the others it holds already.
        perform :pgqueue_schema.grant_producer(v_role);
    end loop;
end
$$;
