"""The API's metrics: HTTP requests (a Falcon middleware), ``/metrics``, and the queue-depth gauges.

:class:`HttpMetrics` records every request by method, route template (``req.uri_template``, so
one series per route, not per URL) and status, with its latency; the route of a request that
matched none is ``unmatched``. ``/metrics`` is public and not part of the OpenAPI document.

Under gunicorn each worker process writes its values to the multiprocess directory
(:mod:`sluice_api.multiproc`), and each scrape reads them all with a fresh registry, plus the
queue gauges (:class:`~sluice_common.metrics.QueueDepthCollector`, computed from PostgreSQL, the
stats endpoint's numbers). Without a multiprocess directory (standalone mode, tests), the app's
own registry is served.

What a request costs: the HTTP figures and, in a gunicorn worker, the runs it creates
(:class:`RunsCreatedTally`) are tallied in memory and reach the metrics at a flush (at collect
time, or from the worker's :class:`~sluice_api.multiproc.Flusher`), instead of a file write per
value per request.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from sluice_api import multiproc
from sluice_api.deps import Dependencies
from sluice_api.stats import QueueStatsCache
from sluice_common.metrics import QueueDepthCollector, RunMetrics, expired_leases
from sluice_common.observe import RunCreated

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BOUNDS = (*(float(b) for b in LATENCY_BUCKETS), math.inf)  # a histogram's buckets end with +Inf


class HttpMetrics(Collector):
    """Falcon middleware: requests by method, route template and status, their latency, in flight.

    A request adds to this process's tally in memory (a few dict updates under one lock); the
    tally reaches the Prometheus metrics at a :meth:`flush`. The registry given flushes at every
    collect, so a single-process registry (standalone mode, tests) is always exact. Under
    gunicorn's multiprocess mode, where each metric update is a write to an mmap'd file under a
    process-wide lock, the worker's :class:`~sluice_api.multiproc.Flusher` calls it: every
    second, before every scrape and at exit.
    """

    def __init__(self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.perf_counter) -> None:
        # Not registered themselves: this collector flushes, then hands them over.
        self.requests = Counter(
            "sluice_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ("method", "route", "status"),
            registry=None,
        )
        self.latency = Histogram(
            "sluice_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.in_flight = Gauge(
            "sluice_http_requests_in_flight",
            "HTTP requests being answered now",
            registry=None,
            multiprocess_mode="livesum",
        )
        self._clock = clock
        self._lock = threading.Lock()  # the tally's
        self._flush_lock = threading.Lock()  # one flush at a time: a collect never sees half of one
        self._in_flight = 0
        self._answered: dict[tuple[str, str, int], int] = {}  # (method, route, status) -> requests
        # (method, route) -> observations per bucket (the +Inf one last), then their sum
        self._latencies: dict[tuple[str, str], list[float]] = {}
        registry.register(self)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = self._clock()
        with self._lock:
            self._in_flight += 1

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        started = getattr(req.context, "metrics_started", None)
        if started is None:  # the request never reached process_request
            return
        seconds = self._clock() - started
        method, route, status = req.method, req.uri_template or "unmatched", resp.status_code
        bucket = bisect.bisect_left(_BOUNDS, seconds)  # the first bucket whose bound is >= seconds
        with self._lock:
            self._in_flight -= 1
            key = (method, route, status)
            self._answered[key] = self._answered.get(key, 0) + 1
            tally = self._latencies.get((method, route))
            if tally is None:
                tally = self._latencies[method, route] = [0.0] * (len(_BOUNDS) + 1)
            tally[bucket] += 1
            tally[-1] += seconds

    def flush(self) -> None:
        """Add the tally to the Prometheus metrics (in multiprocess mode: this process's files)."""
        with self._flush_lock:
            with self._lock:
                answered, self._answered = self._answered, {}
                latencies, self._latencies = self._latencies, {}
                in_flight = self._in_flight
            for (method, route, status), n in answered.items():
                self.requests.labels(method, route, str(status)).inc(n)
            for (method, route), tally in latencies.items():
                _add_observations(self.latency.labels(method, route), tally)
            self.in_flight.set(in_flight)

    def describe(self) -> Iterable[Metric]:
        return [*self.requests.describe(), *self.latency.describe(), *self.in_flight.describe()]

    def collect(self) -> Iterable[Metric]:
        self.flush()
        return [*self.requests.collect(), *self.latency.collect(), *self.in_flight.collect()]


class RunsCreatedTally(RunMetrics):
    """The run metrics of a gunicorn worker: runs created (one per run request) tallied in memory
    like the HTTP figures, added to ``created`` at a :meth:`flush`; the other events (the API
    tells only cancels) are counted as they come, as :class:`RunMetrics` does."""

    def __init__(self, registry: CollectorRegistry, *, workflow_labels: bool = False) -> None:
        super().__init__(registry, workflow_labels=workflow_labels)
        self._lock = threading.Lock()
        self._created: dict[tuple[str, ...], int] = {}

    def run_created(self, event: RunCreated) -> None:
        labels = self.label_values(event.trigger_type, event.workflow_id)
        with self._lock:
            self._created[labels] = self._created.get(labels, 0) + 1

    def flush(self) -> None:
        with self._lock:
            created, self._created = self._created, {}
        for labels, n in created.items():
            self.created.labels(*labels).inc(n)


def _add_observations(histogram: Histogram, tally: list[float]) -> None:
    """Add a tally's observations to a labelled histogram, as one ``observe`` per observation would.

    ``observe(x)`` adds 1 to the value of the first bucket whose bound is >= x (buckets are stored
    per bucket, the exposition accumulates them) and x to the sum; the library has no call that adds
    many at once, so this adds to the same values (``_buckets``, ``_sum``) in bulk. The unit tests
    compare it with ``observe``, so a change in the library's internals fails them.
    """
    for value, count in zip(histogram._buckets, tally[:-1], strict=True):
        if count:
            value.inc(count)
    histogram._sum.inc(tally[-1])


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
        multiproc.request_flush(path)  # every worker's tallies into its files first
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        registry.register(self._queue)
        return registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry = self.scrape_registry()
        names = req.get_param_as_list("name[]")
        resp.data = generate_latest(registry.restricted_registry(names) if names else registry)
        resp.content_type = CONTENT_TYPE_LATEST


def install(
    app: falcon.App[falcon.Request, falcon.Response],
    deps: Dependencies,
    registry: CollectorRegistry,
    stats: QueueStatsCache,
) -> None:
    """Serve ``/metrics`` of ``registry`` (or of every worker, in multiprocess mode) on ``app``; the
    queue gauges are the numbers of ``stats``, the stats endpoint's."""
    queue = QueueDepthCollector(stats.stats, lambda: expired_leases(deps.pool))
    if multiproc.directory() is None:
        registry.register(queue)
    app.add_route("/metrics", MetricsResource(registry, queue))
