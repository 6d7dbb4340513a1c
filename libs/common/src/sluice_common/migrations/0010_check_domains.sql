-- The run tables' remaining CHECK constraints become domains.
--
-- PostgreSQL rebuilds a table's CHECK expressions from their stored text for every statement that
-- writes one of its rows (and 0008 took the state lists out for that reason). Claiming and
-- finishing a run write runs, run_attempts and run_steps: their six small range checks still cost
-- about a tenth of the database's instructions per run (counted with callgrind on a backend doing
-- nothing else). A domain's check is kept ready in the type cache and runs only on the values a
-- statement assigns, so the same rules hold at a fraction of the cost.
-- depends: 0009_claim_shared_lock

CREATE DOMAIN run_priority AS smallint CHECK (VALUE BETWEEN 1 AND 10);
CREATE DOMAIN attempts_used AS integer CHECK (VALUE >= 0);
CREATE DOMAIN attempt_number AS integer CHECK (VALUE >= 1);
CREATE DOMAIN step_position AS integer CHECK (VALUE >= 0);

ALTER TABLE runs
    DROP CONSTRAINT runs_priority_check,
    DROP CONSTRAINT runs_attempt_check,
    DROP CONSTRAINT runs_max_attempts_check,
    ALTER COLUMN priority TYPE run_priority,
    ALTER COLUMN attempt TYPE attempts_used,
    ALTER COLUMN max_attempts TYPE attempt_number;
ALTER TABLE run_attempts
    DROP CONSTRAINT run_attempts_attempt_check,
    ALTER COLUMN attempt TYPE attempt_number;
ALTER TABLE run_steps
    DROP CONSTRAINT run_steps_position_check,
    DROP CONSTRAINT run_steps_attempt_check,
    ALTER COLUMN position TYPE step_position,
    ALTER COLUMN attempt TYPE attempt_number;
