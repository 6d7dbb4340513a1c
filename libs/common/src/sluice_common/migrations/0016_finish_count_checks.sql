-- The finished-run counts' triggers (0014) with conditions PostgreSQL checks for less.
--
-- PostgreSQL keeps a trigger's WHEN clause as stored text and parses it again in every statement
-- that may fire the trigger: every claim and every finish of a run paid for reading the update
-- trigger's condition back into an expression. The function now decides itself, returning at once
-- unless the status or the finish time changed; the counting is as before.
--
-- A run counts while it is succeeded or failed with a finish time, and every statement that moves
-- a run into or out of those states sets finished_at (runstate's test of its transitions checks
-- it). So the update trigger is limited to UPDATE OF finished_at: PostgreSQL checks the statement's
-- target columns without calling the function, and claims, wake-ups, lease renewals and cancel
-- requests never reach it. The insert trigger keeps the shortest condition that lets a new run,
-- which has no finish time, by without a call.
-- depends: 0015_dashboard_sessions

CREATE OR REPLACE FUNCTION sluice_count_finished() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.status IS NOT DISTINCT FROM NEW.status AND OLD.finished_at IS NOT DISTINCT FROM NEW.finished_at THEN
            RETURN NULL;
        END IF;
        IF OLD.status IN ('succeeded', 'failed') AND OLD.finished_at IS NOT NULL THEN
            INSERT INTO run_finish_events VALUES (OLD.status, sluice_finish_minute(OLD.finished_at), -1);
        END IF;
    END IF;
    IF NEW.status IN ('succeeded', 'failed') AND NEW.finished_at IS NOT NULL THEN
        INSERT INTO run_finish_events VALUES (NEW.status, sluice_finish_minute(NEW.finished_at), 1);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER runs_count_inserted ON runs;
DROP TRIGGER runs_count_finished ON runs;
CREATE TRIGGER runs_count_inserted AFTER INSERT ON runs
    FOR EACH ROW WHEN (NEW.finished_at IS NOT NULL) EXECUTE FUNCTION sluice_count_finished();
CREATE TRIGGER runs_count_finished AFTER UPDATE OF finished_at ON runs
    FOR EACH ROW EXECUTE FUNCTION sluice_count_finished();
