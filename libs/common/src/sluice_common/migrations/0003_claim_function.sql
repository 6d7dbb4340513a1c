-- Claiming a run, exact per-user cap without a global lock.
-- The best runnable run (dispatch_at order) is locked with SKIP LOCKED; then its owner's lock is
-- taken and the owner's running count is read with a fresh snapshot (each statement of a
-- PL/pgSQL function in READ COMMITTED gets one), so two claims for one user are serialised while
-- claims for different users run in parallel. Owners at their cap are skipped.
-- depends: 0002_dispatch

CREATE FUNCTION sluice_claim_run(p_worker text, p_lease_seconds double precision, p_user_cap integer)
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
        SELECT r.id, r.owner_id INTO cand FROM runs r
        WHERE r.status IN ('queued', 'delayed')
          AND coalesce(r.not_before, '-infinity') <= now()
          AND NOT r.cancel_requested
          AND r.owner_id <> ALL (skipped)
        ORDER BY r.dispatch_at, r.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
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

-- A finishing run asks whether its owner has runs due (to wake one if the owner was at the cap).
CREATE INDEX runs_owner_pending_idx ON runs (owner_id) WHERE status IN ('queued', 'delayed');
