"""The API's metrics: HTTP requests (a Falcon middleware), ``/metrics``, and the queue-depth gauges.

:class:`HttpMetrics` records every request by method, route template (``req.uri_template``, so
one series per route, not per URL) and status, with its latency; the route of a request that
matched none is ``unmatched``. ``/metrics`` is public and not part of the OpenAPI document.

Under gunicorn each worker process writes its values to the multiprocess directory
(:mod:`sluice_api.multiproc`), and each scrape reads them all with a fresh registry, plus the
queue gauges (:class:`~sluice_common.metrics.QueueDepthCollector`, computed from PostgreSQL, the
stats endpoint's numbers). Without a multiprocess directory (standalone mode, tests), the app's
own registry is served.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from sluice_api import multiproc
from sluice_api.deps import Dependencies
from sluice_common.metrics import QueueDepthCollector, expired_leases
from sluice_common.runs import QueueStats, get_queue_stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class HttpMetrics:
    """Falcon middleware: requests by method, route template and status, their latency, in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sluice_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ("method", "route", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "sluice_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "sluice_http_requests_in_flight",
            "HTTP requests being answered now",
            registry=registry,
            multiprocess_mode="livesum",
        )

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = time.perf_counter()
        self.in_flight.inc()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        started = getattr(req.context, "metrics_started", None)
        if started is None:  # the request never reached process_request
            return
        self.in_flight.dec()
        route = req.uri_template or "unmatched"
        self.requests.labels(req.method, route, str(resp.status_code)).inc()
        self.latency.labels(req.method, route).observe(time.perf_counter() - started)


class MetricsResource:
    """``GET /metrics`` in the Prometheus text format (no token: counts only, no user data)."""

    public = True
    # Prometheus may ask for some series only; the filter is the exposition library's own.
    query_params: ClassVar[frozenset[str]] = frozenset({"name[]"})

    def __init__(self, registry: CollectorRegistry, queue: QueueDepthCollector) -> None:
        self._registry = registry
        self._queue = queue

    def scrape_registry(self) -> CollectorRegistry:
        path = multiproc.directory()
        if path is None:
            return self._registry
        # A fresh registry per scrape: the files of every worker, read now, and the queue.
        multiproc.mark_dead_workers(path)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        registry.register(self._queue)
        return registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry = self.scrape_registry()
        names = req.get_param_as_list("name[]")
        resp.data = generate_latest(registry.restricted_registry(names) if names else registry)
        resp.content_type = CONTENT_TYPE_LATEST


def queue_collector(deps: Dependencies) -> QueueDepthCollector:
    def stats() -> QueueStats:
        return get_queue_stats(deps.pool, deps.settings, deps.limiter, redis=deps.redis is not None)

    return QueueDepthCollector(stats, lambda: expired_leases(deps.pool))


def install(app: falcon.App[falcon.Request, falcon.Response], deps: Dependencies, registry: CollectorRegistry) -> None:
    """Serve ``/metrics`` of ``registry`` (or of every worker, in multiprocess mode) on ``app``."""
    queue = queue_collector(deps)
    if multiproc.directory() is None:
        registry.register(queue)
    app.add_route("/metrics", MetricsResource(registry, queue))
