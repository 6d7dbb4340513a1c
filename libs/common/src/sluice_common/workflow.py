"""The workflow model and its validation.

A workflow is ``{name, description?, trigger: {type, config}, steps: [{id, type, config}], status,
settings?}`` in camelCase JSON. :func:`validate_workflow` checks a whole definition and reports
every problem with its JSON path (``$.steps[1].config.url``), not only the first one.

Step configs are validated here, not in the worker, because the API must reject a bad
definition at creation time without importing worker code. Built-in step types register their
config models in :data:`STEP_CONFIGS`; packages add more through the ``sluice.steps`` entry points.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from sluice_common.errors import FieldProblem, ValidationFailed

STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
MAX_STEPS = 200


class _Model(BaseModel):
    """Strict camelCase model: unknown fields and wrong JSON types are errors (no ``0`` for
    ``false``, no ``"5"`` for ``5``), so typos never pass silently."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
    )


# Triggers -------------------------------------------------------------------------------------


def parse_cron(schedule: str) -> tuple[str, bool]:
    """Return ``(normalised expression, has_seconds)`` or raise ``ValueError`` saying what is wrong.

    Five fields are minute-first; six fields put seconds first.
    """
    fields = schedule.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"a cron schedule has 5 fields (minute hour day month weekday) or 6 with seconds first; got {len(fields)}"
        )
    has_seconds = len(fields) == 6
    normalised = " ".join(fields)
    if not croniter.is_valid(normalised, second_at_beginning=has_seconds):
        raise ValueError(f"{schedule!r} is not a valid cron expression")
    return normalised, has_seconds


def cron_iter(schedule: str, start: datetime) -> croniter:
    """A croniter over ``schedule`` (5 or 6 fields, seconds first) from the aware ``start``."""
    normalised, has_seconds = parse_cron(schedule)
    return croniter(normalised, start, second_at_beginning=has_seconds)


class CronConfig(_Model):
    schedule: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    missed: Literal["skip", "run_once", "all"] = "skip"
    missed_grace_seconds: Annotated[int, Field(ge=0, le=7 * 86400)] = 3600
    overlap: Literal["allow", "skip", "queue_one"] = "allow"

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        return parse_cron(value)[0]

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (for example Europe/Paris)") from None
        return value


class EmptyConfig(_Model):
    pass


class ManualTrigger(_Model):
    type: Literal["manual"]
    config: EmptyConfig = EmptyConfig()


class WebhookTrigger(_Model):
    type: Literal["webhook"]
    config: EmptyConfig = EmptyConfig()


class CronTrigger(_Model):
    type: Literal["cron"]
    config: CronConfig


Trigger = Annotated[ManualTrigger | CronTrigger | WebhookTrigger, Field(discriminator="type")]


# Steps ----------------------------------------------------------------------------------------


class HttpConfig(_Model):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    url: Annotated[str, Field(min_length=1, max_length=8192)]
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    json_body: Annotated[Any, Field(alias="json")] = None
    body: str | None = None
    form: dict[str, str] | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    accept_status: list[Annotated[int, Field(ge=100, le=599)]] | None = None
    max_redirects: Annotated[int, Field(ge=0, le=20)] = 5

    @model_validator(mode="after")
    def _one_body(self) -> HttpConfig:
        given = [n for n, v in (("json", self.json_body), ("body", self.body), ("form", self.form)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json, body, form (got {', '.join(given)})")
        return self


class TransformConfig(_Model):
    value: Any


class ConditionConfig(_Model):
    expression: Annotated[str, Field(alias="if", min_length=1, max_length=4096)]
    then: str | None = None
    else_: Annotated[str | None, Field(alias="else")] = None
    reason: Annotated[str | None, Field(max_length=1000)] = None


class DelayConfig(_Model):
    seconds: Annotated[float | None, Field(gt=0, le=366 * 86400)] = None
    until: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> DelayConfig:
        if (self.seconds is None) == (self.until is None):
            raise ValueError("give exactly one of seconds or until")
        return self


class WorkflowStepConfig(_Model):
    workflow_id: Annotated[str, Field(min_length=1, max_length=64)]
    trigger_data: Any = None
    wait: bool = True


class FailConfig(_Model):
    message: Annotated[str, Field(min_length=1, max_length=2000)]


STEP_CONFIGS: dict[str, type[BaseModel]] = {
    "http": HttpConfig,
    "transform": TransformConfig,
    "condition": ConditionConfig,
    "delay": DelayConfig,
    "workflow": WorkflowStepConfig,
    "fail": FailConfig,
}
"""Config model of every known step type; the key is the step's ``type``."""

# ``condition`` steps may continue at another step or end the run.
STOP = "stop"


class Step(_Model):
    id: Annotated[str, Field(pattern=STEP_ID_PATTERN)]
    type: Annotated[str, Field(min_length=1, max_length=64)]
    config: dict[str, Any] = {}


# Workflow -------------------------------------------------------------------------------------


class WorkflowSettings(_Model):
    max_attempts: Annotated[int | None, Field(ge=1, le=100)] = None
    timeout_seconds: Annotated[int, Field(ge=1, le=7 * 86400)] = 3600
    backoff_min_ms: Annotated[int | None, Field(ge=0, le=86_400_000)] = None
    backoff_max_ms: Annotated[int | None, Field(ge=0, le=86_400_000)] = None
    variables: dict[str, Any] = {}

    @model_validator(mode="after")
    def _backoff_order(self) -> WorkflowSettings:
        low, high = self.backoff_min_ms, self.backoff_max_ms
        if low is not None and high is not None and low > high:
            raise ValueError("backoffMinMs must not exceed backoffMaxMs")
        return self


class WorkflowDefinition(_Model):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str | None, Field(max_length=5000)] = None
    trigger: Trigger
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]
    status: Literal["active", "paused"] = "active"
    settings: WorkflowSettings = WorkflowSettings()


# Validation -----------------------------------------------------------------------------------


def json_path(loc: tuple[int | str, ...], base: str = "$") -> str:
    """Render a pydantic error location as a JSON path: ``("steps", 0, "id")`` -> ``$.steps[0].id``."""
    out = base
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


def _problems(exc: ValidationError, base: str = "$", *, skip_tags: bool = True) -> list[FieldProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if skip_tags:
            # Discriminated unions add the tag ("cron") to the location; users never wrote it.
            loc = tuple(p for p in loc if p not in {"manual", "cron", "webhook"})
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        problems.append(FieldProblem(json_path(loc, base), message))
    return problems


def _check_steps(raw_steps: Any, known_types: dict[str, type[BaseModel]]) -> list[FieldProblem]:
    """Checks pydantic cannot express: each config against its type, unique ids, jump targets."""
    if not isinstance(raw_steps, list):
        return []
    problems: list[FieldProblem] = []
    seen: dict[str, int] = {}
    ids = {s["id"] for s in raw_steps if isinstance(s, dict) and isinstance(s.get("id"), str)}
    for index, step in enumerate(raw_steps):
        if not isinstance(step, dict):
            continue
        base = f"$.steps[{index}]"
        step_id = step.get("id")
        if isinstance(step_id, str):
            if step_id in seen:
                problems.append(
                    FieldProblem(f"{base}.id", f"duplicate step id {step_id!r} (also steps[{seen[step_id]}])")
                )
            else:
                seen[step_id] = index
        step_type = step.get("type")
        if not isinstance(step_type, str):
            continue
        model = known_types.get(step_type)
        if model is None:
            names = ", ".join(sorted(known_types))
            problems.append(FieldProblem(f"{base}.type", f"unknown step type {step_type!r}; known: {names}"))
            continue
        try:
            config = model.model_validate(step.get("config", {}))
        except ValidationError as exc:
            problems.extend(_problems(exc, f"{base}.config", skip_tags=False))
            continue
        if isinstance(config, ConditionConfig):
            for field, target in (("then", config.then), ("else", config.else_)):
                if target is not None and target != STOP and target not in ids:
                    problems.append(
                        FieldProblem(
                            f"{base}.config.{field}",
                            f"no step with id {target!r} (use a step id or {STOP!r})",
                        )
                    )
    return problems


def validate_workflow(data: Any, *, step_types: dict[str, type[BaseModel]] | None = None) -> WorkflowDefinition:
    """Validate a workflow definition; raise :class:`ValidationFailed` with every problem."""
    known = STEP_CONFIGS if step_types is None else step_types
    problems: list[FieldProblem] = []
    definition: WorkflowDefinition | None = None
    try:
        definition = WorkflowDefinition.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems(exc))
    if isinstance(data, dict):
        problems.extend(_check_steps(data.get("steps"), known))
    if problems:
        raise ValidationFailed(problems)
    assert definition is not None
    return definition
