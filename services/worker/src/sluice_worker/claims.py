"""A claimed run as the worker holds it: what the claim statement (``runstate.CLAIM``) read back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Claimed:
    run_id: str
    claim_id: str  # the fencing token of this claim: every write of the execution carries it
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
    claimed_at: datetime = dataclasses.field(default_factory=lambda: datetime.now(UTC))
    dispatch_lag: float | None = None  # seconds from the run's dispatch_at to this claim
    traceparent: str | None = None  # the run's trace context (W3C), kept for all its attempts

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claimed:
        return cls(
            run_id=str(row["id"]),
            claim_id=str(row["claim_id"]),
            workflow_id=str(row["workflow_id"]),
            owner_id=str(row["owner_id"]),
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            priority=row["priority"],
            trigger_type=row["trigger_type"],
            trigger_data=row["trigger_data"],
            steps=row["steps"],
            settings=row["settings"] or {},
            done_steps=row.get("done_steps") or {},
            waiting_steps=row.get("waiting_steps") or {},
            parent_run_id=str(row["parent_run_id"]) if row["parent_run_id"] else None,
            dispatch_lag=row.get("dispatch_lag"),
            traceparent=row.get("traceparent"),
        )
