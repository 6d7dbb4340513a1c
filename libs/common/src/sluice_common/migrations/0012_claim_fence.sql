-- Fencing: every claim of a run carries a token nothing can repeat (runs.claim_id, a random UUID
-- drawn by the claim), and checkpoints, lease renewals and the finish are accepted only with the
-- current one.
--
-- The claim commits without waiting for the WAL flush, so a database crash right after it can lose
-- the claim while its worker has already started the run. The run is then claimed again, by the
-- same worker id with the same attempt number; a guard on (status, worker_id, attempt) let the
-- first execution's late checkpoints and finish through. The token of a lost claim matches no
-- row, so the stale execution can neither overwrite nor close the newer one. It is recorded as an
-- attempt of its own once it is found out (`lost`), next to the attempt that took its number:
-- the primary key of run_attempts takes `lost` in, so the two can share the number.
-- depends: 0011_workflow_versions

ALTER TABLE runs ADD COLUMN claim_id uuid;
ALTER TABLE run_attempts ADD COLUMN claim_id uuid;
ALTER TABLE run_attempts ADD COLUMN lost boolean NOT NULL DEFAULT false;
ALTER TABLE run_attempts DROP CONSTRAINT run_attempts_pkey, ADD PRIMARY KEY (run_id, attempt, lost);
