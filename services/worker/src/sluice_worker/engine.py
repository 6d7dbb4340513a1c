"""The workflow engine: runs a workflow's steps for one attempt of one run (entry point :func:`execute`).

Each finished step is checkpointed through the :class:`StepStore` before the next one starts, so
a retried or recovered run resumes at its first unfinished step with the recorded outputs.
Between steps the engine checks for cancellation, shutdown and the run's deadline.

Step types: ``http``, ``transform``, ``condition`` (continue at ``then``/``else`` or ``stop``),
``delay``, ``workflow`` (a sub-workflow, waited for or not), ``fail``, and plugins from the
``sluice.steps`` entry points. Strings in configs are templates over the run context (see
:mod:`sluice_worker.expressions`), rendered just before the step runs.

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
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import httpx
from pydantic import BaseModel, ValidationError

from sluice_common.errors import StepFailure, field_problems
from sluice_common.workflow import (
    STEP_CONFIGS,
    STOP,
    ConditionConfig,
    DelayConfig,
    FailConfig,
    HttpConfig,
    StepCall,
    StepError,
    StepPlugin,
    TransformConfig,
    WorkflowStepConfig,
    parse_time,
    split_step_timeout,
    step_plugins,
)
from sluice_worker import expressions
from sluice_worker.expressions import ExpressionError, SecretBag
from sluice_worker.safehttp import HttpPolicy, HttpRefused
from sluice_worker.safehttp import request as http_request

DEFAULT_STEP_TIMEOUT = 300.0
DEFAULT_OUTPUT_MAX_BYTES = 256 * 1024
MASK = "***"


class StepFailed(StepFailure):
    """A step failed; the attempt fails and may be retried (``final``: it may not)."""

    def __init__(self, step_id: str, message: str, *, final: bool = False) -> None:
        self.step_id = step_id
        self.final = final
        super().__init__(f"step {step_id!r}: {message}")


class StepStore(Protocol):
    """Where a run's step results are checkpointed (one write per finished step)."""

    def completed(self) -> dict[str, Any]: ...

    def waiting(self) -> dict[str, Any]: ...

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


@dataclass(frozen=True)
class Park:
    """A step's answer meaning: record me as waiting and end the attempt without using it."""

    output: Any
    resume_at: datetime | None = None
    waiting_for: str | None = None


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


# Step types ---------------------------------------------------------------------------------


@dataclass
class StepInput:
    """One step about to run: its rendered config and what it may use."""

    step_id: str
    position: int
    config: Any  # the validated config model
    scope: Scope
    ctx: RunContext
    runtime: Runtime
    timeout: float  # seconds, already bounded by the run deadline
    waiting: Any  # the step's recorded waiting output, when it parked before


def _http(step: StepInput) -> Any:
    config: HttpConfig = step.config
    timeout = min(config.timeout_seconds, step.timeout)
    try:
        result = http_request(
            step.runtime.http,
            step.runtime.http_policy,
            config.method,
            config.url,
            headers=config.headers,
            params=config.query or None,
            content=config.body,
            json_body=config.json_body,
            form=config.form,
            timeout=timeout,
            max_redirects=config.max_redirects,
            max_bytes=step.runtime.output_max_bytes * 4,
            secret_values=step.scope.bag.used,
        )
    except HttpRefused as exc:
        raise StepFailed(step.step_id, str(exc), final=True) from None
    except (httpx.TimeoutException, TimeoutError):
        raise StepFailed(step.step_id, f"timed out after {timeout:.1f}s") from None
    except httpx.HTTPError as exc:
        raise StepFailed(step.step_id, f"request failed: {type(exc).__name__}: {exc}") from None
    accepted = config.accept_status
    ok = result.status in accepted if accepted else 200 <= result.status < 300
    if not ok:
        raise StepFailed(step.step_id, f"{config.method} {result.url} answered {result.status}")
    text = result.content.decode("utf-8", errors="replace")
    body: Any = text
    content_type = result.headers.get("content-type", "").split(";")[0].strip()
    if content_type.endswith("json") and not result.truncated:
        try:
            body = json.loads(text)
        except ValueError:
            body = text
    output: dict[str, Any] = {"status": result.status, "headers": result.headers, "body": body}
    if result.redirects:
        output["url"] = result.url
    if result.truncated:
        output["bodyTruncated"] = True
    return output


def _condition(step: StepInput, expression: str) -> Any:
    config: ConditionConfig = step.config
    try:
        value = expressions.evaluate(expression, step.scope.values, min(step.timeout, expressions.EVAL_SECONDS))
    except ExpressionError as exc:
        raise StepFailed(step.step_id, f"config.if: {exc}", final=True) from None
    result = bool(value)
    target = config.then if result else config.else_
    if target not in (None, STOP):
        # Validation allows forward jumps only; a definition stored without it must not loop.
        later = [s["id"] for s in step.ctx.steps[step.position + 1 :]]
        if target not in later:
            raise StepFailed(
                step.step_id, f"config.{'then' if result else 'else'}: no later step {target!r}", final=True
            )
    output: dict[str, Any] = {"result": result, "next": target}
    if target == STOP:
        output["reason"] = config.reason or f"condition {expression!r} was {str(result).lower()}"
    return output


def _delay(step: StepInput) -> Any:
    config: DelayConfig = step.config
    now = datetime.now(UTC)
    if step.waiting is not None:
        until = parse_time(step.waiting["until"])
    elif config.seconds is not None:
        until = now + timedelta(seconds=config.seconds)
    else:
        assert config.until is not None
        try:
            until = parse_time(config.until)
        except ValueError as exc:
            raise StepFailed(step.step_id, f"config.until: {exc}", final=True) from None
    if until <= now:
        return {"waitedUntil": until.isoformat()}
    return Park({"until": until.isoformat()}, resume_at=until)


def _child_output(step_id: str, child: ChildState) -> Any:
    if child.status == "succeeded":
        return {"runId": child.run_id, "status": child.status, "output": child.output}
    # Final: the child has used its own retries; retrying the parent would multiply them.
    raise StepFailed(
        step_id, f"sub-workflow run {child.run_id} {child.status}: {child.error or 'no error recorded'}", final=True
    )


def _workflow(step: StepInput) -> Any:
    config: WorkflowStepConfig = step.config
    subruns = step.runtime.subruns
    if subruns is None:
        raise StepFailed(step.step_id, "this worker cannot start sub-workflows", final=True)
    if step.waiting is not None:
        child = subruns.state(step.waiting["childRunId"])
        if child.status in ("succeeded", "failed", "cancelled"):
            return _child_output(step.step_id, child)
        return Park(step.waiting, waiting_for=child.run_id)
    child_id = subruns.start(step.ctx, step.step_id, config.workflow_id, config.trigger_data)
    if not config.wait:
        return {"runId": child_id, "status": "started"}
    return Park({"childRunId": child_id}, waiting_for=child_id)


def _plugin(step: StepInput, plugin: StepPlugin) -> Any:
    call = StepCall(
        run_id=step.ctx.run_id,
        workflow_id=step.ctx.workflow_id,
        owner_id=step.ctx.owner_id,
        attempt=step.ctx.attempt,
        step_id=step.step_id,
        timeout=step.timeout,
        context={k: v for k, v in step.scope.values.items() if k != "secrets"},
    )
    try:
        return plugin.run(step.config, call)
    except StepError as exc:
        raise StepFailed(step.step_id, str(exc), final=exc.final) from None


def _validate(step_id: str, model: type[BaseModel], config: dict[str, Any]) -> BaseModel:
    try:
        # Definitions are checked strictly at creation; here the config holds rendered templates,
        # whose values may fairly be coerced (a number rendered where a header string goes).
        return model.model_validate(config, strict=False)
    except ValidationError as exc:
        first = field_problems(exc, "config")[0]
        raise StepFailed(step_id, f"{first.path}: {first.message}", final=True) from None


def run_step(
    step: dict[str, Any], position: int, scope: Scope, ctx: RunContext, runtime: Runtime, waiting: Any, budget: float
) -> Any:
    """Render, validate and run one step; returns its output or a :class:`Park`."""
    step_id, step_type = step["id"], step["type"]
    plugin: StepPlugin | None = None
    model = STEP_CONFIGS.get(step_type)
    if model is None:
        plugin = runtime.plugins().get(step_type)
        if plugin is None:
            raise StepFailed(step_id, f"unknown step type {step_type!r} (is its package installed?)", final=True)
        model = plugin.config_model
    raw, timeout_setting = split_step_timeout(model, step.get("config") or {})
    timeout = min(float(timeout_setting or runtime.step_timeout), budget)
    expression = None
    literal: dict[str, Any] = {}
    if model is ConditionConfig:
        # `if` is an expression, not a template; `then`/`else` are step ids.
        expression = str(raw.get("if", ""))
        literal = {k: raw[k] for k in ("if", "then", "else") if k in raw}
        raw = {k: v for k, v in raw.items() if k not in literal}
    try:
        rendered = expressions.render_value(raw, scope.values, "config", min(timeout, expressions.EVAL_SECONDS))
    except ExpressionError as exc:
        raise StepFailed(step_id, str(exc), final=True) from None
    rendered = {**rendered, **literal}
    config = _validate(step_id, model, rendered)
    item = StepInput(step_id, position, config, scope, ctx, runtime, timeout, waiting)
    started = time.monotonic()
    if isinstance(config, TransformConfig):
        return config.value
    if isinstance(config, HttpConfig):
        return _http(item)
    if isinstance(config, ConditionConfig):
        assert expression is not None
        return _condition(item, expression)
    if isinstance(config, DelayConfig):
        return _delay(item)
    if isinstance(config, WorkflowStepConfig):
        return _workflow(item)
    if isinstance(config, FailConfig):
        raise StepFailed(step_id, config.message, final=True)
    assert plugin is not None
    output = _plugin(item, plugin)
    if time.monotonic() - started > timeout:
        raise StepFailed(step_id, f"took longer than its {timeout:g}s time limit")
    return output


def _next_position(step: dict[str, Any], output: Any, position: int, index: Mapping[str, int]) -> int | None:
    """Where the walk goes after a finished step; None when a condition stopped the run."""
    if step["type"] == "condition" and isinstance(output, dict):
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
    position = 0
    while position < len(ctx.steps):
        step = ctx.steps[position]
        step_id = step["id"]
        if step_id in outputs:
            nxt = _next_position(step, outputs[step_id], position, index)
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
        started_at = datetime.now(UTC)
        try:
            result = run_step(step, position, scope, ctx, runtime, waiting.get(step_id), remaining)
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
        nxt = _next_position(step, output, position, index)
        if nxt is None:
            return Outcome("succeeded")
        position = nxt
    return Outcome("succeeded")
