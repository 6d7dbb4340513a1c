"""The engine entry point: runs a workflow's steps in order for one attempt of one run.

Each finished step is checkpointed through the :class:`StepStore` before the next one starts, so
a retried or recovered run resumes at its first unfinished step with the recorded outputs.
Between steps the engine checks for cancellation, shutdown and the run's deadline.

Step types here: ``transform`` (a literal value), ``http`` (a real request through the worker's
httpx client) and ``fail``. The other validated types (``condition``, ``delay``, ``workflow``)
and templates over the run context come with the workflow-engine change; until then such a step
fails its run with a clear message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx

from sluice_common.workflow import STEP_CONFIGS, FailConfig, HttpConfig, TransformConfig


class StepFailed(Exception):
    """A step failed; the attempt fails and may be retried."""

    def __init__(self, step_id: str, message: str, *, final: bool = False) -> None:
        self.step_id = step_id
        self.final = final
        super().__init__(f"step {step_id!r}: {message}")


class StepStore(Protocol):
    """Where a run's step results are checkpointed (one write per finished step)."""

    def completed(self) -> dict[str, Any]: ...

    def succeeded(self, step_id: str, position: int, output: Any, started_at: datetime) -> None: ...

    def failed(self, step_id: str, position: int, error: str, started_at: datetime) -> None: ...

    def interruption(self) -> Literal["cancelled", "shutdown"] | None: ...


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


@dataclass(frozen=True)
class Outcome:
    status: Literal["succeeded", "failed", "cancelled", "handed_back"]
    error: str | None = None
    final: bool = False  # a failure that retrying cannot fix
    final_step: tuple[str, int, Any, datetime] | None = None  # a checkpoint left for the finish


def _remaining(ctx: RunContext) -> float:
    return ctx.deadline - time.monotonic()


def _http(step_id: str, config: HttpConfig, client: httpx.Client, timeout: float) -> Any:
    kwargs: dict[str, Any] = {"headers": config.headers}
    if config.query:  # httpx replaces the URL's own query string with `params`, even an empty one
        kwargs["params"] = config.query
    if config.json_body is not None:
        kwargs["json"] = config.json_body
    elif config.body is not None:
        kwargs["content"] = config.body
    elif config.form is not None:
        kwargs["data"] = config.form
    try:
        response = client.request(
            config.method,
            config.url,
            timeout=min(config.timeout_seconds, timeout),
            follow_redirects=config.max_redirects > 0,
            **kwargs,
        )
    except httpx.TimeoutException:
        raise StepFailed(step_id, f"timed out after {min(config.timeout_seconds, timeout):.1f}s") from None
    except httpx.HTTPError as exc:
        raise StepFailed(step_id, f"request failed: {exc}") from None
    accepted = config.accept_status
    ok = response.status_code in accepted if accepted else 200 <= response.status_code < 300
    if not ok:
        raise StepFailed(step_id, f"{config.method} {config.url} answered {response.status_code}")
    body: Any = response.text
    if response.headers.get("content-type", "").split(";")[0].strip().endswith("json"):
        with contextlib.suppress(ValueError):
            body = response.json()
    return {"status": response.status_code, "headers": dict(response.headers), "body": body}


def run_step(step: dict[str, Any], client: httpx.Client, timeout: float) -> Any:
    step_id, step_type = step["id"], step["type"]
    model = STEP_CONFIGS.get(step_type)
    if model is None:
        raise StepFailed(step_id, f"unknown step type {step_type!r}", final=True)
    config = model.model_validate(step.get("config", {}))
    if isinstance(config, TransformConfig):
        return config.value
    if isinstance(config, HttpConfig):
        return _http(step_id, config, client, timeout)
    if isinstance(config, FailConfig):
        raise StepFailed(step_id, config.message, final=True)
    raise StepFailed(step_id, f"step type {step_type!r} is not supported by this worker yet", final=True)


def execute(
    ctx: RunContext,
    store: StepStore,
    client: httpx.Client,
    step_runner: Callable[[dict[str, Any], httpx.Client, float], Any] = run_step,
) -> Outcome:
    """Run the steps of ``ctx`` from the first unfinished one."""
    done = store.completed()
    for position, step in enumerate(ctx.steps):
        if step["id"] in done:
            continue
        interruption = store.interruption()
        if interruption == "cancelled":
            return Outcome("cancelled", "cancelled while running")
        if interruption == "shutdown":
            return Outcome("handed_back")
        remaining = _remaining(ctx)
        if remaining <= 0:
            return Outcome("failed", "run time limit reached before step " + repr(step["id"]))
        started_at = datetime.now(UTC)
        try:
            output = step_runner(step, client, remaining)
        except StepFailed as exc:
            store.failed(step["id"], position, str(exc), started_at)
            return Outcome("failed", str(exc), final=exc.final)
        except Exception as exc:  # a bug in a step must fail the run, not the worker
            store.failed(step["id"], position, f"{type(exc).__name__}: {exc}", started_at)
            return Outcome("failed", f"step {step['id']!r}: {type(exc).__name__}: {exc}")
        store.succeeded(step["id"], position, output, started_at)
        if _remaining(ctx) <= 0:
            return Outcome("failed", f"run time limit reached during step {step['id']!r}")
    return Outcome("succeeded")
