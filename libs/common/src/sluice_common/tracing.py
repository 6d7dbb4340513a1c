"""OpenTelemetry tracing shared by the services: set-up from the standard variables, and a run's trace context.

A run has one trace. Its context is created with the run (:func:`creating`, a ``create`` producer
span in the messaging conventions' terms) and stored on the run row as a W3C ``traceparent``;
every attempt the worker makes (first, retried, recovered after a crash, resumed after a delay
or a sub-workflow, woken by the reconciler) is a consumer span under it, whichever wake-up
message led to it. The run row, not the wake-up message, carries the context because wake-ups
are hints (any may start any run) and may be re-sent by the reconciler.

Set-up (:func:`configure_tracing`) reads only the standard variables: ``OTEL_SDK_DISABLED``,
``OTEL_TRACES_EXPORTER`` (``otlp`` by default once an endpoint is set; ``console``; ``none``),
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``..._TRACES_PROTOCOL`` (``http/protobuf`` by default, or
``grpc``), ``OTEL_SERVICE_NAME`` (the service's own name by default), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and its argument, and the exporters' own headers, timeout and
certificate variables. With no exporter configured nothing is installed: the OpenTelemetry
API's no-op tracer remains, and this module's helpers return at their first test.

Providers are made in the process that exports: each service calls :func:`configure_tracing`
after any fork (gunicorn's workers in ``get_app``), so no exporter thread is lost to a fork.
``SLUICE_TRACE_CLIENTS`` adds PostgreSQL (psycopg) and Redis client spans, off by default: a run
makes several statements and Redis calls, which would multiply the spans per run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sluice_common.errors import ConfigError

log = logging.getLogger(__name__)

TRACER_NAME = "sluice"
RUN_QUEUE_DESTINATION = "sluice.runs"  # the messaging destination: the run queue, as operators name it
MESSAGING_SYSTEM = "redis"  # the broker the wake-ups travel through

_propagator = TraceContextTextMapPropagator()
_enabled = False


def enabled() -> bool:
    """Whether this process exports traces (set once by :func:`configure_tracing`)."""
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def _env(name: str, environ: Mapping[str, str]) -> str:
    return environ.get(name, "").strip()


def exporter_wanted(environ: Mapping[str, str] | None = None) -> str | None:
    """Which exporter the standard variables ask for: ``otlp``, ``console`` or None (no tracing)."""
    environ = os.environ if environ is None else environ
    if _env("OTEL_SDK_DISABLED", environ).lower() == "true":
        return None
    chosen = _env("OTEL_TRACES_EXPORTER", environ).lower()
    if chosen == "none":
        return None
    if chosen in ("otlp", "console"):
        return chosen
    if chosen:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: {chosen!r} is not supported (otlp, console or none)")
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", environ) or _env("OTEL_EXPORTER_OTLP_ENDPOINT", environ)
    return "otlp" if endpoint else None


def _protocol(environ: Mapping[str, str]) -> str:
    protocol = (
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ) or _env("OTEL_EXPORTER_OTLP_PROTOCOL", environ)
    ).lower() or "http/protobuf"
    if protocol not in ("http/protobuf", "grpc"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)")
    return protocol


def check_tracing_settings(environ: Mapping[str, str] | None = None) -> None:
    """Refuse an unsupported exporter or protocol (:class:`ConfigError`) without setting anything up:
    for a process that checks its settings before it forks (the API's gunicorn master)."""
    environ = os.environ if environ is None else environ
    if exporter_wanted(environ) == "otlp":
        _protocol(environ)


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    protocol = _protocol(environ)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    return GrpcSpanExporter()


def configure_tracing(
    service_name: str, *, trace_clients: bool = False, environ: Mapping[str, str] | None = None
) -> bool:
    """Install this process's tracer provider from the standard variables; False when none is wanted.

    ``service_name`` is the default ``service.name`` (``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` win). Raises for an exporter or protocol that is
    not supported (:class:`~sluice_common.errors.ConfigError`), so that a typo is not a silent
    loss of every trace.
    """
    global _enabled
    environ = os.environ if environ is None else environ
    wanted = exporter_wanted(environ)
    if wanted is None:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # The variables win over the default name: merge() lets the later resource's attributes win.
    resource = Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    exporter = ConsoleSpanExporter() if wanted == "console" else _otlp_exporter(environ)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace_clients:
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        PsycopgInstrumentor().instrument(enable_commenter=False)
        RedisInstrumentor().instrument()
    _enabled = True
    log.info("tracing on: %s exporter, service %s", wanted, resource.attributes.get(SERVICE_NAME))
    return True


def shutdown_tracing() -> None:
    """Export what is buffered and stop (a process's last step; harmless when tracing is off)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if _enabled and callable(shutdown):
        shutdown()


# Trace context as text ---------------------------------------------------------------------------


def context_from(traceparent: str | None) -> otel_context.Context | None:
    """The context a stored ``traceparent`` names (None when it is missing or malformed)."""
    if not traceparent:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traceparent_of(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


def current_trace_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids as hex, or None outside a recorded span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id in a W3C ``traceparent`` (what the API shows for a run), or None."""
    ctx = context_from(traceparent)
    return format(trace.get_current_span(ctx).get_span_context().trace_id, "032x") if ctx is not None else None


# Spans of the run pipeline -------------------------------------------------------------------------


@dataclass
class Creation:
    """The trace context a new run is stored with; ``created`` names the run on its span."""

    traceparent: str | None
    span: Span | None = None

    def created(self, run_id: str, workflow_id: str, trigger_type: str) -> None:
        if self.span is not None:
            self.span.set_attributes(
                {
                    "messaging.message.id": run_id,
                    "sluice.workflow.id": workflow_id,
                    "sluice.run.trigger": trigger_type,
                }
            )


@contextmanager
def creating(traceparent: str | None = None) -> Iterator[Creation]:
    """The ``create`` span of a run, around the writing of its row.

    Its parent is the current span (the API request, a cron fire, the parent run's step), or
    else the caller's ``traceparent``. Yields the context to store on the run: this span's with
    tracing on, the caller's ``traceparent`` unchanged with it off (so a caller's trace id still
    reaches the run and the services that do trace).
    """
    if not _enabled:
        yield Creation(traceparent)
        return
    current = trace.get_current_span().get_span_context().is_valid
    parent = None if current else context_from(traceparent)
    with tracer().start_as_current_span(
        f"create {RUN_QUEUE_DESTINATION}",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "create",
            "messaging.destination.name": RUN_QUEUE_DESTINATION,
        },
    ) as span:
        yield Creation(traceparent_of(span), span)


@contextmanager
def sending(traceparent: str | None, run_id: str, reason: str) -> Iterator[None]:
    """A ``send`` span in a stored run's trace, around a wake-up sent for it by housekeeping (the
    reconciler, recovery after a lost worker): ``reason`` says which."""
    if not _enabled:
        yield
        return
    with tracer().start_as_current_span(
        f"send {RUN_QUEUE_DESTINATION}",
        context=context_from(traceparent),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": RUN_QUEUE_DESTINATION,
            "messaging.message.id": run_id,
            "sluice.wakeup.reason": reason,
        },
    ):
        yield


@contextmanager
def span(name: str, attributes: Mapping[str, str | int | float | bool] | None = None) -> Iterator[Span | None]:
    """An internal span around a piece of a service's work (a cron fire), or nothing with tracing off."""
    if not _enabled:
        yield None
        return
    with tracer().start_as_current_span(name, attributes=dict(attributes or {})) as current:
        yield current


def set_error(target: Span, message: str) -> None:
    target.set_status(Status(StatusCode.ERROR, message))
