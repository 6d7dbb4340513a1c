-- The runs table grows without the statements that read it growing with it.
--
-- cron_fires.run_id gets the index every other reference to runs has: deleting a run sets the
-- fires that started it to NULL, and without the index each deleted run scanned cron_fires (the
-- retention job deletes runs a thousand at a time). The other references are covered already:
-- run_attempts and run_steps by their primary keys, runs.parent_run_id by runs_parent_idx.
--
-- The run lists' indexes take the status after the owner (the workflow): a filter on a status
-- reads only the runs in that status, newest first, however long the history of the others. A
-- list of every status merges one index scan per status (sluice_api.queries.list_runs), and
-- cancelling a deleted workflow's unfinished runs reads the unfinished runs only. They replace
-- the two listing indexes; and runs_owner_pending_idx goes, since the owner's index now finds an
-- owner's pending runs (a finish asks for them), so a run's row has one index fewer to keep.
--
-- Finished counts: runs that succeeded or failed, per status and minute (run_finish_counts) and
-- hour (run_finish_hours) of finished_at. The triggers below only append a +1 or -1 to
-- run_finish_events in the transaction that moves, inserts or deletes the run: an insert locks
-- no row that another finish needs, where an upsert of the minute's counter serialised every
-- finish of the minute until its commit. sluice_common.runs.fold_finish_events moves the events
-- into the counts (one statement, so a reader sees every finish exactly once), and the queue
-- stats add the whole hours, then the whole minutes of their window's first hour, the events not
-- folded yet, and the runs of its first minute from runs: the same cost at any size of history.
-- depends: 0013_alerts

CREATE INDEX cron_fires_run_idx ON cron_fires (run_id) WHERE run_id IS NOT NULL;
-- A schedule's count of missed slots reads the few fires that record some, not the workflow's
-- every fire.
CREATE INDEX cron_fires_missed_idx ON cron_fires (workflow_id) WHERE missed_slots > 0;

DROP INDEX runs_owner_idx, runs_workflow_idx, runs_owner_pending_idx;
CREATE INDEX runs_owner_status_idx ON runs (owner_id, status, queued_at DESC, id DESC);
CREATE INDEX runs_workflow_status_idx ON runs (workflow_id, status, queued_at DESC, id DESC);

CREATE TABLE run_finish_events (
    status run_status NOT NULL,
    minute timestamptz NOT NULL,
    n      integer NOT NULL
);
-- Every fold deletes what was appended since the last one: vacuumed after a thousand dead rows
-- rather than a fifth of the table, the stats and the folds read a table that stays small.
ALTER TABLE run_finish_events SET (autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_scale_factor = 0);
CREATE TABLE run_finish_counts (
    status run_status NOT NULL,
    minute timestamptz NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (status, minute)
);
CREATE TABLE run_finish_hours (
    status run_status NOT NULL,
    hour   timestamptz NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (status, hour)
);

-- The minute and the hour of a finish: date_bin on a fixed origin does not depend on the
-- session's time zone.
CREATE FUNCTION sluice_finish_minute(t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT date_bin('1 minute', t, timestamptz '2000-01-01 00:00:00+00') $$;
CREATE FUNCTION sluice_finish_hour(t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT date_bin('1 hour', t, timestamptz '2000-01-01 00:00:00+00') $$;

CREATE FUNCTION sluice_count_finished() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status IN ('succeeded', 'failed') AND OLD.finished_at IS NOT NULL THEN
        INSERT INTO run_finish_events VALUES (OLD.status, sluice_finish_minute(OLD.finished_at), -1);
    END IF;
    IF NEW.status IN ('succeeded', 'failed') AND NEW.finished_at IS NOT NULL THEN
        INSERT INTO run_finish_events VALUES (NEW.status, sluice_finish_minute(NEW.finished_at), 1);
    END IF;
    RETURN NULL;
END
$$;

-- Deleted runs (the retention job's batches, a user's deletion) are taken off per statement: one
-- event per minute rather than one per run.
CREATE FUNCTION sluice_uncount_deleted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO run_finish_events
    SELECT status, sluice_finish_minute(finished_at), -count(*) FROM gone
    WHERE status IN ('succeeded', 'failed') AND finished_at IS NOT NULL GROUP BY 1, 2;
    RETURN NULL;
END
$$;

-- The WHEN clauses keep the triggers off every other write of a run (claims, lease renewals,
-- cancels): PostgreSQL checks them without calling the function.
CREATE TRIGGER runs_count_inserted AFTER INSERT ON runs
    FOR EACH ROW WHEN (NEW.status IN ('succeeded', 'failed') AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION sluice_count_finished();
CREATE TRIGGER runs_count_finished AFTER UPDATE OF status, finished_at ON runs
    FOR EACH ROW WHEN ((OLD.status IN ('succeeded', 'failed') OR NEW.status IN ('succeeded', 'failed'))
                       AND (OLD.status IS DISTINCT FROM NEW.status OR OLD.finished_at IS DISTINCT FROM NEW.finished_at))
    EXECUTE FUNCTION sluice_count_finished();
CREATE TRIGGER runs_uncount_deleted AFTER DELETE ON runs
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION sluice_uncount_deleted();

INSERT INTO run_finish_events
SELECT status, sluice_finish_minute(finished_at), count(*) FROM runs
WHERE status IN ('succeeded', 'failed') AND finished_at IS NOT NULL
GROUP BY 1, 2;
