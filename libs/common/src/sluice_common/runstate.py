"""The run state machine: states, transitions, the dispatch rule, and every statement that moves a run.

Nothing outside this module writes ``runs.status`` (a test scans the sources for it). Callers
orchestrate (the producer inserts, the worker claims, executes and finishes, the API cancels and
retries, the scheduler recovers and wakes) through the statements and functions here.

```
            enqueue                 claim                    finish
   (new) ──────────▶ queued ────────────────▶ running ──────────────────▶ succeeded | failed | cancelled
            enqueue    ▲ │ ▲ ◀──────────────────┘ │ │ │   (retry, hand back, park: see TRANSITIONS)
   (new) ─▶ delayed ───┘ │ └── wake / retry ──────┘ │ └──▶ waiting (parked on a sub-workflow run)
                │        └──── cancel ─────────────▶ cancelled ◀── cancel ── delayed | waiting
                └──── claim (once due) ──▶ running
```

- **Dispatch rule**: runs are claimed in ``dispatch_at`` order, and ``dispatch_at`` is the time a
  run became (or becomes) ready plus ``(priority - 1) * SLUICE_PRIORITY_AGING_SECONDS``
  (:data:`DISPATCH_AT_FUNCTION`, the SQL function ``sluice_dispatch_at`` every statement uses).
  Priority 1 therefore goes before priority 10 that became ready less than nine aging steps
  earlier, and no run waits behind later, more urgent work for longer than that.
- **Claims** go through ``sluice_claim_runs`` (:data:`CLAIM_FUNCTION`): the best runnable runs in
  dispatch order (as many as the claim asks for: one per worker thread that asked at once),
  skipping users at their concurrency cap, locking per user; a claim that finds
  nothing only because other claims hold every runnable run says so, and its wake-up is sent
  again instead of dropped. The function and the dispatch rule live here and are (re)installed
  by every ``sluice migrate`` (:func:`install_functions`), so the database always runs the code
  this module shows.
- **Finishing** an attempt is one statement: :data:`FINISH_ENDED` when the run ends (most
  attempts; it leaves out the cases below, which PostgreSQL would otherwise plan and check for
  every run), :data:`FINISH_MOVED` when it is retried later, handed back or parked. A run started
  by a ``workflow`` step then wakes its waiting parent (:data:`WAKE_PARENT`); the sweep
  :data:`WAKE_WAITING` catches a wake-up lost in a crash or a race.
- **Fencing**: every claim draws a token nothing can repeat (``runs.claim_id``, a random UUID), and
  only the execution holding the current one may write checkpoints, renew its lease or finish the
  run. An execution whose claim was lost (a claim lost in a database crash, a lease that lapsed)
  finds its writes refused, stops at its next step, and is recorded as a ``lost`` attempt
  (:data:`RECORD_LOST`) unless recovery already closed its attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from uuid import UUID

import psycopg

from sluice_common.db import DictConnection
from sluice_common.errors import ConflictError, NotFoundError


class RunStatus(StrEnum):
    QUEUED = "queued"
    DELAYED = "delayed"  # queued with a start time (a delay, a retry's backoff, a delay step)
    RUNNING = "running"
    WAITING = "waiting"  # parked until a sub-workflow run ends; holds no worker
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def sql_list(states: frozenset[str]) -> str:
    """A state set as an SQL list literal, for reads outside this module (partial indexes match
    literal lists, not parameters)."""
    return "(" + ", ".join(f"'{s}'" for s in sorted(states)) + ")"


TERMINAL: frozenset[str] = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
"""A run in one of these states never runs again (unless a person retries a failed one)."""
PENDING: frozenset[str] = frozenset({RunStatus.QUEUED, RunStatus.DELAYED})
"""Waiting for a worker: what a claim may take once it is due."""
UNFINISHED: frozenset[str] = PENDING | {RunStatus.RUNNING, RunStatus.WAITING}
"""Not over yet: waiting for a worker, running, or parked until a sub-workflow run ends."""


@dataclass(frozen=True)
class Transition:
    source: RunStatus | None  # None: the run is created
    target: RunStatus
    by: str  # the statement (or function) of this module that makes it


_S = RunStatus
TRANSITIONS: tuple[Transition, ...] = (
    Transition(None, _S.QUEUED, "INSERT_RUN"),
    Transition(None, _S.DELAYED, "INSERT_RUN"),
    Transition(None, _S.QUEUED, "INSERT_RUN_MANY"),  # several requests at once
    Transition(None, _S.DELAYED, "INSERT_RUN_MANY"),
    Transition(_S.QUEUED, _S.RUNNING, "CLAIM"),
    Transition(_S.DELAYED, _S.RUNNING, "CLAIM"),
    Transition(_S.RUNNING, _S.SUCCEEDED, "FINISH_ENDED"),
    Transition(_S.RUNNING, _S.FAILED, "FINISH_ENDED"),
    Transition(_S.RUNNING, _S.CANCELLED, "FINISH_ENDED"),
    Transition(_S.RUNNING, _S.SUCCEEDED, "FINISH_FUNCTION"),  # several attempts at once (FINISH_ENDED_MANY)
    Transition(_S.RUNNING, _S.FAILED, "FINISH_FUNCTION"),
    Transition(_S.RUNNING, _S.CANCELLED, "FINISH_FUNCTION"),
    Transition(_S.RUNNING, _S.DELAYED, "FINISH_MOVED"),  # retry after backoff, or a delay step
    Transition(_S.RUNNING, _S.QUEUED, "FINISH_MOVED"),  # handed back at shutdown; child already ended
    Transition(_S.RUNNING, _S.WAITING, "FINISH_MOVED"),  # parked on a sub-workflow run
    Transition(_S.RUNNING, _S.CANCELLED, "FINISH_MOVED"),  # cancel requested while it ran
    Transition(_S.RUNNING, _S.QUEUED, "RECOVER_EXPIRED"),  # its worker was lost, attempts left
    Transition(_S.RUNNING, _S.FAILED, "RECOVER_EXPIRED"),
    Transition(_S.RUNNING, _S.CANCELLED, "RECOVER_EXPIRED"),
    Transition(_S.WAITING, _S.QUEUED, "WAKE_PARENT"),
    Transition(_S.WAITING, _S.QUEUED, "WAKE_WAITING"),
    Transition(_S.QUEUED, _S.CANCELLED, "CANCEL"),
    Transition(_S.DELAYED, _S.CANCELLED, "CANCEL"),
    Transition(_S.WAITING, _S.CANCELLED, "CANCEL"),
    Transition(_S.QUEUED, _S.CANCELLED, "CANCEL_TREE"),
    Transition(_S.DELAYED, _S.CANCELLED, "CANCEL_TREE"),
    Transition(_S.WAITING, _S.CANCELLED, "CANCEL_TREE"),
    Transition(_S.QUEUED, _S.CANCELLED, "CANCEL_WORKFLOW_RUNS"),
    Transition(_S.DELAYED, _S.CANCELLED, "CANCEL_WORKFLOW_RUNS"),
    Transition(_S.WAITING, _S.CANCELLED, "CANCEL_WORKFLOW_RUNS"),
    Transition(_S.FAILED, _S.QUEUED, "RETRY"),
)


# Functions installed in the database ------------------------------------------------------------

DISPATCH_AT_FUNCTION = """
CREATE OR REPLACE FUNCTION sluice_dispatch_at(
    p_ready timestamptz, p_priority integer, p_aging_seconds double precision
) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT p_ready + make_interval(secs => (p_priority - 1) * p_aging_seconds) $$
"""

# Where the per-user cap is larger than max_connections (the most transactions that can be open at
# once) times SHARED_CLAIM_RUNS, a claim takes the owner's advisory lock in shared mode (claims do
# not wait for each other), chooses at most SHARED_CLAIM_RUNS of the owner's runs, and goes ahead
# while running + max_connections * SHARED_CLAIM_RUNS < cap: that leaves room for every claim that
# can be in flight beside it, each of which may be a batch (a count sees only committed runs and
# its own). Why that is enough: take the claim that counted last. Its count holds every run
# committed before it; the claims still open then had counted earlier, there are fewer than
# max_connections of them, and each adds at most SHARED_CLAIM_RUNS of the owner's runs, which the
# room it left covers. A shared claim that finds the owner closer to the cap raises
# serialization_failure, and the worker claims again with p_exclusive, which counts exactly under
# the exclusive lock, as every claim does where the cap is smaller.
#
# A candidate stays locked until its claim's transaction ends, even when its owner turns out to be
# at the cap, so a concurrent claim can find nothing only because other claims hold every runnable
# run. Its worker would then drop the wake-up, and once those claims found the owner at the cap,
# the run stayed queued with no wake-up left (until the reconciler's next pass). A claim that finds
# nothing therefore looks once more without SKIP LOCKED (in dispatch order, so that the same index
# bounds the look) and, when a run it could have taken is there, raises lock_not_available: the
# worker sends the wake-up again a moment later. It does not wait for those locks, which could
# deadlock: it may hold the runs and advisory locks of owners it skipped, which the other claims
# may be waiting for. The result type is unchanged (no DROP FUNCTION under running workers), and
# workers of earlier releases take the error as a failed message, which Dramatiq retries.
#
# A claim waits for the lock of the first owner it meets only. Holding one owner's lock, it only
# tries for the next one's: two claims that met two owners in opposite orders (each skips the rows
# the other has locked) would otherwise each hold one lock and wait for the other's, until
# PostgreSQL's deadlock check (deadlock_timeout, 1 s) failed one of them. One that finds the lock
# taken ends there, with the runs it has chosen; having chosen none, it raises lock_not_available,
# as above, and its wake-up comes back a moment later.
#
# A claim for several runs (``p_count``, the worker's group commit) chooses them one after the other
# in one transaction, each as a claim of its own would, and moves them all with one UPDATE at the
# end: one executor start-up for the batch, with the 11 indexes of runs it opens. The candidates
# come from one cursor, read a row at a time (each row is locked as it is read, and no further),
# until an owner is skipped; after that each is looked for with that owner left out. An owner's lock
# is taken and their running runs counted once per claim: their next candidates add the runs already
# chosen to that count, which is kept beside the chosen runs (an owner counted and not chosen is
# skipped, and not seen again). Under the exclusive lock no other claim can start their runs
# meanwhile; under the shared one, the reasoning above takes each claim's batch as of its one count.
# The rows come back in no particular order: the worker's threads are alike, and ordering them took
# a CTE and a sort in every claim, a lone one too. One that runs out of candidates after choosing
# some takes what it has, and the worker threads left without a run claim alone, which says busy
# where that is the reason.
#
# It plans with sequential scans disabled, as sluice_finish_runs does (a plan made while runs was
# small is kept as it grows), and with sorting disabled (PL/pgSQL plans once per session: planned
# while statistics said few runs were waiting, the claim read every waiting run and sorted them;
# without a sort the only plan left is runs_dispatch_idx read in order). Its statements keep their
# generic plan: costed with the array of chosen runs in hand (one run), a custom plan of the UPDATE
# always looks cheaper than the generic one (ten, by the default estimate), so PostgreSQL would
# plan it afresh at every call; the chosen runs are looked up in the primary key one by one, not
# through a bitmap. It is declared to return one row (costed for the default 1,000 the claim was
# JIT-compiled, 120 ms a claim). A claim lost in a database crash only puts the run back in the
# queue, so its commit does not wait for the WAL flush.
SHARED_CLAIM_RUNS = 16

CLAIM_FUNCTION = """
CREATE OR REPLACE FUNCTION sluice_claim_runs(
    p_worker text, p_lease_seconds double precision, p_user_cap integer, p_exclusive boolean, p_count integer
)
RETURNS SETOF runs
LANGUAGE plpgsql
ROWS 1
SET enable_sort = off
SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    cand record;
    candidates refcursor;
    skipped uuid[] := '{}';
    chosen uuid[] := '{}';
    chosen_owners uuid[] := '{}';
    chosen_counts integer[] := '{}';  -- the owner's running runs as counted when the first was chosen
    owner_at integer;
    counted integer;
    running integer;
    slack integer := current_setting('max_connections')::integer * SHARED_CLAIM_RUNS;
    shared boolean := p_user_cap > slack AND NOT p_exclusive;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    OPEN candidates NO SCROLL FOR
        SELECT r.id, r.owner_id FROM runs r
        WHERE r.status IN ('queued', 'delayed')
          AND coalesce(r.not_before, '-infinity') <= now()
          AND NOT r.cancel_requested
        ORDER BY r.dispatch_at, r.id
        FOR UPDATE SKIP LOCKED;
    LOOP
        IF cardinality(skipped) = 0 THEN
            FETCH candidates INTO cand;
        ELSE
            EXECUTE 'SELECT r.id, r.owner_id FROM runs r
                     WHERE r.status IN (''queued'', ''delayed'')
                       AND coalesce(r.not_before, ''-infinity'') <= now()
                       AND NOT r.cancel_requested
                       AND r.owner_id <> ALL ($1)
                       AND r.id <> ALL ($2)
                     ORDER BY r.dispatch_at, r.id
                     LIMIT 1
                     FOR UPDATE SKIP LOCKED' INTO cand USING skipped, chosen;
        END IF;
        IF cand.id IS NULL AND cardinality(chosen) > 0 THEN
            EXIT;  -- the claims that found none are tried again alone, which says busy if need be
        ELSIF cand.id IS NULL THEN
            PERFORM 1 FROM runs r
            WHERE r.status IN ('queued', 'delayed')
              AND coalesce(r.not_before, '-infinity') <= now()
              AND NOT r.cancel_requested
              AND r.owner_id <> ALL (skipped)
            ORDER BY r.dispatch_at, r.id
            LIMIT 1;
            IF FOUND THEN
                RAISE EXCEPTION 'every runnable run is locked by another transaction: wake up again shortly'
                    USING ERRCODE = 'lock_not_available';
            END IF;
            RETURN;
        END IF;
        owner_at := array_position(chosen_owners, cand.owner_id);
        IF owner_at IS NULL THEN
            IF cardinality(chosen_owners) = 0 AND cardinality(skipped) = 0 THEN
                IF shared THEN
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended(cand.owner_id::text, 5));
                ELSE
                    PERFORM pg_advisory_xact_lock(hashtextextended(cand.owner_id::text, 5));
                END IF;
            ELSIF NOT (CASE WHEN shared THEN pg_try_advisory_xact_lock_shared(hashtextextended(cand.owner_id::text, 5))
                            ELSE pg_try_advisory_xact_lock(hashtextextended(cand.owner_id::text, 5)) END) THEN
                IF cardinality(chosen) > 0 THEN
                    EXIT;
                END IF;
                RAISE EXCEPTION 'the lock of user % is held by another claim: wake up again shortly', cand.owner_id
                    USING ERRCODE = 'lock_not_available';
            END IF;
            SELECT count(*) INTO counted FROM runs WHERE owner_id = cand.owner_id AND status = 'running';
            running := counted;
        ELSE
            counted := chosen_counts[owner_at];
            running := counted + cardinality(array_positions(chosen_owners, cand.owner_id));
            IF shared AND running - counted >= SHARED_CLAIM_RUNS THEN
                EXIT;  -- as many as a shared claim may take: the rest are left to other claims
            END IF;
        END IF;
        IF shared AND running + slack >= p_user_cap THEN
            RAISE EXCEPTION 'user % is close to the cap: claim with the exclusive lock', cand.owner_id
                USING ERRCODE = 'serialization_failure';
        END IF;
        IF running < p_user_cap THEN
            chosen := chosen || cand.id;
            chosen_owners := chosen_owners || cand.owner_id;
            chosen_counts := chosen_counts || counted;
            EXIT WHEN cardinality(chosen) >= p_count;
        ELSE
            skipped := skipped || cand.owner_id;
        END IF;
    END LOOP;
    CLOSE candidates;
    RETURN QUERY
    UPDATE runs SET status = 'running', attempt = attempt + 1, claim_id = gen_random_uuid(),
           started_at = coalesce(started_at, now()), attempt_started_at = now(), worker_id = p_worker,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           updated_at = now(), error = NULL
    WHERE id = ANY (chosen)
    RETURNING *;
END
$$
""".replace("SHARED_CLAIM_RUNS", str(SHARED_CLAIM_RUNS))

# The claim of one run as the workers of the previous release call it, during an upgrade.
CLAIM_ONE_FUNCTION = """
CREATE OR REPLACE FUNCTION sluice_claim_run(
    p_worker text, p_lease_seconds double precision, p_user_cap integer, p_exclusive boolean
)
RETURNS SETOF runs
LANGUAGE sql
ROWS 1
AS $$ SELECT * FROM sluice_claim_runs(p_worker, p_lease_seconds, p_user_cap, p_exclusive, 1) $$
"""


def install_functions(conn: psycopg.Connection[Any]) -> None:
    """Create or replace the functions above (called by every migrate, under its lock)."""
    with conn.transaction():
        conn.execute(DISPATCH_AT_FUNCTION)
        conn.execute(CLAIM_FUNCTION)
        conn.execute(CLAIM_ONE_FUNCTION)
        conn.execute(FINISH_FUNCTION)


# Creating ---------------------------------------------------------------------------------------

# The workflow check and the insert in one statement, with the id the caller made for the run
# (``runs.new_run_id``: ids in time order). The run is pinned to the workflow's current
# version (what it executes on every attempt); an idempotency hit inserts nothing. A webhook's run
# also checks the hook's secret (``hook``, its hash) here, so that its request needs no lookup of
# its own once the API knows which workflow the secret named: a secret rotated since finds none.
INSERT_RUN = """
WITH wf AS (
    SELECT id, version, status, settings FROM workflows
    WHERE id = %(wf)s AND owner_id = %(owner)s AND deleted_at IS NULL
      AND (%(hook)s::bytea IS NULL OR webhook_secret_hash = %(hook)s::bytea)
), ins AS (
    INSERT INTO runs (id, workflow_id, owner_id, workflow_version, parent_run_id, trigger_type, trigger_data,
                      priority, status, max_attempts, not_before, dispatch_at, idempotency_key, traceparent)
    SELECT %(id)s::uuid, wf.id, %(owner)s, wf.version, %(parent)s, %(trigger)s::run_trigger, %(data)s, %(priority)s,
           (CASE WHEN %(delay)s > 0 THEN 'delayed' ELSE 'queued' END)::run_status,
           coalesce((wf.settings ->> 'maxAttempts')::int, %(max_attempts)s),
           CASE WHEN %(delay)s > 0 THEN t.ready END, sluice_dispatch_at(t.ready, %(priority)s, %(aging_step)s),
           %(key)s, %(traceparent)s
    FROM wf, (SELECT now() + make_interval(secs => %(delay)s / 1000.0) AS ready) AS t
    WHERE wf.status = 'active'
    ON CONFLICT (workflow_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, status
)
SELECT (SELECT status FROM wf) AS workflow_status, ins.id, ins.status FROM (SELECT 1) AS one LEFT JOIN ins ON true
"""

# INSERT_RUN for several requests at once (the API's group commit, ``runs.group_inserts``): one
# statement and one commit (one WAL flush) for all of them. Each request is a row of the arrays,
# with the id its run gets. It inserts only the runs that INSERT_RUN would insert as they are; the
# others are not in the result (a missing or paused workflow, a rotated webhook secret, an
# idempotency hit), and INSERT_RUN, run again for each of them alone, says why or finds the
# earlier run. The arrays are sent in binary (``%b``): in text, psycopg quotes every element and
# PostgreSQL parses it back.
INSERT_RUN_MANY = """
WITH req AS (
    SELECT * FROM unnest(%(ids)b::uuid[], %(wf)b::uuid[], %(owner)b::uuid[], %(hook)b::bytea[], %(parent)b::uuid[],
                         %(trigger)b::run_trigger[], %(data)b::jsonb[], %(priority)b::int[], %(delay)b::int[],
                         %(key)b::text[], %(traceparent)b::text[])
        AS r (id, wf, owner, hook, parent, trigger, data, priority, delay, key, traceparent)
), ins AS (
    INSERT INTO runs (id, workflow_id, owner_id, workflow_version, parent_run_id, trigger_type, trigger_data, priority,
                      status, max_attempts, not_before, dispatch_at, idempotency_key, traceparent)
    SELECT r.id, w.id, r.owner, w.version, r.parent, r.trigger, r.data, r.priority,
           (CASE WHEN r.delay > 0 THEN 'delayed' ELSE 'queued' END)::run_status,
           coalesce((w.settings ->> 'maxAttempts')::int, %(max_attempts)s),
           CASE WHEN r.delay > 0 THEN t.ready END, sluice_dispatch_at(t.ready, r.priority, %(aging_step)s),
           r.key, r.traceparent
    FROM req r
    JOIN workflows w ON w.id = r.wf AND w.owner_id = r.owner AND w.deleted_at IS NULL AND w.status = 'active'
         AND (r.hook IS NULL OR w.webhook_secret_hash = r.hook),
    LATERAL (SELECT now() + make_interval(secs => r.delay / 1000.0) AS ready) AS t
    ON CONFLICT (workflow_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, status
)
SELECT id, status FROM ins
"""

# An attempt's row is written once, when the attempt ends (by the finishes, recovery and
# RECORD_LOST; see the migration 0017_attempt_at_end): while it runs, the run's row holds its
# number, worker, claim and start. The statements that end one insert its row with this clause. A
# row of the same number is there when an earlier attempt gave its number back (it parked the run,
# or handed it back at shutdown) and is written over, as the claim of the next one used to; or
# when a claim of the previous release inserted it running, and then its start is this attempt's.
ATTEMPT_ENDED = """ON CONFLICT (run_id, attempt, lost) DO UPDATE SET status = excluded.status,
        worker_id = excluded.worker_id, claim_id = excluded.claim_id, finished_at = excluded.finished_at,
        error = excluded.error,
        started_at = CASE WHEN run_attempts.status = 'running' THEN run_attempts.started_at
                          ELSE excluded.started_at END"""

# The attempts of a run as the API shows them, oldest first: the rows of those that ended and,
# while the run is running, the one it runs now, from the run's row (a row of the same number,
# written by an earlier attempt that gave its number back or by a claim of the previous release,
# gives way to it).
ATTEMPTS = """
SELECT attempt, status, lost, worker_id, claim_id, started_at, finished_at, error FROM run_attempts a
WHERE a.run_id = %(run)s
  AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = a.run_id AND r.status = 'running' AND r.attempt = a.attempt
                  AND NOT a.lost)
UNION ALL
SELECT attempt, 'running'::attempt_status, false, worker_id, claim_id, coalesce(attempt_started_at, updated_at),
       NULL, NULL
FROM runs WHERE id = %(run)s AND status = 'running'
ORDER BY attempt, lost DESC
"""

# Claiming and executing --------------------------------------------------------------------------

# Claims the best runnable run and reads what the worker needs (the attempt it starts is recorded on
# the run's row until it ends: see ATTEMPT_ENDED): the steps and settings of the version the run was
# queued with (a primary-key read of workflow_versions), whatever the workflow has become since. A
# run of a workflow deleted while its wake-up was on the way has no steps: the worker cancels it.
# ``resumed`` says whether the run was claimed before (a retry, a resumed delay or sub-workflow
# wait, a recovered run): only then can it have checkpoints, which the worker reads with
# CLAIM_CHECKPOINTS. Most claims are first claims, and leaving the checkpoint reads out of this
# statement spares every one of them two subplans. ``dispatch_lag`` is the time since the run's
# ``dispatch_at``, on the database's clock: plus the priority's aging (see ``sluice_dispatch_at``),
# the time since it became ready. The function is called once, as the outer side of the joins
# (PostgreSQL keeps a function's rows in the scan's own store, so even a plan that read them again
# would not call it again); a CTE around it cost every claim a scan and a store of its own.
CLAIM = """
SELECT c.id, c.claim_id, c.workflow_id, c.owner_id, c.attempt, c.max_attempts, c.priority, c.trigger_type,
       c.trigger_data, c.parent_run_id, c.traceparent, CASE WHEN w.deleted_at IS NULL THEN v.steps END AS steps,
       nullif(v.settings, '{}'::jsonb) AS settings, c.started_at < now() AS resumed,
       extract(epoch FROM clock_timestamp() - c.dispatch_at)::float8 AS dispatch_lag
FROM sluice_claim_runs(%(worker)s, %(lease)s, %(user_cap)s, %(exclusive)s, %(count)s) AS c
LEFT JOIN workflows w ON w.id = c.workflow_id
LEFT JOIN workflow_versions v ON v.workflow_id = c.workflow_id AND v.version = c.workflow_version
"""

# The checkpoints of a resumed run's earlier attempts (NULL, not an empty object, when there are
# none: each value read back costs the worker a parse), read by the claim that holds it.
CLAIM_CHECKPOINTS = """
SELECT jsonb_object_agg(s.step_id, s.output) FILTER (WHERE s.status = 'succeeded') AS done_steps,
       jsonb_object_agg(s.step_id, s.output) FILTER (WHERE s.status = 'waiting') AS waiting_steps
FROM run_steps s WHERE s.run_id = %(run)s AND s.status IN ('succeeded', 'waiting')
"""

# A step's checkpoint, written only by the claim that holds the run; reads back the cancel flag and
# whether the claim still holds it (``held`` false: stop, another execution has the run).
CHECKPOINT = """
WITH step AS (
    INSERT INTO run_steps (run_id, step_id, position, status, attempt, output, error, started_at, finished_at)
    SELECT id, %(step)s, %(pos)s, %(status)s, %(attempt)s, %(output)s, %(error)s, %(started)s, now()
    FROM runs WHERE id = %(run)s AND claim_id = %(claim)s
    ON CONFLICT (run_id, step_id) DO UPDATE SET
        position = excluded.position, status = excluded.status, attempt = excluded.attempt,
        output = excluded.output, error = excluded.error, started_at = excluded.started_at,
        finished_at = excluded.finished_at
)
SELECT cancel_requested, claim_id IS NOT DISTINCT FROM %(claim)s::uuid AS held FROM runs WHERE id = %(run)s
"""

# Run unprepared (UNPREPARED): planned at each execution, with the tables as they are. A generic
# plan made while runs was small scanned the table for the ids, and a session keeps it.
RENEW_LEASES = """
UPDATE runs SET lease_expires_at = now() + make_interval(secs => %(lease)s)
WHERE id = ANY(%(ids)s::uuid[]) AND claim_id = ANY(%(claims)s::uuid[])
"""

# An execution that found its claim gone (its finish or a checkpoint matched no row) is recorded as
# a lost attempt, unless recovery already closed the attempt of its claim.
RECORD_LOST = """
INSERT INTO run_attempts (run_id, attempt, lost, status, worker_id, claim_id, started_at, finished_at, error)
SELECT r.id, %(attempt)s, true, 'failed', %(worker)s, %(claim)s, %(started)s, now(),
       'this execution lost its claim on the run (another execution took it over)'
FROM runs r WHERE r.id = %(id)s
  AND NOT EXISTS (SELECT 1 FROM run_attempts a WHERE a.run_id = %(id)s AND a.claim_id = %(claim)s)
ON CONFLICT (run_id, attempt, lost) DO NOTHING
"""

UNPREPARED = frozenset({"RENEW_LEASES"})
"""Statements here that their callers run with ``prepare=False``: each execution is planned with the
tables as they are. For statements that run seldom, whose generic plan made while the tables were
small would read them whole (the batch finish, which runs often, is a function planned without
sequential scans instead: :data:`FINISH_FUNCTION`)."""

# Finishing ---------------------------------------------------------------------------------------

# What the finishing statements of one attempt (FINISH_ENDED, FINISH_MOVED) do after their
# UPDATE of the run (``run``, which returns its id, status and attempt_started_at, and nothing once
# the claim is gone): write the last step's checkpoint and the attempt's row, and say whether the
# owner's next run needs a wake-up.
_AFTER_THE_RUN = (
    """), last_step AS (
    INSERT INTO run_steps (run_id, step_id, position, status, attempt, output, started_at, finished_at)
    SELECT id, %(step)s::text, %(pos)s::int, 'succeeded', %(attempt)s, %(output)s::jsonb, %(started)s::timestamptz,
           now()
    FROM run WHERE %(step)s::text IS NOT NULL
    ON CONFLICT (run_id, step_id) DO UPDATE SET
        position = excluded.position, status = excluded.status, attempt = excluded.attempt,
        output = excluded.output, error = NULL, started_at = excluded.started_at, finished_at = excluded.finished_at
), attempt AS (
    INSERT INTO run_attempts (run_id, attempt, status, worker_id, claim_id, started_at, finished_at, error)
    SELECT id, %(attempt)s::int, %(attempt_status)s::attempt_status, %(worker)s::text, %(claim)s::uuid,
           coalesce(attempt_started_at, now()), now(), %(error)s::text
    FROM run
    """
    + ATTEMPT_ENDED
    + """
)
SELECT id, status,
       (SELECT count(*) FROM runs WHERE owner_id = %(owner)s AND status = 'running') >= %(user_cap)s
       AND EXISTS (SELECT 1 FROM runs WHERE owner_id = %(owner)s AND status IN ('queued', 'delayed')
                   AND NOT cancel_requested AND coalesce(not_before, '-infinity') <= now()) AS wake_next
FROM run
"""
)

# The attempt ended its run: succeeded, failed for good, or cancelled. Writes the last step's
# checkpoint (one round trip less per run) and closes the attempt. The statement's snapshot still
# counts this run as running: if its owner was at the cap with runs due, wake-ups may have skipped
# them, so ``wake_next`` tells the caller to send one.
FINISH_ENDED = (
    """
WITH run AS (
    UPDATE runs SET status = %(status)s::run_status, waiting_for = NULL, not_before = NULL, finished_at = now(),
        error = %(error)s, worker_id = NULL, claim_id = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = %(id)s AND claim_id = %(claim)s
    RETURNING id, status, attempt_started_at
"""
    + _AFTER_THE_RUN
)

# FINISH_ENDED for the attempts of several runs at once (the worker's group commit,
# ``sluice_worker.executor``): one statement and one commit (one WAL flush) for all of them. Each
# attempt is a row of the arrays (FINISH_ENDED_MANY_ARRAYS, in the function's order); ``user_cap``
# is the same for all. An attempt whose claim is gone has no row in the result (and its run is not
# touched), as FINISH_ENDED returns none; the rows name the claim, since an execution that lost its
# claim may end beside the one that holds it.
#
# It is a function so that it can plan without sequential scans. Its statement joins the batch to
# runs and run_attempts, and a session keeps the generic plan PostgreSQL made for it at its sixth
# execution, with the table sizes of that moment, until an ANALYZE of the table replaces it. Made
# while the tables were small (a new installation, a test database), that plan read runs whole and
# hashed it, and it went on doing so for every batch as the table grew: without autovacuum, for
# good. Planned without sequential scans, the only plans left look each run and attempt up by its
# key, whatever the sizes said when it was planned. It keeps its generic plan for the reason the
# claim does: costed with the batch's arrays in hand, a custom plan looks cheaper, and the statement
# would be planned afresh for every batch. The runs the UPDATE moved come back with their
# attempt's values, so that the step, the attempt and the result read them without joining the
# batch to them again (three hash joins a batch).
FINISH_FUNCTION = (
    """
CREATE OR REPLACE FUNCTION sluice_finish_runs(
    p_id uuid[], p_claim uuid[], p_status run_status[], p_attempt_status attempt_status[], p_error text[],
    p_attempt integer[], p_owner uuid[], p_step text[], p_pos integer[], p_output jsonb[], p_started timestamptz[],
    p_user_cap integer, p_worker text
)
RETURNS TABLE (id uuid, claim uuid, status run_status, wake_next boolean)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH req AS (
        SELECT * FROM unnest(p_id, p_claim, p_status, p_attempt_status, p_error, p_attempt, p_owner, p_step, p_pos,
                             p_output, p_started)
            AS r (id, claim, status, attempt_status, error, attempt, owner, step, pos, output, started)
    ), run AS (
        UPDATE runs SET status = r.status, waiting_for = NULL, not_before = NULL, finished_at = now(),
            error = r.error, worker_id = NULL, claim_id = NULL, lease_expires_at = NULL, updated_at = now()
        FROM req r
        WHERE runs.id = r.id AND runs.claim_id = r.claim
        RETURNING runs.id, runs.status, runs.attempt_started_at, r.claim, r.attempt_status, r.error, r.attempt,
                  r.owner, r.step, r.pos, r.output, r.started
    ), last_step AS (
        INSERT INTO run_steps (run_id, step_id, position, status, attempt, output, started_at, finished_at)
        SELECT run.id, run.step, run.pos, 'succeeded', run.attempt, run.output, run.started, now()
        FROM run WHERE run.step IS NOT NULL
        ON CONFLICT (run_id, step_id) DO UPDATE SET
            position = excluded.position, status = excluded.status, attempt = excluded.attempt,
            output = excluded.output, error = NULL, started_at = excluded.started_at,
            finished_at = excluded.finished_at
    ), attempt AS (
        INSERT INTO run_attempts (run_id, attempt, status, worker_id, claim_id, started_at, finished_at, error)
        SELECT run.id, run.attempt, run.attempt_status, p_worker, run.claim, coalesce(run.attempt_started_at, now()),
               now(), run.error
        FROM run
        """
    + ATTEMPT_ENDED
    + """
    )
    SELECT run.id, run.claim, run.status,
           (SELECT count(*) FROM runs WHERE owner_id = run.owner AND status = 'running') >= p_user_cap
           AND EXISTS (SELECT 1 FROM runs WHERE owner_id = run.owner AND status IN ('queued', 'delayed')
                       AND NOT cancel_requested AND coalesce(not_before, '-infinity') <= now())
    FROM run;
END
$$
"""
)

# FINISH_ENDED_MANY's arrays (one element per attempt, FINISH_ENDED's parameter of that name), in
# the order of sluice_finish_runs's parameters, with their types. They are sent in binary, as
# INSERT_RUN_MANY's are: an array's text form costs the client its quoting and the server its
# parsing, element by element.
FINISH_ENDED_MANY_ARRAYS = {
    "id": "uuid[]",
    "claim": "uuid[]",
    "status": "run_status[]",
    "attempt_status": "attempt_status[]",
    "error": "text[]",
    "attempt": "int[]",
    "owner": "uuid[]",
    "step": "text[]",
    "pos": "int[]",
    "output": "jsonb[]",
    "started": "timestamptz[]",
}

FINISH_ENDED_MANY = (
    "SELECT id, claim, status, wake_next FROM sluice_finish_runs("
    + ", ".join(f"%({name})b::{kind}" for name, kind in FINISH_ENDED_MANY_ARRAYS.items())
    + ", %(user_cap)s, %(worker)s)"
)

# The attempt ended without ending its run: ``status`` is ``delayed`` (a retry after its backoff,
# or a delay step: ``wait`` ms), ``queued`` (handed back at shutdown) or ``waiting`` (parked on the
# sub-workflow run ``child``). A parked or handed-back attempt gives its number back
# (``give_back``). A cancel requested while the attempt ran wins over all of these, and a child
# that ended before its parent parked does not keep the parent waiting. Otherwise as FINISH_ENDED.
FINISH_MOVED = (
    """
WITH run AS (
    UPDATE runs SET
        status = (CASE WHEN cancel_requested THEN 'cancelled'
                      WHEN %(status)s = 'waiting' AND EXISTS (
                          SELECT 1 FROM runs c WHERE c.id = %(child)s::uuid
                          AND c.status IN ('succeeded', 'failed', 'cancelled')) THEN 'queued'
                      ELSE %(status)s END)::run_status,
        waiting_for = CASE WHEN %(status)s = 'waiting' THEN %(child)s::uuid END,
        attempt = attempt - %(give_back)s,
        not_before = CASE WHEN %(status)s = 'delayed' AND NOT cancel_requested
                          THEN now() + make_interval(secs => %(wait)s / 1000.0) END,
        dispatch_at = CASE WHEN %(status)s = 'delayed' AND NOT cancel_requested
                           THEN sluice_dispatch_at(now() + make_interval(secs => %(wait)s / 1000.0), priority,
                                                   %(aging_step)s)
                           ELSE dispatch_at END,
        finished_at = CASE WHEN cancel_requested THEN now() END,
        error = CASE WHEN cancel_requested THEN 'cancelled while running' ELSE %(error)s END,
        worker_id = NULL, claim_id = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = %(id)s AND claim_id = %(claim)s
    RETURNING id, status, attempt_started_at
"""
    + _AFTER_THE_RUN
)

# A sub-workflow run has ended: its parent, parked waiting for it, goes back to the queue.
WAKE_PARENT = """
UPDATE runs p SET status = 'queued', waiting_for = NULL, updated_at = now(),
       dispatch_at = sluice_dispatch_at(now(), p.priority, %(aging_step)s)
WHERE p.id = %(parent)s AND p.status = 'waiting' AND p.waiting_for = %(child)s
RETURNING p.id
"""

# The sweep behind WAKE_PARENT: parents whose child ended (or vanished) without waking them (a
# child cancelled before it started, recovered after its worker died, or ending while the parent
# was parking).
WAKE_WAITING = """
UPDATE runs p SET status = 'queued', waiting_for = NULL, updated_at = now(),
       dispatch_at = sluice_dispatch_at(now(), p.priority, %(aging_step)s)
WHERE p.status = 'waiting'
  AND NOT EXISTS (SELECT 1 FROM runs c WHERE c.id = p.waiting_for
                  AND c.status NOT IN ('succeeded', 'failed', 'cancelled'))
RETURNING p.id
"""

# Runs whose worker stopped renewing its lease (killed, frozen, cut off). The lost attempt counts,
# so a run that kills its workers cannot loop forever; with attempts left the run is queued again
# at its old place in line. Within one lease of the database's own start nothing is recovered:
# after a restart, live workers need that long to reconnect and renew the leases that lapsed
# while it was down (see also :class:`sluice_common.runs.Recovery`).
RECOVER_EXPIRED = (
    """
WITH lost AS (
    SELECT id, attempt, max_attempts, worker_id, claim_id, attempt_started_at, cancel_requested FROM runs
    WHERE status = 'running' AND lease_expires_at < now()
      AND pg_postmaster_start_time() < now() - make_interval(secs => %(lease)s)
    FOR UPDATE SKIP LOCKED
), attempts AS (
    INSERT INTO run_attempts (run_id, attempt, status, worker_id, claim_id, started_at, finished_at, error)
    SELECT id, attempt, 'failed', worker_id, claim_id, coalesce(attempt_started_at, now()), now(),
           'worker lost (' || coalesce(worker_id, '?') || ')'
    FROM lost
    """
    + ATTEMPT_ENDED
    + """
)
UPDATE runs r SET
    status = (CASE WHEN lost.cancel_requested THEN 'cancelled'
                   WHEN lost.attempt >= lost.max_attempts THEN 'failed' ELSE 'queued' END)::run_status,
    finished_at = CASE WHEN lost.cancel_requested OR lost.attempt >= lost.max_attempts THEN now() END,
    error = 'worker lost during attempt ' || lost.attempt,
    worker_id = NULL, claim_id = NULL, lease_expires_at = NULL, updated_at = now()
FROM lost WHERE r.id = lost.id
RETURNING r.id, r.status, r.traceparent
"""
)

# Cancelling and retrying ----------------------------------------------------------------------

# One run the owner cancels, locked first by :func:`cancel`: a queued, delayed or waiting run
# never runs; a running one is asked to stop at its next step.
CANCEL = """
UPDATE runs SET
    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    cancel_requested = status = 'running',
    finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() END,
    error = CASE status WHEN 'running' THEN error
                        WHEN 'waiting' THEN 'cancelled while waiting for a sub-workflow'
                        ELSE 'cancelled before it started' END,
    updated_at = now()
WHERE id = %(id)s AND status IN ('queued', 'delayed', 'waiting', 'running')
RETURNING id, workflow_id, trigger_type, status
"""

# A cancelled parent's sub-workflow run, and the runs that one started in turn.
CANCEL_TREE = """
WITH RECURSIVE tree AS (
    SELECT id FROM runs WHERE id = %(child)s
    UNION
    SELECT r.id FROM runs r JOIN tree t ON r.parent_run_id = t.id
)
UPDATE runs SET
    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    cancel_requested = status = 'running',
    finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() END,
    error = CASE WHEN status = 'running' THEN error ELSE 'its parent run was cancelled' END,
    updated_at = now()
WHERE id IN (SELECT id FROM tree) AND status IN ('queued', 'delayed', 'waiting', 'running')
RETURNING id, workflow_id, trigger_type, status
"""

# The workflow was deleted: its unfinished runs are cancelled (running ones at their next step).
CANCEL_WORKFLOW_RUNS = """
UPDATE runs SET
    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    cancel_requested = status = 'running',
    finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() END,
    error = CASE WHEN status = 'running' THEN error ELSE 'the workflow was deleted' END,
    updated_at = now()
WHERE workflow_id = %(wf)s AND status IN ('queued', 'delayed', 'waiting', 'running')
RETURNING id, workflow_id, trigger_type, status
"""

# A failed run gets a new series of attempts (attempt numbers keep counting) on the same version:
# its checkpoints belong to that version, and completed steps are not repeated.
RETRY = """
UPDATE runs r SET status = 'queued', max_attempts = r.attempt + coalesce((v.settings ->> 'maxAttempts')::int,
                                                                       %(max_attempts)s),
       error = NULL, finished_at = NULL, not_before = NULL, cancel_requested = false,
       dispatch_at = sluice_dispatch_at(now(), r.priority, %(aging_step)s), updated_at = now()
FROM workflow_versions v
WHERE r.id = %(id)s AND r.status = 'failed' AND v.workflow_id = r.workflow_id AND v.version = r.workflow_version
"""


def ended_by_cancel(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of the rows a cancelling statement returned, the runs it ended (a running one ends later,
    at its worker, which reports it)."""
    return [r for r in rows if r["status"] == RunStatus.CANCELLED]


def cancel(conn: DictConnection, run_id: UUID | str, owner_id: UUID | str) -> tuple[str, list[dict[str, Any]]]:
    """Cancel one of the owner's runs (and its sub-workflow runs) in the caller's transaction.

    Returns its status after the call (``cancelled``, or ``running`` while it winds down) and
    the runs the call ended (``id``, ``workflow_id``, ``trigger_type``), for the caller to report
    once committed.
    """
    row = conn.execute(
        "SELECT status, waiting_for FROM runs WHERE id = %s AND owner_id = %s FOR UPDATE",
        (str(run_id), str(owner_id)),
    ).fetchone()
    if row is None:
        raise NotFoundError("no such run")
    status = str(row["status"])
    if status in TERMINAL:
        raise ConflictError(f"the run has already finished ({status})")
    ended = conn.execute(CANCEL, {"id": str(run_id)}).fetchall()
    if row["waiting_for"] is not None:
        ended += conn.execute(CANCEL_TREE, {"child": row["waiting_for"]}).fetchall()
    return (status if status == RunStatus.RUNNING else RunStatus.CANCELLED), ended_by_cancel(ended)


def retry(
    conn: DictConnection, run_id: UUID | str, owner_id: UUID | str, *, max_attempts: int, aging_step: float
) -> None:
    """Queue a failed run of the owner again (caller's transaction; the caller sends the wake-up)."""
    row = conn.execute(
        "SELECT r.status, w.deleted_at, w.status AS workflow_status FROM runs r "
        "JOIN workflows w ON w.id = r.workflow_id WHERE r.id = %s AND r.owner_id = %s FOR UPDATE OF r",
        (str(run_id), str(owner_id)),
    ).fetchone()
    if row is None:
        raise NotFoundError("no such run")
    if row["status"] != RunStatus.FAILED:
        raise ConflictError(f"only a failed run can be retried; this one is {row['status']}")
    if row["deleted_at"] is not None:
        raise ConflictError("the run's workflow was deleted")
    if row["workflow_status"] != "active":
        raise ConflictError("the workflow is paused; activate it to retry its runs")
    conn.execute(RETRY, {"id": str(run_id), "max_attempts": max_attempts, "aging_step": aging_step})
