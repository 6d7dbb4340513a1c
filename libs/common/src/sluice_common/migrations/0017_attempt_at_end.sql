-- An attempt's row is written once, when the attempt ends, not inserted at the claim and updated at
-- the end.
--
-- While an attempt runs, the run's row says all there is to say about it: its number, its worker,
-- its claim and, from now on, when it started (attempt_started_at, set by every claim). The
-- statements that end an attempt (the finishes, recovery, a lost execution) insert its row, or
-- update the row an earlier attempt of the same number left (a parked attempt gives its number
-- back), or the running row a claim of the previous release inserted. The API shows a running
-- attempt from the run's row (runstate.ATTEMPTS). A claim no longer writes to run_attempts: one
-- insert, its index entries and its foreign-key check less per run, and one row version less.
-- depends: 0016_finish_count_checks

ALTER TABLE runs ADD COLUMN attempt_started_at timestamptz;

-- The runs running now were claimed by the previous release, whose claims inserted their running
-- attempt: its start is theirs.
UPDATE runs r SET attempt_started_at = a.started_at
FROM run_attempts a
WHERE r.status = 'running' AND a.run_id = r.id AND a.attempt = r.attempt AND NOT a.lost AND a.status = 'running';
