-- pgqueue 0003: least privilege.
--
-- Three kinds of roles (see README, "Roles"):
--   owner     owns the schema and runs `pgqueue migrate`; needs no superuser.
--   worker    runs `pgqueue worker`: reads and changes jobs through the functions;
--             no DDL, no superuser.            select pgqueue.grant_worker('role');
--   producer  may only enqueue: it cannot read jobs (their payloads may hold
--             other tenants' data).            select pgqueue.grant_producer('role');

-- Enqueue runs with the owner's rights, so a producer needs no SELECT on the
-- tables (INSERT ... RETURNING and the idempotency lookup read them). The
-- search_path is pinned, as for any SECURITY DEFINER function; every object is
-- schema-qualified anyway.
alter function :pgqueue_schema.enqueue(
    text, jsonb, text, integer, timestamptz, integer, text)
    security definer set search_path = pg_catalog, pg_temp;
alter function :pgqueue_schema.enqueue_many(
    text[], jsonb[], text[], integer[], timestamptz[], integer[], text[])
    security definer set search_path = pg_catalog, pg_temp;

-- Functions are executable by PUBLIC by default; pgqueue's are granted explicitly.
revoke execute on all functions in schema :pgqueue_schema from public;

create function :pgqueue_schema.grant_producer(p_role text) returns void
language plpgsql as $$
begin
    execute format('grant usage on schema :pgqueue_schema to %I', p_role);
    execute format('grant execute on function :pgqueue_schema.enqueue('
                   'text, jsonb, text, integer, timestamptz, integer, text) to %I',
                   p_role);
    execute format('grant execute on function :pgqueue_schema.enqueue_many('
                   'text[], jsonb[], text[], integer[], timestamptz[], integer[], '
                   'text[]) to %I', p_role);
    -- Bulk enqueue from Python streams rows with COPY: INSERT (not SELECT) on
    -- the hot table, ids from the sequence, and the NOTIFY helper.
    execute format('grant insert on :pgqueue_schema.jobs to %I', p_role);
    execute format('grant usage on sequence :pgqueue_schema.jobs_id_seq to %I',
                   p_role);
    execute format('grant execute on function :pgqueue_schema._notify(text[]) '
                   'to %I', p_role);
end
$$;
comment on function :pgqueue_schema.grant_producer(text) is
    'Let a role enqueue jobs (function, COPY) without reading any job.';

create function :pgqueue_schema.grant_worker(p_role text) returns void
language plpgsql as $$
begin
    execute format('grant usage on schema :pgqueue_schema to %I', p_role);
    execute format('grant execute on all functions in schema :pgqueue_schema to %I',
                   p_role);
    execute format('revoke execute on function :pgqueue_schema.grant_worker(text), '
                   ':pgqueue_schema.grant_producer(text) from %I', p_role);
    execute format('grant select, insert, update, delete on all tables in schema '
                   ':pgqueue_schema to %I', p_role);
    execute format('grant usage on all sequences in schema :pgqueue_schema to %I',
                   p_role);
end
$$;
comment on function :pgqueue_schema.grant_worker(text) is
    'Let a role run workers and the CLI (no DDL): execute the functions, read '
    'and change the tables.';

revoke execute on function :pgqueue_schema.grant_producer(text) from public;
revoke execute on function :pgqueue_schema.grant_worker(text) from public;
