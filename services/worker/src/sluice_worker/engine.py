"""The workflow engine: runs a workflow's steps for one attempt of one run (entry point :func:`execute`).

Each finished step is checkpointed through the :class:`StepStore` before the next one starts, so
a retried or recovered run resumes at its first unfinished step with the recorded outputs.
Between steps the engine checks for cancellation, shutdown and the run's deadline.

Each step's type is decided once, in the step registry with the worker's run functions attached
(:mod:`sluice_worker.steps`, over :mod:`sluice_common.steps`): built-in types and plugins alike.
The engine knows no type by name: for any type it renders the config's templates (over the run
context, see :mod:`sluice_worker.expressions`), validates it with the type's config model and
calls the type's run function; a type that branches (``condition``) keeps ``if``/``then``/``else``
unrendered, and its output's ``next`` decides where the walk goes.

A ``delay`` step and a waiting ``workflow`` step do not hold the thread: the step is recorded
as ``waiting`` and the attempt ends as ``parked`` (the executor gives the attempt back and
leaves the run ``delayed`` until the time, or ``waiting`` until the child run ends). When the
run is claimed again, the walk over the steps reaches the waiting step again, which then
completes (time passed, child finished) or parks once more.

Condition jumps only go forward, and a condition's recorded output names the step it chose, so
replaying completed steps on resume follows the same path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx
from pydantic import BaseModel, ValidationError

from sluice_common.errors import field_problems
from sluice_common.steps import BRANCH_IF, BRANCH_TARGETS, STOP, StepPlugin
from sluice_common.workflow import split_step_timeout, step_plugins
from sluice_worker import expressions
from sluice_worker.expressions import ExpressionError, SecretBag
from sluice_worker.safehttp import HttpPolicy
from sluice_worker.steps import RunnableStep, StepRunners, default_runners
from sluice_worker.steps.base import Park, StepInput

# Raised by steps and by the executor's sub-run starter; its home is with the step types.
from sluice_worker.steps.base import StepFailed as StepFailed

DEFAULT_STEP_TIMEOUT = 300.0
DEFAULT_OUTPUT_MAX_BYTES = 256 * 1024
MASK = "***"


class StepStore(Protocol):
    """Where a run's step results are checkpointed (one write per finished step)."""

    def completed(self) -> dict[str, Any]: ...

    def waiting(self) -> dict[str, Any]: ...

    def starting(self, step_id: str, position: int) -> None:
        """The step is about to run (nothing is written: a step's record is its end)."""
        ...

    def succeeded(self, step_id: str, position: int, output: Any, started_at: datetime) -> None: ...

    def parked(self, step_id: str, position: int, output: Any, started_at: datetime) -> None: ...

    def failed(self, step_id: str, position: int, error: str, started_at: datetime) -> None: ...

    def interruption(self) -> Literal["cancelled", "shutdown"] | None: ...


@dataclass(frozen=True)
class ChildState:
    run_id: str
    status: str  # queued, delayed, running, waiting, succeeded, failed, cancelled
    error: str | None = None
    output: Any = None  # output of the child's last finished step


class SubRuns(Protocol):
    """Starting and reading child runs (the executor implements it over PostgreSQL and the broker)."""

    def start(self, ctx: RunContext, step_id: str, workflow_id: str, trigger_data: Any) -> str: ...

    def state(self, run_id: str) -> ChildState: ...


@dataclass
class Runtime:
    """What steps may use besides the run context; one per worker process."""

    http: httpx.Client
    http_policy: HttpPolicy = field(default_factory=HttpPolicy)
    step_timeout: float = DEFAULT_STEP_TIMEOUT
    output_max_bytes: int = DEFAULT_OUTPUT_MAX_BYTES
    subruns: SubRuns | None = None
    plugins: Callable[[], dict[str, StepPlugin]] = step_plugins
    steps: StepRunners | None = None  # the step types and run functions; default: built-ins and plugins

    def runners(self) -> StepRunners:
        return self.steps if self.steps is not None else default_runners(self.plugins())


@dataclass
class RunContext:
    run_id: str
    workflow_id: str
    attempt: int
    trigger_type: str
    trigger_data: Any
    steps: list[dict[str, Any]]
    deadline: float  # time.monotonic() value
    variables: dict[str, Any] = field(default_factory=dict)
    owner_id: str = ""
    secrets: Callable[[], dict[str, str]] | None = None  # loads the owner's secrets on first use


@dataclass(frozen=True)
class Outcome:
    status: Literal["succeeded", "failed", "cancelled", "handed_back", "parked"]
    error: str | None = None
    final: bool = False  # a failure that retrying cannot fix
    final_step: tuple[str, int, Any, datetime] | None = None  # a checkpoint left for the finish
    resume_at: datetime | None = None  # parked until this time (a delay step)
    waiting_for: str | None = None  # parked until this child run ends (a workflow step)


class Scope:
    """The template context of one run: ``trigger``, ``steps``, ``run``, ``vars``, ``secrets``."""

    def __init__(self, ctx: RunContext, outputs: dict[str, Any]) -> None:
        self.bag = SecretBag(ctx.secrets)
        self.values: dict[str, Any] = {
            "trigger": ctx.trigger_data if ctx.trigger_data is not None else {},
            "steps": outputs,
            "run": {
                "id": ctx.run_id,
                "attempt": ctx.attempt,
                "workflowId": ctx.workflow_id,
                "triggerType": ctx.trigger_type,
            },
            "vars": ctx.variables,
            "secrets": self.bag,
        }

    def mask(self, value: Any) -> Any:
        """Replace every secret value read so far with ``***``."""
        if not self.bag.used:
            return value
        return _mask(value, sorted(self.bag.used, key=len, reverse=True))


def _mask(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {_mask(k, secrets): _mask(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, secrets) for v in value]
    return value


def cap_output(output: Any, max_bytes: int) -> Any:
    """The output as stored: JSON data, or a truncation marker when it is over ``max_bytes``."""
    encoded = json.dumps(output, default=str)
    if len(encoded.encode()) > max_bytes:
        return {"truncated": True, "bytes": len(encoded.encode()), "preview": encoded[:1024]}
    return json.loads(encoded)


def _remaining(ctx: RunContext) -> float:
    return ctx.deadline - time.monotonic()


# Steps --------------------------------------------------------------------------------------


def _validate(step_id: str, model: type[BaseModel], config: dict[str, Any]) -> BaseModel:
    try:
        # Definitions are checked strictly at creation; here the config holds rendered templates,
        # whose values may fairly be coerced (a number rendered where a header string goes).
        return model.model_validate(config, strict=False)
    except ValidationError as exc:
        first = field_problems(exc, "config")[0]
        raise StepFailed(step_id, f"{first.path}: {first.message}", final=True) from None


def run_step(
    step: dict[str, Any],
    kind: RunnableStep | None,
    position: int,
    scope: Scope,
    ctx: RunContext,
    runtime: Runtime,
    waiting: Any,
    budget: float,
) -> Any:
    """Render, validate and run one step of type ``kind``; returns its output or a :class:`Park`."""
    step_id = step["id"]
    if kind is None:
        raise StepFailed(step_id, f"unknown step type {step['type']!r} (is its package installed?)", final=True)
    model = kind.type.config_model
    raw, timeout_setting = split_step_timeout(model, step.get("config") or {})
    timeout = min(float(timeout_setting or runtime.step_timeout), budget)
    literal: dict[str, Any] = {}
    if kind.type.branches:
        # `if` is an expression, not a template; `then`/`else` are step ids.
        literal = {k: raw[k] for k in (BRANCH_IF, *BRANCH_TARGETS) if k in raw}
        raw = {k: v for k, v in raw.items() if k not in literal}
    try:
        rendered = expressions.render_value(raw, scope.values, "config", min(timeout, expressions.EVAL_SECONDS))
    except ExpressionError as exc:
        raise StepFailed(step_id, str(exc), final=True) from None
    config = _validate(step_id, model, {**rendered, **literal})
    return kind.run(StepInput(step_id, position, config, scope, ctx, runtime, timeout, waiting))


def _next_position(kind: RunnableStep | None, output: Any, position: int, index: Mapping[str, int]) -> int | None:
    """Where the walk goes after a finished step; None when a branching step stopped the run."""
    if kind is not None and kind.type.branches and isinstance(output, dict):
        target = output.get("next")
        if target == STOP:
            return None
        if isinstance(target, str) and index.get(target, -1) > position:
            return index[target]
    return position + 1


def execute(ctx: RunContext, store: StepStore, runtime: Runtime | httpx.Client) -> Outcome:
    """Run the steps of ``ctx`` from the first unfinished one (the worker's one entry point)."""
    if isinstance(runtime, httpx.Client):
        runtime = Runtime(runtime)
    outputs = dict(store.completed())
    waiting = store.waiting()
    scope = Scope(ctx, outputs)
    index = {s["id"]: i for i, s in enumerate(ctx.steps)}
    runners = runtime.runners()
    position = 0
    while position < len(ctx.steps):
        step = ctx.steps[position]
        step_id = step["id"]
        kind = runners.get(step["type"])
        if step_id in outputs:
            nxt = _next_position(kind, outputs[step_id], position, index)
            if nxt is None:
                return Outcome("succeeded")
            position = nxt
            continue
        interruption = store.interruption()
        if interruption == "cancelled":
            return Outcome("cancelled", "cancelled while running")
        if interruption == "shutdown":
            return Outcome("handed_back")
        remaining = _remaining(ctx)
        if remaining <= 0:
            return Outcome("failed", "run time limit reached before step " + repr(step_id))
        store.starting(step_id, position)
        started_at = datetime.now(UTC)
        try:
            result = run_step(step, kind, position, scope, ctx, runtime, waiting.get(step_id), remaining)
        except StepFailed as exc:
            message = scope.mask(str(exc))
            store.failed(step_id, position, message, started_at)
            return Outcome("failed", message, final=exc.final)
        except Exception as exc:  # a bug in a step must fail the run, not the worker
            message = scope.mask(f"step {step_id!r}: {type(exc).__name__}: {exc}")
            store.failed(step_id, position, message, started_at)
            return Outcome("failed", message)
        if isinstance(result, Park):
            store.parked(step_id, position, scope.mask(result.output), started_at)
            return Outcome("parked", resume_at=result.resume_at, waiting_for=result.waiting_for)
        output = cap_output(scope.mask(result), runtime.output_max_bytes)
        store.succeeded(step_id, position, output, started_at)
        outputs[step_id] = output
        if _remaining(ctx) <= 0:
            return Outcome("failed", f"run time limit reached during step {step_id!r}")
        nxt = _next_position(kind, output, position, index)
        if nxt is None:
            return Outcome("succeeded")
        position = nxt
    return Outcome("succeeded")
