-- pgqueue 0022: a job's run_at stays within the years clients can read.
--
-- Python's datetime holds years 1 to 9999. enqueue and enqueue_many took any
-- run_at, 'infinity' and '-infinity' included, and so did a producer's COPY:
-- a worker whose lease met such a row could not read the lease's answer,
-- after the database had leased the whole batch, so every job leased with it
-- waited out its lease and was reaped with an attempt counted (dead, with one
-- attempt allowed), none of them run; 'infinity' made next_run_at's
-- arithmetic fail at every poll, and '-infinity' that of queue_depth
-- (pgqueue stats). The pgqueue Python API refused them already.
--
-- A day's margin on either side keeps the value readable in any time zone.
-- The check comes first, NOT VALID (no scan of the table under its
-- strongest lock), so that no new row can be written out of range; then the
-- rows already out of range, all of them now visible, are brought to its edge,
-- so that a lease that meets one can write it (the check holds for every row
-- written). The other way round, a row committed between the two escaped the
-- UPDATE, and every lease of its queue then failed on the check. The lock is
-- waited for at most 5 s, as in 0012: behind it every enqueue and lease would
-- wait too; migrate again when the transaction that held it is gone.
set local lock_timeout = '5s';
alter table :pgqueue_schema.jobs
    add constraint jobs_run_at_range check (
        run_at >= timestamptz '0001-01-02 00:00:00+00'
        and run_at <= timestamptz '9999-12-30 00:00:00+00') not valid;
comment on constraint jobs_run_at_range on :pgqueue_schema.jobs is
    'run_at within the years clients read (Python: 1 to 9999), a day inside '
    'them for any time zone.';

update :pgqueue_schema.jobs
   set run_at = greatest(
           least(run_at, timestamptz '9999-12-30 00:00:00+00'),
           timestamptz '0001-01-02 00:00:00+00')
 where not (run_at >= timestamptz '0001-01-02 00:00:00+00'
            and run_at <= timestamptz '9999-12-30 00:00:00+00');
