-- pgqueue 0021: a worker's row describes the process that registered last; no
-- pgqueue function is left to PUBLIC.
--
-- register_worker kept the first process's hostname, pid, queues and
-- started_at when an id was registered again: a fixed worker id (a pod's
-- name, say) reused by the next process while the last one was still in its
-- grace showed the old process. It now records the new one, and keeps
-- started_at only when the same process registers again, which a worker now
-- does at every reap (worker.py): reap deletes the rows of workers silent for
-- an hour, and a live worker's row went for good when its heartbeats were an
-- hour or more apart (a lease of 3 hours or more), or when it came back after
-- an hour stopped (SIGSTOP) or cut off from the database.
--
-- _forget_keys (0005) stayed executable by PUBLIC so that worker roles granted
-- before it existed could run complete(), which calls it with their rights.
-- Those roles (the ones that may lease) now get it by name, and PUBLIC loses it.
create or replace function :pgqueue_schema.register_worker(
    p_worker text, p_hostname text, p_pid integer, p_queues text[])
returns void
language sql as $$
    insert into :pgqueue_schema.workers as w (id, hostname, pid, queues)
    values (p_worker, p_hostname, p_pid, p_queues)
    on conflict (id) do update
       set hostname = excluded.hostname,
           pid = excluded.pid,
           queues = excluded.queues,
           started_at = case when w.hostname = excluded.hostname
                              and w.pid = excluded.pid
                             then w.started_at
                             else now() end,
           last_seen = now()
$$;
comment on function :pgqueue_schema.register_worker(text, text, integer, text[]) is
    'Record a worker process as alive (again: its row then describes the '
    'process that registered last).';

select :pgqueue_schema._grant_to_workers(
    ':pgqueue_schema._forget_keys(text[], text[], bigint[])'::regprocedure);
revoke execute on function :pgqueue_schema._forget_keys(text[], text[], bigint[])
    from public;

comment on table :pgqueue_schema.migrations is
    'The migrations applied to this schema (pgqueue migrate).';
