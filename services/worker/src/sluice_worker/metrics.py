"""The worker's metrics: its thread gauges (a Dramatiq middleware) and its ``/metrics`` listener.

The run metrics (:class:`sluice_common.metrics.RunMetrics`) hear from the executor through the
run-events seam; this module only adds what is the worker's own, and serves the lot on
``SLUICE_METRICS_PORT``.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

from sluice_common.metrics import observe_runs, serve
from sluice_common.settings import Settings


class WorkerThreadMetrics(dramatiq.Middleware):
    """Busy and total worker threads: a thread is busy from a message's start to its end."""

    def __init__(self, registry: CollectorRegistry, threads: int) -> None:
        self.total = Gauge(
            "sluice_worker_threads",
            "Worker threads that run runs (SLUICE_CONCURRENCY per worker process)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.busy = Gauge(
            "sluice_worker_threads_busy",
            "Worker threads handling a wake-up or running a run now",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.total.set(threads)
        # A middleware before this one may skip a message before this one saw it start, and
        # Dramatiq then tells every middleware of the skip: only a thread marked busy is unmarked.
        self._local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._local.busy = True
        self.busy.inc()

    def _done(self) -> None:
        if getattr(self._local, "busy", False):
            self._local.busy = False
            self.busy.dec()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        self._done()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._done()


def start_metrics(settings: Settings, broker: dramatiq.Broker) -> Any:
    """Turn the worker's metrics on (when ``SLUICE_METRICS_PORT`` is set); return the listener or None."""
    if settings.metrics_port is None:
        return None
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    observe_runs(registry, settings)
    broker.add_middleware(WorkerThreadMetrics(registry, settings.concurrency))
    return serve(settings, registry)
