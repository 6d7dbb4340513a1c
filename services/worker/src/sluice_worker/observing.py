"""The executor's side of the run-events seam (:mod:`sluice_common.observe`).

:class:`ObservedSteps` wraps a run's step store and tells the observers each step's end, with
its type and duration, without the engine knowing; :func:`ended_as` names how an execution
ended from the finishing statement's result.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sluice_common import runstate
from sluice_common.observe import RunEvents, StepEnded, StepStarted
from sluice_worker.claims import Claimed
from sluice_worker.engine import StepStore
from sluice_worker.outcomes import Finish


class ObservedSteps:
    """A :class:`~sluice_worker.engine.StepStore` that reports every step's start and end to ``events``."""

    def __init__(self, store: StepStore, claimed: Claimed, events: RunEvents) -> None:
        self._store = store
        self._claimed = claimed
        self._events = events
        self._types = {str(s.get("id")): str(s.get("type")) for s in claimed.steps or ()}

    def _ended(self, step_id: str, status: str, started_at: datetime, error: str | None = None) -> None:
        self._events.step_ended(
            StepEnded(
                run_id=self._claimed.run_id,
                workflow_id=self._claimed.workflow_id,
                step_id=step_id,
                step_type=self._types.get(step_id, "unknown"),
                status=status,
                duration_seconds=(datetime.now(UTC) - started_at).total_seconds(),
                attempt=self._claimed.attempt,
                error=error,
            )
        )

    def starting(self, step_id: str, position: int) -> None:
        self._store.starting(step_id, position)
        self._events.step_started(
            StepStarted(
                run_id=self._claimed.run_id,
                workflow_id=self._claimed.workflow_id,
                step_id=step_id,
                step_type=self._types.get(step_id, "unknown"),
                attempt=self._claimed.attempt,
                position=position,
            )
        )

    def completed(self) -> dict[str, Any]:
        return self._store.completed()

    def waiting(self) -> dict[str, Any]:
        return self._store.waiting()

    def succeeded(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        self._store.succeeded(step_id, position, output, started_at)
        self._ended(step_id, "succeeded", started_at)

    def parked(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        self._store.parked(step_id, position, output, started_at)
        self._ended(step_id, "parked", started_at)

    def failed(self, step_id: str, position: int, error: str, started_at: datetime) -> None:
        self._store.failed(step_id, position, error, started_at)
        self._ended(step_id, "failed", started_at, error)

    def interruption(self) -> Literal["cancelled", "shutdown"] | None:
        return self._store.interruption()


def ended_as(finish: Finish, updated: dict[str, Any] | None) -> str:
    """How an execution ended: the run's final status, or retried, parked, handed_back, lost."""
    if updated is None:
        return "lost"
    status = str(updated["status"])
    if status in runstate.TERMINAL:
        return status  # succeeded, failed, cancelled (a cancel request wins over the outcome)
    attempt_status = finish.params.get("attempt_status")
    if attempt_status == "failed":
        return "retried"
    if attempt_status == "parked":
        return "parked"
    return "handed_back"
