-- pgqueue 0020: complete and fail_many wait at most 2 s for a row lock.
--
-- A worker writes its completions (and its failures) one statement at a time.
-- When another session held the row of one of them (a transaction that ran
-- SELECT ... FOR UPDATE on pgqueue.jobs and stayed open), the statement waited
-- for that lock until the worker's deadline cancelled it, and then again, with
-- every completion and failure of the worker held up behind it; at shutdown
-- they were dropped, and their jobs ran again once their leases ran out. Now
-- the statement gives up after 2 s with 55P03 (lock_not_available), and the
-- worker writes the others and sets the locked ones aside for a while
-- (worker.py). The setting is the functions' own, so it reaches no other
-- statement and passes through a transaction pooler. A later migration that
-- replaces either function must set it again (CREATE OR REPLACE resets it).
alter function :pgqueue_schema.complete(bigint[], uuid[], jsonb[])
    set lock_timeout = '2s';
alter function :pgqueue_schema.fail_many(
    bigint[], uuid[], jsonb[], double precision[])
    set lock_timeout = '2s';
