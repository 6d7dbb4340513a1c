-- Workflow engine: runs parked while a sub-workflow runs, parked attempts, per-user secrets.
-- depends: 0003_claim_function

-- A run whose `workflow` step waits for a child run is 'waiting' (no worker holds it, nothing
-- claims it); the child's end, or the worker housekeeping sweep, puts it back to 'queued'.
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('queued', 'delayed', 'running', 'waiting', 'succeeded', 'failed', 'cancelled'));
ALTER TABLE runs ADD COLUMN waiting_for uuid;
CREATE INDEX runs_waiting_idx ON runs (waiting_for) WHERE status = 'waiting';

-- An attempt that parked its run (durable delay, waiting sub-workflow) used no retry: its
-- attempt number is given back and reused when the run resumes.
ALTER TABLE run_attempts DROP CONSTRAINT run_attempts_status_check;
ALTER TABLE run_attempts ADD CONSTRAINT run_attempts_status_check
    CHECK (status IN ('running', 'parked', 'succeeded', 'failed', 'cancelled'));

-- Secrets are stored encrypted (AES-GCM, see sluice_common.secrets); never their values in clear.
CREATE TABLE user_secrets (
    owner_id   uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name       text NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]{0,63}$'),
    ciphertext bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, name)
);
