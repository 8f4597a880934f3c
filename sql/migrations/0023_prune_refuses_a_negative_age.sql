-- pgqueue 0023: prune refuses an age that is negative or missing.
--
-- prune('-1 hour') deleted every finished job, those finished a moment ago
-- included (older than an hour from now), and a NULL age or NULL states
-- deleted nothing without a word. The CLI and the worker never send either;
-- an operator's own SQL, or an age computed by a script that went wrong, did.
-- Each now raises 22023 (invalid_parameter_value). The rest is 0010's prune.
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
    if p_older_than is null or p_older_than < interval '0' then
        raise exception 'prune needs an age of 0 or more, got %',
                        coalesce(p_older_than::text, 'null')
            using errcode = 'invalid_parameter_value';
    end if;
    if p_states is null then
        raise exception 'prune needs the states to delete, got null'
            using errcode = 'invalid_parameter_value';
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
