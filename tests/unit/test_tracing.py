"""Tracing without a network: the worker's spans off the run-events seam, the API's redaction of
webhook secrets, a run's stored trace context, and the choice of exporter from the standard variables."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sluice_api.tracing import RedactHookSecrets, redact
from sluice_common import tracing
from sluice_common.errors import ConfigError
from sluice_common.observe import RunEnded, RunEvents, RunStarted, StepEnded, StepStarted
from sluice_worker.tracing import RunTracing

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def started(attempt: int = 1, traceparent: str | None = CALLER) -> RunStarted:
    return RunStarted("run-1", "wf-1", "manual", attempt, 0.25, traceparent)


def step(step_id: str, position: int, attempt: int = 1) -> StepStarted:
    return StepStarted("run-1", "wf-1", step_id, "http", attempt, position)


def test_an_attempt_is_a_consumer_span_in_the_runs_trace_with_a_span_per_step(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    events = RunEvents()
    events.add(RunTracing(provider.get_tracer("test")))
    events.started(started())
    events.step_started(step("a", 0))
    inside = trace.get_current_span().get_span_context()  # what an http step's client span would parent to
    events.step_ended(StepEnded("run-1", "wf-1", "a", "http", "succeeded", 0.1, 1))
    events.step_started(step("b", 1))
    events.step_ended(StepEnded("run-1", "wf-1", "b", "http", "failed", 0.1, 1, error="HTTP 500 from the target"))
    events.ended(RunEnded("run-1", "wf-1", "manual", 1, "retried", 0.3))

    by_name = {s.name: s for s in exporter.get_finished_spans()}
    attempt, a, b = by_name["process sluice.runs"], by_name["step a"], by_name["step b"]
    assert attempt.kind == SpanKind.CONSUMER
    assert format(attempt.context.trace_id, "032x") == CALLER_TRACE
    assert attempt.parent is not None
    assert format(attempt.parent.span_id, "016x") == "b7ad6b7169203331"
    assert attempt.attributes is not None
    assert attempt.attributes["messaging.operation.type"] == "process"
    assert attempt.attributes["messaging.destination.name"] == "sluice.runs"
    assert attempt.attributes["messaging.message.id"] == "run-1"
    assert attempt.attributes["sluice.run.attempt"] == 1
    assert attempt.attributes["sluice.run.outcome"] == "retried"
    assert attempt.status.status_code == StatusCode.ERROR
    for child in (a, b):
        assert child.parent is not None
        assert child.parent.span_id == attempt.context.span_id
    assert inside.span_id == a.context.span_id
    assert a.attributes is not None
    assert a.attributes["sluice.step.outcome"] == "succeeded"
    assert b.status.status_code == StatusCode.ERROR
    assert b.status.description == "HTTP 500 from the target"
    # Nothing stays current on the thread once the attempt has ended.
    assert not trace.get_current_span().get_span_context().is_valid


def test_an_attempt_that_broke_off_mid_step_closes_its_spans(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    events = RunEvents()
    events.add(RunTracing(provider.get_tracer("test")))
    events.started(started(traceparent=None))
    events.step_started(step("a", 0))
    events.ended(RunEnded("run-1", "wf-1", "manual", 1, "crashed", 0.3))
    finished = {s.name: s for s in exporter.get_finished_spans()}
    assert set(finished) == {"process sluice.runs", "step a"}
    assert finished["step a"].attributes is not None
    assert finished["step a"].attributes["sluice.step.outcome"] == "crashed"
    assert finished["process sluice.runs"].parent is None  # no stored context: the attempt starts a trace
    assert not trace.get_current_span().get_span_context().is_valid


def test_every_attempt_of_a_run_joins_its_one_trace(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = spans
    events = RunEvents()
    events.add(RunTracing(provider.get_tracer("test")))
    for attempt, outcome in ((1, "retried"), (2, "parked"), (2, "succeeded")):
        events.started(started(attempt))
        events.ended(RunEnded("run-1", "wf-1", "manual", attempt, outcome, 0.1))
    attempts = exporter.get_finished_spans()
    assert len(attempts) == 3
    assert {format(s.context.trace_id, "032x") for s in attempts} == {CALLER_TRACE}
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.UNSET, StatusCode.UNSET]


def test_webhook_secrets_never_reach_a_span(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = spans
    provider.add_span_processor(RedactHookSecrets())
    attributes = {"http.target": "/api/hooks/s3cr3t-token?x=1", "url.path": "/api/hooks/s3cr3t-token", "other": "k"}
    provider.get_tracer("test").start_span("POST /api/hooks/s3cr3t-token", attributes=attributes).end()
    (span,) = exporter.get_finished_spans()
    assert "s3cr3t" not in span.name
    assert "s3cr3t" not in repr(dict(span.attributes or {}))
    assert span.attributes is not None
    assert span.attributes["url.path"] == "/api/hooks/{secret}"
    assert redact("/api/workflows/1") == "/api/workflows/1"


def test_a_runs_trace_id_comes_from_its_stored_context() -> None:
    assert tracing.trace_id_of(CALLER) == CALLER_TRACE
    assert tracing.trace_id_of(None) is None
    assert tracing.trace_id_of("00-00000000000000000000000000000000-b7ad6b7169203331-01") is None
    assert tracing.trace_id_of("garbage") is None


def test_tracing_is_off_with_nothing_set_and_creation_keeps_the_callers_context() -> None:
    assert not tracing.enabled()  # no test process configures the global provider
    with tracing.creating(CALLER) as creation:
        creation.created("run-1", "wf-1", "manual")
    assert creation.traceparent == CALLER
    assert creation.span is None


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ],
)
def test_the_exporter_follows_the_standard_variables(environ: dict[str, str], wanted: str | None) -> None:
    assert tracing.exporter_wanted(environ) == wanted


def test_an_unsupported_exporter_or_protocol_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        tracing.exporter_wanted({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="http/protobuf or grpc"):
        tracing.configure_tracing(
            "sluice-test",
            environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        )
    assert not tracing.enabled()
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracing.check_tracing_settings(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )
    tracing.check_tracing_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})  # fine as it is


def test_http_requests_of_steps_carry_the_step_context(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """The worker's client, instrumented, sends ``traceparent`` of a client span under the current step."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    provider, exporter = spans
    seen: list[str | None] = []

    def target(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("traceparent"))
        return httpx.Response(200, json={})

    client = httpx.Client(transport=httpx.MockTransport(target))
    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=provider)
    with provider.get_tracer("test").start_as_current_span("step a") as step_span:
        client.get("http://target.example/x")
    (sent,) = seen
    request_span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert request_span.parent is not None
    assert request_span.parent.span_id == step_span.get_span_context().span_id
    assert sent is not None
    ids = f"00-{format(request_span.context.trace_id, '032x')}-{format(request_span.context.span_id, '016x')}-"
    assert sent.startswith(ids)
