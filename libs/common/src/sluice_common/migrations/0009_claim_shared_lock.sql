-- The claim (as in 0008) without a convoy on one busy user, and with plans it cannot lose.
--
-- 0008 took the owner's advisory lock exclusively for every claim, so all claims of one user ran
-- one at a time, each holding the lock to its commit: on a loaded machine a holder descheduled
-- mid-claim made every other claimer of that user wait. Now, where the cap is larger than
-- max_connections (the most transactions that can be open at once), a claim takes the owner's
-- lock in shared mode (claims do not wait for each other) and goes ahead while running +
-- max_connections < cap: that leaves room for every claim that can be in flight beside it, so
-- together they cannot pass the cap. An exclusive claim waits until no shared one is in flight,
-- then counts what they committed. A shared claim that finds the owner closer to the cap raises
-- serialization_failure, and the worker claims again with p_exclusive, which counts exactly under
-- the exclusive lock, as every claim does where the cap is small.
--
-- The function plans with sorting disabled. PL/pgSQL plans its queries once per session, with
-- the statistics of that moment: planned while the statistics said few runs were waiting (a
-- fresh table, or a quiet spell before a burst), the claim read every waiting run through
-- runs_owner_pending_idx and sorted them, for every claim. Without a sort the only plan left is
-- the one the claim is built for: runs_dispatch_idx read in order, one row at a time.
--
-- And it is declared to return one row (PostgreSQL assumes 1,000 for a set-returning function):
-- costed for 1,000 claimed runs, the worker's claim statement came out above jit_above_cost
-- whenever run_steps looked big enough, and PostgreSQL then compiled it on every execution
-- (120 ms of CPU per claim, a backlog falling to about a hundred starts a second).
-- depends: 0008_state_enums

CREATE FUNCTION sluice_claim_run(
    p_worker text, p_lease_seconds double precision, p_user_cap integer, p_exclusive boolean
)
RETURNS SETOF runs
LANGUAGE plpgsql
ROWS 1
SET enable_sort = off
AS $$
DECLARE
    cand record;
    skipped uuid[] := '{}';
    running integer;
    lock_key bigint;
    slack integer := current_setting('max_connections')::integer;
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
        lock_key := hashtextextended(cand.owner_id::text, 5);
        IF p_user_cap > slack AND NOT p_exclusive THEN
            PERFORM pg_advisory_xact_lock_shared(lock_key);
            SELECT count(*) INTO running FROM runs WHERE owner_id = cand.owner_id AND status = 'running';
            IF running + slack >= p_user_cap THEN
                RAISE EXCEPTION 'user % is close to the cap: claim with the exclusive lock', cand.owner_id
                    USING ERRCODE = 'serialization_failure';
            END IF;
        ELSE
            PERFORM pg_advisory_xact_lock(lock_key);
            SELECT count(*) INTO running FROM runs WHERE owner_id = cand.owner_id AND status = 'running';
        END IF;
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

-- Workers of the previous release, still running during a rolling upgrade, call the claim
-- without p_exclusive: they get the exact, exclusive one.
CREATE OR REPLACE FUNCTION sluice_claim_run(p_worker text, p_lease_seconds double precision, p_user_cap integer)
RETURNS SETOF runs
LANGUAGE sql
ROWS 1
AS $$ SELECT * FROM sluice_claim_run(p_worker, p_lease_seconds, p_user_cap, true) $$;
