"""Claims and executes runs: the body of the ``execute_run`` actor.

A wake-up first takes a slot of the global rate limit (when none is free, the wake-up is re-sent
for the moment one frees up: no attempt used, no busy loop; when there turns out to be nothing to
claim, the slot is given back at once), then claims the best runnable run with one conditional
UPDATE in ``dispatch_at`` order that skips users at their concurrency cap. A finished run is
never claimed again, so redelivered messages are harmless.

Round trips to PostgreSQL per one-step run: one claim statement (run, attempt row, workflow and
checkpoints, committed without waiting for the WAL flush) and one finishing statement (which
also writes the last step's checkpoint); one more per earlier step. The claim is the
``sluice_claim_run`` function (migrations 0003, 0008 and 0009): it serialises claims per user, not
globally, and for a cap above max_connections only while the user is near it, so the per-user
cap is exact while claims run in parallel.

Parking (a ``delay`` step, a ``workflow`` step waiting for its child) ends the attempt as
``parked`` and gives the attempt number back: the run goes to ``delayed`` (with its resume time
and a delayed wake-up) or to ``waiting`` (``waiting_for`` names the child run). A child's
finishing statement puts its waiting parent back to ``queued``; the housekeeping sweep
(:meth:`RunExecutor.wake_waiting`) catches any wake-up missed in a race or by a child that was
cancelled or recovered outside a worker's finish.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import dramatiq
import httpx
import psycopg
from psycopg.types.json import Jsonb

from sluice_common.broker import send_run_message
from sluice_common.db import Pool
from sluice_common.errors import ConflictError, NotFoundError, ValidationFailed
from sluice_common.ratelimit import RateLimiter
from sluice_common.runs import MAX_DELAY_MS, dispatch_delay, enqueue_run
from sluice_common.secrets import load_secrets
from sluice_common.settings import Settings
from sluice_worker.engine import ChildState, Outcome, RunContext, Runtime, StepFailed, execute
from sluice_worker.safehttp import HttpPolicy

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")

# How long a thread goes on starting runs for waiting wake-ups before it returns to the broker.
CHAIN_SECONDS = 30.0

CLAIM_SQL = """
WITH claimed AS (
    SELECT * FROM sluice_claim_run(%(worker)s, %(lease)s, %(user_cap)s, %(exclusive)s)
), attempt AS (
    INSERT INTO run_attempts (run_id, attempt, status, worker_id)
    SELECT id, attempt, 'running', %(worker)s FROM claimed
    ON CONFLICT (run_id, attempt) DO UPDATE SET status = 'running', worker_id = excluded.worker_id,
        started_at = now(), finished_at = NULL, error = NULL
)
-- A run of a workflow deleted while its wake-up was on the way is cancelled, not run. Only the
-- columns the worker uses, and no checkpoints (NULL) for a run that has none: each column the
-- worker reads back costs it a value to parse, for every run.
SELECT c.id, c.workflow_id, c.owner_id, c.attempt, c.max_attempts, c.priority, c.trigger_type,
       c.trigger_data, c.parent_run_id, CASE WHEN w.deleted_at IS NULL THEN w.steps END AS steps,
       nullif(w.settings, '{}'::jsonb) AS settings,
       (SELECT jsonb_object_agg(s.step_id, s.output) FROM run_steps s
         WHERE s.run_id = c.id AND s.status = 'succeeded') AS done_steps,
       (SELECT jsonb_object_agg(s.step_id, s.output) FROM run_steps s
         WHERE s.run_id = c.id AND s.status = 'waiting') AS waiting_steps
FROM claimed c LEFT JOIN workflows w ON w.id = c.workflow_id
"""

CHECKPOINT_SQL = """
WITH step AS (
    -- Only the attempt that holds the run may write its checkpoints.
    INSERT INTO run_steps (run_id, step_id, position, status, attempt, output, error, started_at, finished_at)
    SELECT id, %(step)s, %(pos)s, %(status)s, %(attempt)s, %(output)s, %(error)s, %(started)s, now()
    FROM runs WHERE id = %(run)s AND status = 'running' AND attempt = %(attempt)s
    ON CONFLICT (run_id, step_id) DO UPDATE SET
        position = excluded.position, status = excluded.status, attempt = excluded.attempt,
        output = excluded.output, error = excluded.error, started_at = excluded.started_at,
        finished_at = excluded.finished_at
)
SELECT cancel_requested FROM runs WHERE id = %(run)s
"""

_FINISH_RUN_MOVES = """
WITH run AS (
    UPDATE runs SET
        -- A cancel requested while the attempt ran wins over retrying, handing back or parking.
        status = (CASE WHEN cancel_requested AND %(status)s IN ('delayed', 'queued', 'waiting') THEN 'cancelled'
                      -- The child may have ended before its parent parked: do not wait for it then.
                      WHEN %(status)s = 'waiting' AND EXISTS (
                          SELECT 1 FROM runs c WHERE c.id = %(child)s::uuid
                          AND c.status IN ('succeeded', 'failed', 'cancelled')) THEN 'queued'
                      ELSE %(status)s END)::run_status,
        waiting_for = CASE WHEN %(status)s = 'waiting' THEN %(child)s::uuid END,
        attempt = attempt - %(give_back)s,
        not_before = CASE WHEN %(status)s = 'delayed' AND NOT cancel_requested
                          THEN now() + make_interval(secs => %(wait)s / 1000.0) END,
        dispatch_at = CASE WHEN %(status)s = 'delayed' AND NOT cancel_requested
                           THEN now() + make_interval(secs => %(wait)s / 1000.0) + %(aging)s ELSE dispatch_at END,
        finished_at = CASE WHEN %(status)s IN ('succeeded', 'failed', 'cancelled') OR cancel_requested THEN now() END,
        error = CASE WHEN cancel_requested AND %(status)s IN ('delayed', 'queued', 'waiting')
                     THEN 'cancelled while running' ELSE %(error)s END,
        worker_id = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = %(id)s AND status = 'running' AND worker_id = %(worker)s AND attempt = %(attempt)s
    RETURNING id, status
"""

_FINISH_PARENT = """), parent AS (
    -- A finished child wakes the parent run that waits for it.
    UPDATE runs p SET status = 'queued', waiting_for = NULL, updated_at = now(),
           dispatch_at = now() + make_interval(secs => (p.priority - 1) * %(aging_step)s)
    FROM run WHERE p.id = %(parent)s::uuid AND p.status = 'waiting' AND p.waiting_for = run.id
      AND run.status IN ('succeeded', 'failed', 'cancelled')
    RETURNING p.id
"""

_FINISH_REST = """), last_step AS (
    INSERT INTO run_steps (run_id, step_id, position, status, attempt, output, started_at, finished_at)
    SELECT id, %(step)s::text, %(pos)s::int, 'succeeded', %(attempt)s, %(output)s::jsonb, %(started)s::timestamptz,
           now()
    FROM run WHERE %(step)s::text IS NOT NULL
    ON CONFLICT (run_id, step_id) DO UPDATE SET
        position = excluded.position, status = excluded.status, attempt = excluded.attempt,
        output = excluded.output, error = NULL, started_at = excluded.started_at, finished_at = excluded.finished_at
), attempt AS (
    UPDATE run_attempts SET status = %(attempt_status)s, finished_at = now(), error = %(error)s
    WHERE run_id = (SELECT id FROM run) AND attempt = %(attempt)s
)
-- The statement's snapshot still counts this run as running: if its owner was at the cap and
-- has runs due, wake-ups may have skipped them, so the caller sends one now.
SELECT id, status, {parent_woken} AS parent_woken,
       (SELECT count(*) FROM runs WHERE owner_id = %(owner)s AND status = 'running') >= %(user_cap)s
       AND EXISTS (SELECT 1 FROM runs WHERE owner_id = %(owner)s AND status IN ('queued', 'delayed')
                   AND NOT cancel_requested AND coalesce(not_before, '-infinity') <= now()) AS wake_next
FROM run
"""

_FINISH_RUN_ENDS = """WITH run AS (
    -- The run has ended (succeeded, failed for good, cancelled): what the statement above comes to
    -- for such a status, without the cases for retrying, parking and handing back.
    UPDATE runs SET status = %(status)s::run_status, waiting_for = NULL, not_before = NULL, finished_at = now(),
        error = %(error)s, worker_id = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = %(id)s AND status = 'running' AND worker_id = %(worker)s AND attempt = %(attempt)s
    RETURNING id, status
"""

# The finishing statement, by (the run has ended, the run was started by a workflow step). Each
# leaves out what cannot apply: a parent's UPDATE costs its executor set-up (opening every index of
# runs) even when it touches no row, and most runs have no parent; most attempts end their run.
# Together that is 8% of the database's instructions per run (callgrind: 1,442 to 1,322 thousand).
FINISH_SQL = {
    (ends, child): (_FINISH_RUN_ENDS if ends else _FINISH_RUN_MOVES)
    + (_FINISH_PARENT if child else "")
    + _FINISH_REST.format(parent_woken="(SELECT id FROM parent)" if child else "NULL::uuid")
    for ends in (False, True)
    for child in (False, True)
}


@dataclass(frozen=True)
class Claimed:
    run_id: str
    workflow_id: str
    owner_id: str
    attempt: int
    max_attempts: int
    priority: int
    trigger_type: str
    trigger_data: Any
    steps: list[dict[str, Any]] | None  # None: the workflow was deleted
    settings: dict[str, Any]
    done_steps: dict[str, Any]
    waiting_steps: dict[str, Any] = dataclasses.field(default_factory=dict)
    parent_run_id: str | None = None


def backoff_ms(attempt: int, low: int, high: int) -> int:
    """Exponential backoff with full jitter: uniform in [low, min(high, low * 2**(attempt-1))]."""
    ceiling = min(high, max(low, low * 2 ** (attempt - 1)))
    return random.randint(low, ceiling)  # noqa: S311 - jitter, not security


class PgStepStore:
    """Checkpoints of one run attempt in ``run_steps``; each write also reads the cancel flag."""

    def __init__(self, pool: Pool, claimed: Claimed, stopping: threading.Event) -> None:
        self._pool = pool
        self._claimed = claimed
        self._stopping = stopping
        self._cancel = False
        self._last = len(claimed.steps or []) - 1
        # The last step's checkpoint is written by the run's finishing statement (one round
        # trip less per run); if the worker dies in between, that step runs again, as it would
        # had the worker died during it.
        self.final_step: tuple[str, int, Any, datetime] | None = None

    def completed(self) -> dict[str, Any]:
        return self._claimed.done_steps

    def waiting(self) -> dict[str, Any]:
        return self._claimed.waiting_steps

    def _write(
        self, step_id: str, position: int, status: str, output: Any, error: str | None, started: datetime
    ) -> None:
        with self._pool.connection() as conn:
            row = conn.execute(
                CHECKPOINT_SQL,
                {
                    "run": self._claimed.run_id,
                    "step": step_id,
                    "pos": position,
                    "status": status,
                    "attempt": self._claimed.attempt,
                    "output": Jsonb(output) if output is not None else None,
                    "error": error,
                    "started": started,
                },
            ).fetchone()
        self._cancel = bool(row and row["cancel_requested"])

    def succeeded(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        # The engine has already capped the output (SLUICE_STEP_OUTPUT_MAX_BYTES) and made it JSON.
        if position == self._last:
            self.final_step = (step_id, position, output, started_at)
            return
        self._write(step_id, position, "succeeded", output, None, started_at)

    def parked(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        # Written at once even for the last step: the resumed attempt must find it.
        self._write(step_id, position, "waiting", output, None, started_at)

    def failed(self, step_id: str, position: int, error: str, started_at: datetime) -> None:
        self._write(step_id, position, "failed", None, error[:10_000], started_at)

    def interruption(self) -> Literal["cancelled", "shutdown"] | None:
        if self._cancel:
            return "cancelled"
        if self._stopping.is_set():
            return "shutdown"
        return None


CHILD_STATE_SQL = """
SELECT r.id, r.status, r.error,
       (SELECT s.output FROM run_steps s WHERE s.run_id = r.id AND s.status = 'succeeded'
        ORDER BY s.finished_at DESC, s.position DESC LIMIT 1) AS output
FROM runs r WHERE r.id = %s
"""

DEPTH_SQL = """
WITH RECURSIVE chain AS (
    SELECT id, parent_run_id, 1 AS depth FROM runs WHERE id = %(run)s
    UNION ALL
    SELECT r.id, r.parent_run_id, c.depth + 1 FROM runs r JOIN chain c ON r.id = c.parent_run_id
    WHERE c.depth <= %(limit)s
)
SELECT max(depth) AS depth FROM chain
"""

WAKE_WAITING_SQL = """
UPDATE runs p SET status = 'queued', waiting_for = NULL, updated_at = now(),
       dispatch_at = now() + make_interval(secs => (p.priority - 1) * %s)
WHERE p.status = 'waiting'
  AND NOT EXISTS (SELECT 1 FROM runs c WHERE c.id = p.waiting_for
                  AND c.status NOT IN ('succeeded', 'failed', 'cancelled'))
RETURNING p.id
"""


class PgSubRuns:
    """Child runs of ``workflow`` steps: started through the normal producer, read from PostgreSQL."""

    def __init__(self, settings: Settings, pool: Pool, broker: dramatiq.Broker, claimed: Claimed) -> None:
        self._settings = settings
        self._pool = pool
        self._broker = broker
        self._claimed = claimed

    def start(self, ctx: RunContext, step_id: str, workflow_id: str, trigger_data: Any) -> str:
        limit = self._settings.workflow_max_depth
        with self._pool.connection() as conn:
            row = conn.execute(DEPTH_SQL, {"run": ctx.run_id, "limit": limit}).fetchone()
        depth = int(row["depth"]) if row and row["depth"] else 1
        if depth >= limit:
            raise StepFailed(
                step_id,
                f"sub-workflows may nest {limit} levels deep (SLUICE_WORKFLOW_MAX_DEPTH); this run is at level {depth}",
                final=True,
            )
        try:
            child = enqueue_run(
                self._pool,
                self._broker,
                self._settings,
                workflow_id=workflow_id,
                owner_id=self._claimed.owner_id,
                trigger_type="workflow",
                trigger_data=trigger_data,
                priority=self._claimed.priority,
                # The same attempt never starts a second child for one step (a redelivery, a
                # hand-back at shutdown); a retry after a failure starts a fresh one.
                idempotency_key=f"parent:{ctx.run_id}:{step_id}:{ctx.attempt}",
                parent_run_id=ctx.run_id,
            )
        except NotFoundError:
            raise StepFailed(step_id, f"no workflow {workflow_id} of this owner", final=True) from None
        except (ConflictError, ValidationFailed) as exc:
            raise StepFailed(step_id, f"cannot start workflow {workflow_id}: {exc}", final=True) from None
        return str(child.run_id)

    def state(self, run_id: str) -> ChildState:
        with self._pool.connection() as conn:
            row = conn.execute(CHILD_STATE_SQL, (run_id,)).fetchone()
        if row is None:
            return ChildState(run_id, "cancelled", "the sub-workflow run no longer exists")
        return ChildState(str(row["id"]), row["status"], row["error"], row["output"])


class RunExecutor:
    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        broker: dramatiq.Broker,
        limiter: RateLimiter,
        http: httpx.Client,
        worker_id: str,
        stopping: threading.Event,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.broker = broker
        self.limiter = limiter
        self.http = http
        self.worker_id = worker_id
        self.stopping = stopping
        self.wakeups = 0  # messages handled, for metrics and to prove waits do not spin
        self.chained = 0  # runs started with a wake-up taken straight off the queue
        self.policy = HttpPolicy(settings.http_allow_private, settings.http_allowed_hosts)
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()

    # The actor body --------------------------------------------------------------------------

    def handle(self, hint_run_id: str) -> None:
        """Handle one wake-up (``hint_run_id`` names the run it was sent for; any may start).

        After its run, the thread goes on with the next one while wake-ups wait in the queue,
        taking one off the queue per run (see :meth:`RateLimiter.acquire_waiting`): under a
        backlog a run then costs no broker round trip of its own (fetch, hand-over between
        threads, middleware, acknowledgement). Each run is still claimed as the best runnable one
        at that moment, so priority, delays and per-user caps hold as for any other wake-up. (A
        run's trace context is therefore its row's ``traceparent``, not the message's.)
        """
        self.wakeups += 1
        if self.stopping.is_set():
            send_run_message(self.broker, hint_run_id)  # hand the wake-up to another process
            return
        wait = self.limiter.acquire()
        if wait > 0:
            send_run_message(self.broker, hint_run_id, delay_ms=wait)  # no attempt used, no spinning
            return
        # Bounded so that one message never holds its thread for long past a backlog's end.
        until = time.monotonic() + CHAIN_SECONDS
        while self._claim_and_run() and not self.stopping.is_set() and time.monotonic() < until:
            try:
                if not self.limiter.acquire_waiting():
                    return
            except Exception:
                # Redis is unreachable: this message's work is done, and the wake-ups still in
                # the queue go through the broker once it is back.
                log.warning("could not look for waiting wake-ups", exc_info=True)
                return
            self.chained += 1

    def _claim_and_run(self) -> bool:
        """Claim and run one run with the start slot just taken; False when there was none."""
        try:
            claimed = self.claim()
        except BaseException:
            self.limiter.release()
            raise
        if claimed is None:
            self.limiter.release()  # the slot was not used
            # Nothing runnable, or only runs of users at their cap: the end of one of their runs
            # sends the next wake-up (see FINISH_SQL), so this one can go.
            return False
        self._track(claimed.run_id, add=True)
        try:
            outcome = self.run(claimed)
            self.finish(claimed, outcome)
        finally:
            # Untracked, its lease lapses if finish() could not record the end: recovery takes over.
            self._track(claimed.run_id, add=False)
        return True

    def _track(self, run_id: str, *, add: bool) -> None:
        with self._in_flight_lock:
            if add:
                self._in_flight.add(run_id)
            else:
                self._in_flight.discard(run_id)

    def claim(self) -> Claimed | None:
        """Claim the best runnable run: one statement, one round trip (see ``sluice_claim_run``)."""
        params = {
            "user_cap": self.settings.user_concurrency,
            "worker": self.worker_id,
            "lease": self.settings.lease_seconds,
        }
        try:
            with self.pool.connection() as conn:
                row = conn.execute(CLAIM_SQL, {**params, "exclusive": False}).fetchone()
        except psycopg.errors.SerializationFailure:
            # The owner is close to the cap, where a claim counts under the owner's exclusive lock
            # (migration 0009).
            with self.pool.connection() as conn:
                row = conn.execute(CLAIM_SQL, {**params, "exclusive": True}).fetchone()
        if row is None:
            return None
        return Claimed(
            run_id=str(row["id"]),
            workflow_id=str(row["workflow_id"]),
            owner_id=str(row["owner_id"]),
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            priority=row["priority"],
            trigger_type=row["trigger_type"],
            trigger_data=row["trigger_data"],
            steps=row["steps"],
            settings=row["settings"] or {},
            done_steps=row["done_steps"] or {},
            waiting_steps=row["waiting_steps"] or {},
            parent_run_id=str(row["parent_run_id"]) if row["parent_run_id"] else None,
        )

    # Running ------------------------------------------------------------------------------------

    def run(self, claimed: Claimed) -> Outcome:
        if claimed.steps is None:
            return Outcome("cancelled", "the workflow was deleted")
        timeout = claimed.settings.get("timeoutSeconds") or self.settings.run_timeout_seconds
        ctx = RunContext(
            run_id=claimed.run_id,
            workflow_id=claimed.workflow_id,
            attempt=claimed.attempt,
            trigger_type=claimed.trigger_type,
            trigger_data=claimed.trigger_data,
            steps=claimed.steps,
            deadline=time.monotonic() + float(timeout),
            variables=claimed.settings.get("variables") or {},
            owner_id=claimed.owner_id,
            secrets=lambda: load_secrets(self.pool, self.settings, claimed.owner_id),
        )
        store = PgStepStore(self.pool, claimed, self.stopping)
        runtime = Runtime(
            self.http,
            http_policy=self.policy,
            step_timeout=self.settings.step_timeout_seconds,
            output_max_bytes=self.settings.step_output_max_bytes,
            subruns=PgSubRuns(self.settings, self.pool, self.broker, claimed),
        )
        try:
            outcome = execute(ctx, store, runtime)
        except Exception as exc:  # storage trouble mid-run: a failed attempt, retried as usual
            log.exception("run %s attempt %d crashed", claimed.run_id, claimed.attempt)
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}")
        return dataclasses.replace(outcome, final_step=store.final_step)

    def finish(self, claimed: Claimed, outcome: Outcome) -> None:
        """Record the attempt's end and move the run on: done, retried later, or handed back."""
        params = self.finish_params(claimed, outcome)
        updated = self._finish_with_retries(params)
        if updated is None:
            # Our lease expired and the run was recovered elsewhere: their result stands.
            log.warning("run %s was taken over while attempt %d ran", claimed.run_id, claimed.attempt)
            return
        if updated["status"] == "queued":
            send_run_message(self.broker, claimed.run_id)
        elif updated["status"] == "delayed":
            # Past Dramatiq's delay limit, the reconciler wakes the run once it is due.
            send_run_message(self.broker, claimed.run_id, delay_ms=min(params["wait"], MAX_DELAY_MS))
        if updated["parent_woken"]:
            send_run_message(self.broker, str(updated["parent_woken"]))
        if updated["wake_next"]:
            send_run_message(self.broker, claimed.run_id)

    def finish_params(self, claimed: Claimed, outcome: Outcome) -> dict[str, Any]:
        """The parameters of the finishing statement (``FINISH_SQL``) for this attempt's outcome."""
        retry = outcome.status == "failed" and not outcome.final and claimed.attempt < claimed.max_attempts
        params: dict[str, Any] = {
            "id": claimed.run_id,
            "attempt": claimed.attempt,
            "worker": self.worker_id,
            "error": outcome.error,
            "give_back": 0,
            "owner": claimed.owner_id,
            "user_cap": self.settings.user_concurrency,
            "wait": 0,
            "aging": dispatch_delay(self.settings, claimed.priority),
            "step": None,
            "pos": None,
            "output": None,
            "started": None,
            "child": None,
            "parent": claimed.parent_run_id,
            "aging_step": self.settings.priority_aging_seconds,
        }
        if outcome.final_step is not None:
            step_id, position, output, started = outcome.final_step
            params.update(step=step_id, pos=position, output=Jsonb(output), started=started)
        if outcome.status == "parked" and outcome.waiting_for is not None:
            # Waiting for a child run: no thread, no attempt used; the child's end wakes the run.
            params.update(status="waiting", attempt_status="parked", give_back=1, child=outcome.waiting_for)
        elif outcome.status == "parked":
            resume_at = outcome.resume_at or datetime.now(UTC)
            wait = max(0, int((resume_at - datetime.now(UTC)).total_seconds() * 1000))
            params.update(status="delayed", attempt_status="parked", give_back=1, wait=wait)
        elif outcome.status == "handed_back":
            # Not the run's fault: give the attempt back and let another worker continue.
            params.update(status="queued", attempt_status="cancelled", give_back=1, error="handed back at shutdown")
        elif retry:
            low = int(claimed.settings.get("backoffMinMs", self.settings.retry_backoff_min_ms))
            high = int(claimed.settings.get("backoffMaxMs", self.settings.retry_backoff_max_ms))
            params.update(
                status="delayed", attempt_status="failed", wait=backoff_ms(claimed.attempt, low, max(low, high))
            )
        else:
            params.update(status=outcome.status, attempt_status=outcome.status)
        return params

    def _finish_with_retries(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run FINISH_SQL, riding out a short database outage (the lease keeps the run ours)."""
        query = FINISH_SQL[params["status"] in TERMINAL, params["parent"] is not None]
        delay = 0.2
        for attempt in range(6):
            try:
                with self.pool.connection() as conn:
                    row = conn.execute(query, params).fetchone()
                return dict(row) if row is not None else None
            except psycopg.OperationalError:
                if attempt == 5:
                    raise
                log.warning("could not record the end of run %s; retrying", params["id"], exc_info=True)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    def wake_waiting(self) -> int:
        """Queue runs waiting for a child run that has ended (or vanished); return how many.

        The child's finishing statement normally does this at once; this sweep covers a child
        cancelled before it started, a child recovered after its worker died, and the narrow
        race of a child ending while its parent was parking.
        """
        with self.pool.connection() as conn:
            rows = conn.execute(WAKE_WAITING_SQL, (self.settings.priority_aging_seconds,)).fetchall()
        for row in rows:
            send_run_message(self.broker, str(row["id"]))
        return len(rows)

    # Leases ---------------------------------------------------------------------------------------

    def renew_leases(self) -> int:
        """Extend the leases of the runs this process is executing right now (and only those)."""
        with self._in_flight_lock:
            ids = list(self._in_flight)
        if not ids:
            return 0
        with self.pool.connection() as conn:
            return conn.execute(
                "UPDATE runs SET lease_expires_at = now() + make_interval(secs => %s) "
                "WHERE id = ANY(%s::uuid[]) AND status = 'running' AND worker_id = %s",
                (self.settings.lease_seconds, ids, self.worker_id),
            ).rowcount
