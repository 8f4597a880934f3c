-- pgqueue 0007: worker roles granted before 0005 and 0006 may set queue options.
--
-- configure_queue (0005), pause_queue and resume_queue (0006) are revoked from
-- PUBLIC and reach worker roles through grant_worker, which grants the functions
-- that exist when it runs. A role granted before those migrations lacked them
-- until grant_worker was run again. Here every role that may lease (what
-- grant_worker gives and grant_producer does not) gets the three; producers get
-- nothing. Later migrations that add a function for workers do the same through
-- _grant_to_workers.

create function :pgqueue_schema._grant_to_workers(p_function regprocedure)
returns void
language plpgsql as $$
declare
    v_role text;
begin
    for v_role in
        select distinct a.grantee::regrole::text
          from pg_proc p, aclexplode(p.proacl) a
         where p.oid = ':pgqueue_schema.lease(text[], integer, text, double precision)'
                       ::regprocedure
           and a.privilege_type = 'EXECUTE' and a.grantee <> 0
           and a.grantee <> p.proowner
    loop
        execute format('grant execute on function %s to %s', p_function, v_role);
    end loop;
end
$$;
comment on function :pgqueue_schema._grant_to_workers(regprocedure) is
    'Internal (migrations): grant EXECUTE on a function to every role that may '
    'lease, i.e. the worker roles, those granted before the function existed '
    'included.';
revoke execute on function :pgqueue_schema._grant_to_workers(regprocedure)
    from public;

select :pgqueue_schema._grant_to_workers(f)
  from unnest(array[':pgqueue_schema.configure_queue(text, boolean)',
                    ':pgqueue_schema.pause_queue(text)',
                    ':pgqueue_schema.resume_queue(text)']::regprocedure[]) as f;
