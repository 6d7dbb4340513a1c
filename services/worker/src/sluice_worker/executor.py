"""Claims and executes runs: the body of the ``execute_run`` actor.

A wake-up claims the best runnable run with one conditional UPDATE (``FOR UPDATE SKIP LOCKED``
in ``dispatch_at`` order, skipping users at their concurrency cap), inside a transaction that
also takes a slot of the global rate limit; when the limit is reached the transaction is rolled
back and the wake-up is re-sent for the moment a slot frees up. A finished run is never claimed
again, so redelivered messages are harmless.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import dramatiq
import httpx
from psycopg.types.json import Jsonb

from sluice_common.broker import send_run_message
from sluice_common.db import Pool
from sluice_common.ratelimit import RateLimiter
from sluice_common.runs import dispatch_delay
from sluice_common.settings import Settings
from sluice_worker.engine import Outcome, RunContext, execute

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 256 * 1024
CLAIM_LOCK_ID = 0x51_1C_E0_00_00_00_02

CLAIM_SQL = """
WITH capped AS (
    SELECT owner_id FROM runs WHERE status = 'running'
    GROUP BY owner_id HAVING count(*) >= %(user_cap)s
), candidate AS (
    SELECT id FROM runs
    WHERE status IN ('queued', 'delayed')
      AND coalesce(not_before, '-infinity') <= now()
      AND owner_id NOT IN (SELECT owner_id FROM capped)
    ORDER BY dispatch_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE runs r SET status = 'running', attempt = r.attempt + 1,
       started_at = coalesce(r.started_at, now()), worker_id = %(worker)s,
       lease_expires_at = now() + make_interval(secs => %(lease)s), updated_at = now(), error = NULL
FROM candidate WHERE r.id = candidate.id
RETURNING r.id, r.workflow_id, r.owner_id, r.attempt, r.max_attempts, r.priority,
          r.trigger_type, r.trigger_data, r.traceparent
"""


@dataclass(frozen=True)
class Claimed:
    run_id: str
    workflow_id: str
    attempt: int
    max_attempts: int
    priority: int
    trigger_type: str
    trigger_data: Any


class _RateLimited(Exception):
    def __init__(self, wait_ms: int) -> None:
        self.wait_ms = wait_ms


def backoff_ms(attempt: int, low: int, high: int) -> int:
    """Exponential backoff with full jitter: uniform in [low, min(high, low * 2**(attempt-1))]."""
    ceiling = min(high, max(low, low * 2 ** (attempt - 1)))
    return random.randint(low, ceiling)  # noqa: S311 - jitter, not security


class PgStepStore:
    """Checkpoints of one run attempt in ``run_steps``."""

    def __init__(self, pool: Pool, run_id: str, attempt: int, stopping: threading.Event) -> None:
        self._pool = pool
        self._run_id = run_id
        self._attempt = attempt
        self._stopping = stopping

    def completed(self) -> dict[str, Any]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT step_id, output FROM run_steps WHERE run_id = %s AND status = 'succeeded'",
                (self._run_id,),
            ).fetchall()
        return {r["step_id"]: r["output"] for r in rows}

    def _write(self, step_id: str, position: int | None, status: str, output: Any, error: str | None) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                """
                INSERT INTO run_steps (run_id, step_id, position, status, attempt, output, error, started_at,
                                       finished_at)
                VALUES (%(run)s, %(step)s, coalesce(%(pos)s, 0), %(status)s, %(attempt)s, %(output)s,
                        %(error)s, now(), CASE WHEN %(status)s <> 'running' THEN now() END)
                ON CONFLICT (run_id, step_id) DO UPDATE SET
                    status = excluded.status, attempt = excluded.attempt, output = excluded.output,
                    error = excluded.error,
                    position = CASE WHEN %(pos)s IS NULL THEN run_steps.position ELSE excluded.position END,
                    started_at = CASE WHEN excluded.status = 'running' THEN now() ELSE run_steps.started_at END,
                    finished_at = excluded.finished_at
                """,
                {
                    "run": self._run_id,
                    "step": step_id,
                    "pos": position,
                    "status": status,
                    "attempt": self._attempt,
                    "output": Jsonb(output) if output is not None else None,
                    "error": error,
                },
            )

    def started(self, step_id: str, position: int) -> None:
        self._write(step_id, position, "running", None, None)

    def succeeded(self, step_id: str, output: Any) -> None:
        encoded = json.dumps(output, default=str)
        if len(encoded) > MAX_OUTPUT_BYTES:
            output = {"truncated": True, "bytes": len(encoded), "preview": encoded[:1024]}
        else:
            output = json.loads(encoded)
        self._write(step_id, None, "succeeded", output, None)

    def failed(self, step_id: str, error: str) -> None:
        self._write(step_id, None, "failed", None, error[:10_000])

    def interruption(self) -> Literal["cancelled", "shutdown"] | None:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT cancel_requested FROM runs WHERE id = %s", (self._run_id,)).fetchone()
        if row is not None and row["cancel_requested"]:
            return "cancelled"
        if self._stopping.is_set():
            return "shutdown"
        return None


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

    # The actor body --------------------------------------------------------------------------

    def handle(self, hint_run_id: str) -> None:
        """Handle one wake-up (``hint_run_id`` names the run it was sent for; any may start)."""
        self.wakeups += 1
        if self.stopping.is_set():
            send_run_message(self.broker, hint_run_id)  # hand the wake-up to another process
            return
        try:
            claimed = self.claim()
        except _RateLimited as limited:
            send_run_message(self.broker, hint_run_id, delay_ms=limited.wait_ms)
            return
        if claimed is None:
            return
        outcome = self.run(claimed)
        self.finish(claimed, outcome)
        # Keep the pipeline moving: this thread is free, so wake one for the next runnable run
        # (covers runs of a user who was at the per-user cap until now).
        if self._more_due():
            send_run_message(self.broker, hint_run_id)

    def claim(self) -> Claimed | None:
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                CLAIM_SQL,
                {
                    "user_cap": self.settings.user_concurrency,
                    "worker": self.worker_id,
                    "lease": self.settings.lease_seconds,
                },
            ).fetchone()
            if row is None:
                return None
            wait = self.limiter.acquire()
            if wait > 0:
                raise _RateLimited(wait)  # rolls the claim back: no attempt used
            try:
                conn.execute(
                    "INSERT INTO run_attempts (run_id, attempt, status, worker_id) "
                    "VALUES (%s, %s, 'running', %s) "
                    "ON CONFLICT (run_id, attempt) DO UPDATE SET status = 'running', "
                    "worker_id = excluded.worker_id, started_at = now(), finished_at = NULL, error = NULL",
                    (row["id"], row["attempt"], self.worker_id),
                )
            except BaseException:
                self.limiter.release()
                raise
        return Claimed(
            run_id=str(row["id"]),
            workflow_id=str(row["workflow_id"]),
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            priority=row["priority"],
            trigger_type=row["trigger_type"],
            trigger_data=row["trigger_data"],
        )

    def _more_due(self) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM runs WHERE status IN ('queued', 'delayed') "
                "AND coalesce(not_before, '-infinity') <= now()) AS more"
            ).fetchone()
        return bool(row and row["more"])

    # Running ------------------------------------------------------------------------------------

    def run(self, claimed: Claimed) -> Outcome:
        with self.pool.connection() as conn:
            wf = conn.execute("SELECT steps, settings FROM workflows WHERE id = %s", (claimed.workflow_id,)).fetchone()
        if wf is None:
            return Outcome("failed", "the workflow no longer exists", final=True)
        wf_settings = wf["settings"] or {}
        timeout = wf_settings.get("timeoutSeconds") or self.settings.run_timeout_seconds
        ctx = RunContext(
            run_id=claimed.run_id,
            workflow_id=claimed.workflow_id,
            attempt=claimed.attempt,
            trigger_type=claimed.trigger_type,
            trigger_data=claimed.trigger_data,
            steps=wf["steps"],
            deadline=time.monotonic() + float(timeout),
            variables=wf_settings.get("variables") or {},
        )
        store = PgStepStore(self.pool, claimed.run_id, claimed.attempt, self.stopping)
        try:
            return execute(ctx, store, self.http)
        except Exception as exc:  # storage trouble mid-run: a failed attempt, retried as usual
            log.exception("run %s attempt %d crashed", claimed.run_id, claimed.attempt)
            return Outcome("failed", f"{type(exc).__name__}: {exc}")

    def finish(self, claimed: Claimed, outcome: Outcome) -> None:
        """Record the attempt's end and move the run on: done, retried later, or handed back."""
        retry = outcome.status == "failed" and not outcome.final and claimed.attempt < claimed.max_attempts
        params: dict[str, Any] = {"id": claimed.run_id, "attempt": claimed.attempt, "worker": self.worker_id}
        params["error"] = outcome.error
        if outcome.status == "handed_back":
            # Not the run's fault: give the attempt back and let another worker continue.
            sql = (
                "UPDATE runs SET status = 'queued', attempt = attempt - 1, worker_id = NULL, "
                "lease_expires_at = NULL, updated_at = now() "
                "WHERE id = %(id)s AND status = 'running' AND worker_id = %(worker)s"
            )
            attempt_status = "cancelled"
            params["error"] = "handed back at shutdown"
        elif retry:
            low, high = self._backoff_bounds(claimed.workflow_id)
            wait = backoff_ms(claimed.attempt, low, high)
            params["wait"] = wait
            params["aging"] = dispatch_delay(self.settings, claimed.priority)
            sql = (
                "UPDATE runs SET status = 'delayed', not_before = now() + make_interval(secs => %(wait)s / 1000.0), "
                "dispatch_at = now() + make_interval(secs => %(wait)s / 1000.0) + %(aging)s, "
                "error = %(error)s, worker_id = NULL, lease_expires_at = NULL, updated_at = now() "
                "WHERE id = %(id)s AND status = 'running' AND worker_id = %(worker)s"
            )
            attempt_status = "failed"
        else:
            params["status"] = outcome.status
            sql = (
                "UPDATE runs SET status = %(status)s, finished_at = now(), error = %(error)s, worker_id = NULL, "
                "lease_expires_at = NULL, updated_at = now() "
                "WHERE id = %(id)s AND status = 'running' AND worker_id = %(worker)s"
            )
            attempt_status = outcome.status
        with self.pool.connection() as conn, conn.transaction():
            updated = conn.execute(sql, params).rowcount
            if updated == 0:
                # Our lease expired and the run was recovered elsewhere: their result stands.
                log.warning("run %s was taken over while attempt %d ran", claimed.run_id, claimed.attempt)
                return
            conn.execute(
                "UPDATE run_attempts SET status = %s, finished_at = now(), error = %s "
                "WHERE run_id = %s AND attempt = %s",
                (attempt_status, params["error"], claimed.run_id, claimed.attempt),
            )
        if outcome.status == "handed_back":
            send_run_message(self.broker, claimed.run_id)
        elif retry:
            send_run_message(self.broker, claimed.run_id, delay_ms=params["wait"])

    def _backoff_bounds(self, workflow_id: str) -> tuple[int, int]:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT settings FROM workflows WHERE id = %s", (workflow_id,)).fetchone()
        wf = (row["settings"] if row else None) or {}
        low = wf.get("backoffMinMs", self.settings.retry_backoff_min_ms)
        high = wf.get("backoffMaxMs", self.settings.retry_backoff_max_ms)
        return int(low), int(max(low, high))

    # Leases ---------------------------------------------------------------------------------------

    def renew_leases(self) -> int:
        with self.pool.connection() as conn:
            return conn.execute(
                "UPDATE runs SET lease_expires_at = now() + make_interval(secs => %s) "
                "WHERE status = 'running' AND worker_id = %s",
                (self.settings.lease_seconds, self.worker_id),
            ).rowcount
