-- Alert webhook (SLUICE_ALERT_WEBHOOK_URL): the state of each alert the scheduler's leader
-- evaluates, and the notices of its changes. They live here rather than in the leader's memory so
-- that a replica taking over after a failover neither posts a change again nor drops one that was
-- not delivered yet, and so that a pending alert keeps its `for` clock across the handover.
--
-- alert_states: one row per rule of sluice_scheduler.alerts, made by the first evaluation.
-- `version` counts the row's changes: an evaluator claims a change with
-- UPDATE ... WHERE version = (the one it read), so of two leaders for a moment one makes it, and
-- only that one records the notice.
--
-- alert_notices: an outbox of the changes to post (firing, resolved), written in the transaction
-- of the claim and posted in id order until delivered. `next_attempt_at` is the retry backoff
-- after a failure, and the hold of an attempt under way (a crashed poster's notice is retried).
-- depends: 0012_claim_fence

CREATE TABLE alert_states (
    alertname    text PRIMARY KEY,
    state        text NOT NULL DEFAULT 'inactive' CHECK (state IN ('inactive', 'pending', 'firing')),
    version      bigint NOT NULL DEFAULT 0,
    -- Since when the condition holds (pending and firing), when it started firing, and its value then.
    active_since timestamptz,
    fired_at     timestamptz,
    fired_value  double precision,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alert_notices (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alertname       text NOT NULL,
    status          text NOT NULL CHECK (status IN ('firing', 'resolved')),
    -- The whole JSON document posted, made once so that every attempt sends the same one.
    body            jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);
-- The next notice to post: the oldest undelivered one.
CREATE INDEX alert_notices_undelivered_idx ON alert_notices (id) WHERE delivered_at IS NULL;
