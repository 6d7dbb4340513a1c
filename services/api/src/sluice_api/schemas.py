"""Request and response models of the HTTP API.

Requests are validated with these models (and the workflow model of common), and the OpenAPI
document is generated from the same classes, so the document cannot drift from the behaviour.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from sluice_common.runs import MAX_DELAY_MS

RunStatus = Literal["queued", "delayed", "running", "waiting", "succeeded", "failed", "cancelled"]
RUN_STATUSES: tuple[str, ...] = RunStatus.__args__  # type: ignore[attr-defined]
StepStatus = Literal["running", "succeeded", "failed", "skipped", "waiting"]
TriggerType = Literal["manual", "cron", "webhook", "workflow", "retry"]


class _In(BaseModel):
    # By the camelCase names only: `trigger_data` is an unknown field like any other misspelling.
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


# Requests ---------------------------------------------------------------------------------------


class RunRequest(_In):
    """Body of ``POST /api/workflows/{id}/run`` (every field optional; an empty body is fine)."""

    trigger_data: Any = Field(default=None, description="Data the run's steps see as `trigger`.")
    priority: Annotated[int, Field(ge=1, le=10, strict=True, description="1 runs first, 10 last.")] = 5
    delay: Annotated[
        int, Field(ge=0, le=MAX_DELAY_MS, strict=True, description="Milliseconds to wait before the run may start.")
    ] = 0


class SecretValue(_In):
    """Body of ``PUT /api/secrets/{name}``: the value is stored encrypted and never shown again."""

    value: Annotated[str, Field(min_length=1, max_length=16384)]


# Responses --------------------------------------------------------------------------------------


class Problem(_Out):
    """RFC 9457 problem details; validation problems carry one entry per bad field."""

    type: str
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] | None = None


class FieldError(_Out):
    path: str = Field(description="JSON path of the bad field, for example `$.steps[1].config.url`.")
    message: str


class Webhook(_Out):
    enabled: bool
    url: str | None = Field(
        default=None, description="The secret URL; shown only when the secret is created or rotated."
    )


class Workflow(_Out):
    id: UUID
    name: str
    description: str | None
    trigger: dict[str, Any]
    steps: list[dict[str, Any]]
    status: Literal["active", "paused"]
    settings: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime
    webhook: Webhook | None = None


class WorkflowPage(_Out):
    items: list[Workflow]
    next_cursor: str | None


class WorkflowVersion(_Out):
    """An immutable version of a workflow: what a run queued at that version executes."""

    version: int
    name: str
    description: str | None
    trigger: dict[str, Any]
    steps: list[dict[str, Any]]
    settings: dict[str, Any]
    created_at: datetime


class WorkflowVersionPage(_Out):
    items: list[WorkflowVersion]
    next_cursor: str | None


class RunAccepted(_Out):
    """The seeds' answer to a run request, plus the run's status."""

    success: bool
    queued: bool
    job_id: UUID
    run_id: UUID
    message: str
    status: RunStatus


class RunStep(_Out):
    step_id: str
    position: int
    status: StepStatus
    attempt: int
    output: Any = None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class RunAttempt(_Out):
    attempt: int
    status: Literal["running", "parked", "succeeded", "failed", "cancelled"]
    lost: bool = Field(
        default=False,
        description="An execution that lost its claim on the run (another execution took it over and "
        "reused its attempt number); its result was not recorded.",
    )
    worker_id: str | None
    started_at: datetime
    finished_at: datetime | None
    error: str | None


class RunSummary(_Out):
    id: UUID
    workflow_id: UUID
    workflow_version: int
    parent_run_id: UUID | None
    status: RunStatus
    priority: int
    attempt: int
    max_attempts: int
    trigger_type: TriggerType
    queued_at: datetime
    not_before: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    cancel_requested: bool


class Run(RunSummary):
    trigger_data: Any = None
    updated_at: datetime
    trace_id: str | None = Field(
        default=None,
        description="The run's trace id (32 hex digits): every attempt and step of the run is in this trace, "
        "and a caller's `traceparent` header, when sent, names it.",
    )
    steps: list[RunStep]
    attempts: list[RunAttempt]
    definition: WorkflowVersion | None = Field(
        default=None, description="The workflow version the run executes; with `?include=definition` only."
    )


class RunPage(_Out):
    items: list[RunSummary]
    next_cursor: str | None


class CancelResult(_Out):
    id: UUID
    status: RunStatus
    cancel_requested: bool


class QueueCounts(_Out):
    waiting: int
    active: int
    completed: int
    failed: int
    delayed: int
    total: int


class QueueInfo(_Out):
    available: bool
    redis: bool
    stats: QueueCounts
    waiting_by_priority: dict[str, int]
    rate_limit: dict[str, int]
    concurrency: int
    waiting_on_sub_workflows: int


class SchedulerInfo(_Out):
    initialized: bool
    scheduled_workflows: int


class QueueStatsBody(BaseModel):
    """The seeds' ``/api/workflows/queue/stats`` body: ``capacity`` has ``message`` with Redis,
    ``recommendation`` without it."""

    queue: QueueInfo
    scheduler: SchedulerInfo
    capacity: dict[str, str]
    alerts: list[str]


class Secret(_Out):
    name: str
    created_at: datetime
    updated_at: datetime


class SecretList(_Out):
    items: list[Secret]


class LastFire(_Out):
    scheduled_at: datetime
    fired_at: datetime
    outcome: str
    run_id: UUID | None


class SchedulePreview(_Out):
    workflow_id: UUID
    schedule: str
    timezone: str
    active: bool
    next_fires: list[datetime]
    last_fire: LastFire | None
    next_fire: datetime | None
    missed_count: int


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


Problem.model_rebuild()
