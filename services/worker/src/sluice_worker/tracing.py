"""The worker's spans, hung off the run-events seam: one consumer span per attempt, one span per step.

:class:`RunTracing` is a :class:`~sluice_common.observe.RunObserver`. An attempt's span
(``process sluice.runs``, kind consumer, the messaging conventions' attributes) is a child of the
context stored on the run (see :mod:`sluice_common.tracing`), so every attempt of a run, however it
was woken, lands in the run's one trace. Each step's span is a child of its attempt's and is the
current span while the step runs: an ``http`` step's request (httpx instrumentation, on the
worker's client by :func:`instrument_http`) is its child and sends ``traceparent`` to the target,
and a ``workflow`` step's child run is created under it.

The seam tells an execution's events in order on the thread that runs it, and always tells its
end, so the open spans live in a thread-local and are closed at ``run_ended`` whatever happened.
"""

from __future__ import annotations

import threading
from contextvars import Token
from dataclasses import dataclass, field

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from sluice_common import tracing
from sluice_common.observe import BaseRunObserver, RunEnded, RunEvents, RunStarted, StepEnded, StepStarted
from sluice_common.settings import Settings

# Outcomes of an execution that are errors on its span (a retried attempt failed too).
_FAILED = frozenset({"failed", "retried", "crashed"})


@dataclass
class _Open:
    span: Span
    token: Token[otel_context.Context]
    steps: list[tuple[Span, Token[otel_context.Context]]] = field(default_factory=list)


class RunTracing(BaseRunObserver):
    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer if tracer is not None else tracing.tracer()
        self._local = threading.local()

    def _open(self) -> _Open | None:
        return getattr(self._local, "open", None)

    def run_started(self, event: RunStarted) -> None:
        self._close(None)  # nothing is left open from an execution that never told its end
        # Few attributes, each said once (the run id is the message id): every one costs CPU when
        # the span is made and again when it is encoded for export, per execution.
        span = self._tracer.start_span(
            f"process {tracing.RUN_QUEUE_DESTINATION}",
            context=tracing.context_from(event.traceparent),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": tracing.MESSAGING_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": tracing.RUN_QUEUE_DESTINATION,
                "messaging.message.id": event.run_id,
                "sluice.workflow.id": event.workflow_id,
                "sluice.run.trigger": event.trigger_type,
                "sluice.run.attempt": event.attempt,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        self._local.open = _Open(span, token)

    def step_started(self, event: StepStarted) -> None:
        run = self._open()
        if run is None:
            return
        span = self._tracer.start_span(
            f"step {event.step_id}",
            attributes={
                "sluice.step.id": event.step_id,
                "sluice.step.type": event.step_type,
                "sluice.run.attempt": event.attempt,
            },
        )
        run.steps.append((span, otel_context.attach(trace.set_span_in_context(span))))

    def step_ended(self, event: StepEnded) -> None:
        run = self._open()
        if run is None or not run.steps:
            return
        span, token = run.steps.pop()
        span.set_attribute("sluice.step.outcome", event.status)
        if event.status == "failed":
            tracing.set_error(span, event.error or "step failed")
            span.add_event("exception", {"exception.type": "StepFailed", "exception.message": event.error or ""})
        otel_context.detach(token)
        span.end()

    def run_ended(self, event: RunEnded) -> None:
        self._close(event.outcome)

    def _close(self, outcome: str | None) -> None:
        run = self._open()
        if run is None:
            return
        self._local.open = None
        while run.steps:  # a step cut short by a crash
            span, token = run.steps.pop()
            span.set_attribute("sluice.step.outcome", "crashed")
            otel_context.detach(token)
            span.end()
        run.span.set_attribute("sluice.run.outcome", outcome or "abandoned")
        if outcome is None or outcome in _FAILED:
            tracing.set_error(run.span, f"the attempt ended as {outcome or 'abandoned'}")
        otel_context.detach(run.token)
        run.span.end()


def instrument_http(client: httpx.Client) -> None:
    """Trace the requests of ``http`` steps: a client span each, and ``traceparent`` sent to the target."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(client)


def start_tracing(
    settings: Settings, client: httpx.Client, events: RunEvents, *, service_name: str = "sluice-worker"
) -> bool:
    """Turn the worker's tracing on when the standard variables ask for it (see :mod:`sluice_common.tracing`)."""
    if not tracing.configure_tracing(service_name, trace_clients=settings.trace_clients):
        return False
    instrument_http(client)
    events.add(RunTracing())
    return True
