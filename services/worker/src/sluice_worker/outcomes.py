"""From an attempt's outcome to the transition that records it: which finishing statement of
:mod:`sluice_common.runstate` runs, with which parameters (a retry's backoff, a park's wait)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from sluice_common import runstate
from sluice_common.settings import Settings
from sluice_worker.claims import Claimed
from sluice_worker.engine import Outcome


def backoff_ms(attempt: int, low: int, high: int) -> int:
    """Exponential backoff with full jitter: uniform in [low, min(high, low * 2**(attempt-1))]."""
    ceiling = min(high, max(low, low * 2 ** (attempt - 1)))
    return random.randint(low, ceiling)  # noqa: S311 - jitter, not security


@dataclass(frozen=True)
class Finish:
    """The statement that records an attempt's end, and its parameters."""

    statement: str
    params: dict[str, Any]


def finish_for(settings: Settings, worker_id: str, claimed: Claimed, outcome: Outcome) -> Finish:
    """How the attempt's outcome moves the run: done, retried later, parked or handed back."""
    params: dict[str, Any] = {
        "id": claimed.run_id,
        "claim": claimed.claim_id,
        "attempt": claimed.attempt,
        "worker": worker_id,
        "error": outcome.error,
        "give_back": 0,
        "owner": claimed.owner_id,
        "user_cap": settings.user_concurrency,
        "wait": 0,
        "aging_step": settings.priority_aging_seconds,
        "step": None,
        "pos": None,
        "output": None,
        "started": None,
        "child": None,
    }
    if outcome.final_step is not None:
        step_id, position, output, started = outcome.final_step
        params.update(step=step_id, pos=position, output=Jsonb(output), started=started)
    retry = outcome.status == "failed" and not outcome.final and claimed.attempt < claimed.max_attempts
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
        low = int(claimed.settings.get("backoffMinMs", settings.retry_backoff_min_ms))
        high = int(claimed.settings.get("backoffMaxMs", settings.retry_backoff_max_ms))
        params.update(status="delayed", attempt_status="failed", wait=backoff_ms(claimed.attempt, low, max(low, high)))
    else:
        params.update(status=outcome.status, attempt_status=outcome.status)
    ends = params["status"] in runstate.TERMINAL
    return Finish(runstate.FINISH_ENDED if ends else runstate.FINISH_MOVED, params)
