-- Run, attempt and step states (and run triggers) become enum types instead of text columns with
-- CHECK (... IN (...)) constraints. PostgreSQL rebuilds a table's CHECK expressions from their
-- stored form for every statement that writes a row, and these lists took about a quarter of the
-- database time of inserting a run (accepting, claiming and finishing a run each write one): an
-- enum checks the value as it is read in, at no cost per statement. Partial indexes whose predicates name a
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
-- The claim's exact order (dispatch_at, then id): read straight off the index, one row at a time,
-- with no sort step between the scan and the row locks that skip runs other workers hold.
CREATE INDEX runs_dispatch_idx ON runs (dispatch_at, id) WHERE status IN ('queued', 'delayed');
CREATE INDEX runs_running_idx ON runs (owner_id, lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_owner_pending_idx ON runs (owner_id) WHERE status IN ('queued', 'delayed');
CREATE INDEX runs_waiting_idx ON runs (waiting_for) WHERE status = 'waiting';

-- The claim (as in 0003, but for the first query) with its common case free of parameters: PL/pgSQL caches a generic plan for
-- a query that uses a variable, and for "owner_id <> ALL (skipped)" PostgreSQL estimates a single
-- matching row, so that plan sorts every pending run instead of reading the dispatch index. Only
-- when an owner at its cap was skipped does the claim look again, planned for the actual list.
CREATE OR REPLACE FUNCTION sluice_claim_run(p_worker text, p_lease_seconds double precision, p_user_cap integer)
RETURNS SETOF runs
LANGUAGE plpgsql
AS $$
DECLARE
    cand record;
    skipped uuid[] := '{}';
    running integer;
BEGIN
    -- A claim lost in a database crash only puts the run back in the queue: its commit need
    -- not wait for the WAL flush (outcomes always do). Local to this statement's transaction.
    PERFORM set_config('synchronous_commit', 'off', true);
    LOOP
        IF cardinality(skipped) = 0 THEN
            SELECT r.id, r.owner_id INTO cand FROM runs r
            WHERE r.status IN ('queued', 'delayed')
              AND coalesce(r.not_before, '-infinity') <= now()
              AND NOT r.cancel_requested
            ORDER BY r.dispatch_at, r.id
            LIMIT 1
            FOR UPDATE SKIP LOCKED;
        ELSE
            EXECUTE 'SELECT r.id, r.owner_id FROM runs r
                     WHERE r.status IN (''queued'', ''delayed'')
                       AND coalesce(r.not_before, ''-infinity'') <= now()
                       AND NOT r.cancel_requested
                       AND r.owner_id <> ALL ($1)
                     ORDER BY r.dispatch_at, r.id
                     LIMIT 1
                     FOR UPDATE SKIP LOCKED' INTO cand USING skipped;
        END IF;
        IF cand.id IS NULL THEN
            RETURN;
        END IF;
        PERFORM pg_advisory_xact_lock(hashtextextended(cand.owner_id::text, 5));
        SELECT count(*) INTO running FROM runs WHERE owner_id = cand.owner_id AND status = 'running';
        IF running < p_user_cap THEN
            RETURN QUERY
            UPDATE runs SET status = 'running', attempt = attempt + 1,
                   started_at = coalesce(started_at, now()), worker_id = p_worker,
                   lease_expires_at = now() + make_interval(secs => p_lease_seconds),
                   updated_at = now(), error = NULL
            WHERE id = cand.id
            RETURNING *;
            RETURN;
        END IF;
        skipped := skipped || cand.owner_id;
    END LOOP;
END
$$;
