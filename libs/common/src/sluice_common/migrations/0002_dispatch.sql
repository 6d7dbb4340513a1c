-- Dispatch order for the run pipeline: runs are claimed in PostgreSQL by dispatch_at, which is
-- the time a run became (or becomes) ready plus (priority - 1) aging steps. Lower goes first.
-- depends: 0001_initial

ALTER TABLE runs ADD COLUMN dispatch_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX runs_dispatch_idx ON runs (dispatch_at) WHERE status IN ('queued', 'delayed');
-- Per-user concurrency (fairness) and lease recovery look at running runs only.
CREATE INDEX runs_running_idx ON runs (owner_id, lease_expires_at) WHERE status = 'running';
