-- Sluice initial schema: users and tokens, workflows, runs, attempts, steps, cron fires.
-- depends:

CREATE TABLE users (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

-- Tokens are stored only as SHA-256 hashes; the prefix lets a person tell tokens apart.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash   bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    label        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_tokens_user_idx ON api_tokens (user_id);

CREATE TABLE workflows (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    description  text,
    trigger_type text NOT NULL CHECK (trigger_type IN ('manual', 'cron', 'webhook')),
    trigger      jsonb NOT NULL,
    steps        jsonb NOT NULL,
    settings     jsonb NOT NULL DEFAULT '{}'::jsonb,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    version      integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    -- Hash of the webhook secret: the secret URL is looked up without storing the secret itself.
    webhook_secret_hash bytea UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
-- API listing: a user's workflows, newest first, with keyset pagination.
CREATE INDEX workflows_owner_idx ON workflows (owner_id, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
-- Scheduler: all active cron workflows.
CREATE INDEX workflows_active_cron_idx ON workflows (id)
    WHERE trigger_type = 'cron' AND status = 'active' AND deleted_at IS NULL;

CREATE TABLE runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workflow_id      uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    owner_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    workflow_version integer NOT NULL,
    parent_run_id    uuid REFERENCES runs (id) ON DELETE SET NULL,
    trigger_type     text NOT NULL
        CHECK (trigger_type IN ('manual', 'cron', 'webhook', 'workflow', 'retry')),
    trigger_data     jsonb NOT NULL DEFAULT '{}'::jsonb,
    priority         smallint NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    status           text NOT NULL
        CHECK (status IN ('queued', 'delayed', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt          integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    queued_at        timestamptz NOT NULL DEFAULT now(),
    not_before       timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    error            text,
    idempotency_key  text,
    traceparent      text,
    cancel_requested boolean NOT NULL DEFAULT false,
    -- Which worker holds the run and until when; an expired lease means the worker is gone.
    worker_id        text,
    lease_expires_at timestamptz
);
CREATE UNIQUE INDEX runs_idempotency_idx ON runs (workflow_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- API listings, newest first, keyset pagination (per user, and per workflow).
CREATE INDEX runs_owner_idx ON runs (owner_id, queued_at DESC, id DESC);
CREATE INDEX runs_workflow_idx ON runs (workflow_id, queued_at DESC, id DESC);
-- Reconciler, stats and recovery: the unfinished runs only, which stay few.
CREATE INDEX runs_unfinished_idx ON runs (status, priority, queued_at)
    WHERE status IN ('queued', 'delayed', 'running');
-- Stats (completed in 24 h, failed in 7 days) and history pruning.
CREATE INDEX runs_finished_idx ON runs (status, finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_parent_idx ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;

CREATE TABLE run_attempts (
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    worker_id   text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    error       text,
    PRIMARY KEY (run_id, attempt)
);

CREATE TABLE run_steps (
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_id     text NOT NULL,
    position    integer NOT NULL CHECK (position >= 0),
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'skipped', 'waiting')),
    attempt     integer NOT NULL CHECK (attempt >= 1),
    output      jsonb,
    error       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (run_id, step_id)
);

-- One row per (workflow, scheduled time): the unique key is what makes each fire happen once.
CREATE TABLE cron_fires (
    workflow_id  uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    scheduled_at timestamptz NOT NULL,
    fired_at     timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL CHECK (outcome IN ('fired', 'skipped_overlap', 'missed', 'catch_up')),
    run_id       uuid REFERENCES runs (id) ON DELETE SET NULL,
    PRIMARY KEY (workflow_id, scheduled_at)
);
CREATE INDEX cron_fires_latest_idx ON cron_fires (workflow_id, scheduled_at DESC);
