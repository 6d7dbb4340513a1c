-- The dashboard's sign-in sessions, and an index for its runs list filtered by trigger.
--
-- A session is opened with an API token and lives server-side so that signing out (or revoking
-- the token it was opened with, or disabling the user) ends it at once. The browser holds only
-- the session id, a random 256-bit value; the table holds its SHA-256, so a copy of the table
-- opens no session.
--
-- runs_owner_trigger_idx: the runs list filtered by trigger, newest first, reads only matching
-- rows however few of a user's runs match (the owner and status index alone would walk past all
-- the others: a million of them for a trigger that never fired). Like the other listing indexes
-- (0014) it takes the status next, for the list's one read per status.
-- depends: 0014_scale

CREATE TABLE dashboard_sessions (
    id_hash    bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_id   uuid NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_expiry_idx ON dashboard_sessions (expires_at);

CREATE INDEX runs_owner_trigger_idx ON runs (owner_id, trigger_type, status, queued_at DESC, id DESC);
