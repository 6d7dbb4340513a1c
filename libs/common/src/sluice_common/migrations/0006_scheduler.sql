-- Cron scheduler: fires held back by the overlap policy `queue_one`, counts of missed slots, and
-- the indexes of history pruning.
-- depends: 0003_claim_function

-- 'deferred': the slot is claimed but its run waits until the workflow's previous run finishes.
ALTER TABLE cron_fires DROP CONSTRAINT cron_fires_outcome_check;
ALTER TABLE cron_fires ADD CONSTRAINT cron_fires_outcome_check
    CHECK (outcome IN ('fired', 'skipped_overlap', 'missed', 'catch_up', 'deferred'));
-- How many scheduled slots this row stands for that did not run on time (scheduler down). One row
-- covers a whole outage, so an every-second schedule down for a day writes one row, not 86,400.
ALTER TABLE cron_fires ADD COLUMN missed_slots integer NOT NULL DEFAULT 0 CHECK (missed_slots >= 0);
CREATE INDEX cron_fires_deferred_idx ON cron_fires (workflow_id) WHERE outcome = 'deferred';
-- Pruning old fires: rows without missed slots, oldest first.
CREATE INDEX cron_fires_prune_idx ON cron_fires (scheduled_at) WHERE missed_slots = 0;
