"""The API's spans: Falcon's instrumentation (a server span per request, the caller's ``traceparent``
continued), and the redaction that keeps webhook secrets out of every exported span.

A webhook's URL is its secret (``/api/hooks/{secret}``), and the instrumentation records the
request path in the span's name and attributes; :class:`RedactHookSecrets` rewrites them as the
span starts, before any exporter sees it. Scrapes and probes (``/metrics``, ``/api/health``,
``/api/ready``) make no spans: one trace every few seconds per scraper would drown the runs'.
"""

from __future__ import annotations

import re

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from sluice_common import tracing

UNTRACED_PATHS = "/metrics,/api/health,/api/ready"
_HOOK_SECRET = re.compile(r"(/api/hooks/)[^/?#\s]+")
_PATH_ATTRIBUTES = ("http.target", "url.path", "http.url", "url.full")


def redact(text: str) -> str:
    return _HOOK_SECRET.sub(r"\1{secret}", text)


class RedactHookSecrets(SpanProcessor):
    """Replaces a webhook's secret in a starting span's name and URL attributes by ``{secret}``."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if "/api/hooks/" in span.name:
            span.update_name(redact(span.name))
        for key in _PATH_ATTRIBUTES:
            value = (span.attributes or {}).get(key)
            if isinstance(value, str) and "/api/hooks/" in value:
                span.set_attribute(key, redact(value))

    def on_end(self, span: ReadableSpan) -> None:
        return None


def instrument_falcon() -> bool:
    """Make the ``falcon.App`` built next a traced one, when this process traces (once per process)."""
    if not tracing.enabled():
        return False
    from opentelemetry.instrumentation.falcon import FalconInstrumentor

    instrumentor = FalconInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        add = getattr(trace.get_tracer_provider(), "add_span_processor", None)
        if callable(add):
            add(RedactHookSecrets())
        instrumentor.instrument(excluded_urls=UNTRACED_PATHS)
    return True
