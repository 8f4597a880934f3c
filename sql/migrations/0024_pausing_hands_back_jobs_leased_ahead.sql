-- pgqueue 0024: pausing a queue tells its workers, and they hand back the jobs
-- of the queue they leased ahead.
--
-- A paused queue is leased no more, but a worker still started the jobs it had
-- leased before the pause and kept waiting for a free slot (--prefetch): up to
-- that many jobs per worker ran after the pause, the drains' 500 each. Whoever
-- pauses a queue in an incident wants no job of it to start. pause_queue now
-- sends NOTIFY 'paused <queue>' (with a space, which no queue name holds), and
-- a worker that listens hands such jobs back at once (worker.py); jobs already
-- running finish. Workers of earlier versions read the payload as no queue of
-- theirs and ignore it.
create or replace function :pgqueue_schema.pause_queue(p_queue text) returns void
language plpgsql as $$
begin
    insert into :pgqueue_schema.queues (name, paused) values (p_queue, true)
    on conflict (name) do update set paused = true;
    perform pg_notify(:pgqueue_channel, 'paused ' || p_queue);
end
$$;
comment on function :pgqueue_schema.pause_queue(text) is
    'Stop workers leasing jobs of the queue; they hand back the jobs of it they '
    'leased ahead and have not started (running jobs finish). resume_queue '
    'undoes it.';
