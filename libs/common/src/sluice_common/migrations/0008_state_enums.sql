-- Run, attempt and step states (and run triggers) become enum types instead of text columns with
-- CHECK (... IN (...)) constraints. PostgreSQL rebuilds a table's CHECK expressions from their
-- stored form for every statement that writes a row, and these lists were the costliest part of
-- writing a run (accepting it, claiming it and finishing it each write one): an enum checks the
-- value as it is read in, at no cost per statement. Partial indexes whose predicates name a
-- status are made again over the new type.
-- depends: 0007_runs_owner_fk

DROP INDEX runs_unfinished_idx, runs_dispatch_idx, runs_running_idx, runs_owner_pending_idx, runs_waiting_idx;
ALTER TABLE runs DROP CONSTRAINT runs_status_check, DROP CONSTRAINT runs_trigger_type_check;
ALTER TABLE run_attempts DROP CONSTRAINT run_attempts_status_check;
ALTER TABLE run_steps DROP CONSTRAINT run_steps_status_check;

CREATE TYPE run_status AS ENUM ('queued', 'delayed', 'running', 'waiting', 'succeeded', 'failed', 'cancelled');
CREATE TYPE run_trigger AS ENUM ('manual', 'cron', 'webhook', 'workflow', 'retry');
CREATE TYPE attempt_status AS ENUM ('running', 'parked', 'succeeded', 'failed', 'cancelled');
CREATE TYPE step_status AS ENUM ('running', 'succeeded', 'failed', 'skipped', 'waiting');

ALTER TABLE runs
    ALTER COLUMN status TYPE run_status USING status::run_status,
    ALTER COLUMN trigger_type TYPE run_trigger USING trigger_type::run_trigger;
ALTER TABLE run_attempts ALTER COLUMN status TYPE attempt_status USING status::attempt_status;
ALTER TABLE run_steps ALTER COLUMN status TYPE step_status USING status::step_status;

CREATE INDEX runs_unfinished_idx ON runs (status, priority, queued_at)
    WHERE status IN ('queued', 'delayed', 'running');
CREATE INDEX runs_dispatch_idx ON runs (dispatch_at) WHERE status IN ('queued', 'delayed');
CREATE INDEX runs_running_idx ON runs (owner_id, lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_owner_pending_idx ON runs (owner_id) WHERE status IN ('queued', 'delayed');
CREATE INDEX runs_waiting_idx ON runs (waiting_for) WHERE status = 'waiting';
