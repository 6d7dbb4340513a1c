"""Prometheus metrics shared by the services: the run metrics, the queue-depth collector, the listener.

- :class:`RunMetrics` is a :class:`~sluice_common.observe.RunObserver`: runs created, started,
  succeeded, failed, retried, cancelled (by trigger type), queue wait, run and step durations,
  wake-ups held back by the rate limit. Every service that creates or executes runs adds one to
  :data:`~sluice_common.observe.run_events` at start-up (:func:`observe_runs`).
- :class:`QueueDepthCollector` computes the queue's gauges at scrape time from PostgreSQL (the
  numbers of :func:`~sluice_common.runs.get_queue_stats`, the stats endpoint's), cached for a
  second so that several scrapers cost one query.
- :func:`serve` is the small HTTP listener of the worker and the scheduler (``SLUICE_METRICS_PORT``).

Metrics are made on the registry given (a test's own, or the process's); gauges name their
multiprocess mode, which the API's gunicorn workers need (``sluice_api.multiproc``).
Every name starts with ``sluice_``; README.md has the table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice_common.db import Pool
from sluice_common.observe import (
    BaseRunObserver,
    RunCancelled,
    RunCreated,
    RunEnded,
    RunEvents,
    RunStarted,
    StepEnded,
    run_events,
)
from sluice_common.runs import QueueStats
from sluice_common.settings import Settings

log = logging.getLogger(__name__)

# Seconds: a run waits from milliseconds (an idle pool) to minutes (a backlog, the rate limit).
QUEUE_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Runs and steps: from a transform (milliseconds) to a long HTTP call or a whole workflow.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# What an execution's end counts as, by outcome (the others only feed the duration histogram).
_ENDED_COUNTERS = {"succeeded": "succeeded", "failed": "failed", "retried": "retried", "cancelled": "cancelled"}


class RunMetrics(BaseRunObserver):
    """The run counters and histograms, on ``registry``.

    ``workflow_labels`` adds a ``workflow`` label (the workflow id) to the run metrics: one
    series per workflow, so it is off unless an operator turns it on
    (``SLUICE_METRICS_WORKFLOW_LABELS``).
    """

    def __init__(self, registry: CollectorRegistry, *, workflow_labels: bool = False) -> None:
        self.workflow_labels = workflow_labels
        labels = ("trigger", "workflow") if workflow_labels else ("trigger",)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.created = counter("sluice_runs_created", "Runs created (queued or delayed), by trigger type")
        self.started = counter("sluice_runs_started", "Executions started (a worker claimed the run), by trigger type")
        self.ended = {
            "succeeded": counter("sluice_runs_succeeded", "Runs that succeeded, by trigger type"),
            "failed": counter("sluice_runs_failed", "Runs that failed for good (no attempt left), by trigger type"),
            "retried": counter("sluice_runs_retried", "Failed attempts with another attempt to come, by trigger type"),
            "cancelled": counter("sluice_runs_cancelled", "Runs that ended as cancelled, by trigger type"),
        }
        self.queue_wait = Histogram(
            "sluice_run_queue_wait_seconds",
            "Time from a run becoming ready (queued, due, woken) to a worker claiming it",
            labels,
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "sluice_run_duration_seconds",
            "Duration of an execution of a run, from its claim to its end, by trigger type and outcome",
            (*labels, "outcome"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.step_duration = Histogram(
            "sluice_step_duration_seconds",
            "Duration of a step, by step type and status (succeeded, failed, parked)",
            ("type", "status"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.rate_limited_wakeups = Counter(
            "sluice_rate_limited_wakeups",
            "Wake-ups held back because the global run-start rate limit was used up",
            registry=registry,
        )

    def label_values(self, trigger: str, workflow: str) -> tuple[str, ...]:
        """The run metrics' label values for a run of ``trigger`` type and ``workflow``."""
        return (trigger, workflow) if self.workflow_labels else (trigger,)

    def run_created(self, event: RunCreated) -> None:
        self.created.labels(*self.label_values(event.trigger_type, event.workflow_id)).inc()

    def run_started(self, event: RunStarted) -> None:
        labels = self.label_values(event.trigger_type, event.workflow_id)
        self.started.labels(*labels).inc()
        if event.queue_wait_seconds is not None:
            self.queue_wait.labels(*labels).observe(max(0.0, event.queue_wait_seconds))

    def step_ended(self, event: StepEnded) -> None:
        self.step_duration.labels(event.step_type, event.status).observe(max(0.0, event.duration_seconds))

    def run_ended(self, event: RunEnded) -> None:
        labels = self.label_values(event.trigger_type, event.workflow_id)
        counter = self.ended.get(_ENDED_COUNTERS.get(event.outcome, ""))
        if counter is not None:
            counter.labels(*labels).inc()
        self.duration.labels(*labels, event.outcome).observe(max(0.0, event.duration_seconds))

    def run_cancelled(self, event: RunCancelled) -> None:
        self.ended["cancelled"].labels(*self.label_values(event.trigger_type, event.workflow_id)).inc()

    def rate_limited(self, wait_ms: int) -> None:
        self.rate_limited_wakeups.inc()


def observe_runs(registry: CollectorRegistry, settings: Settings, events: RunEvents | None = None) -> RunMetrics:
    """Create the run metrics on ``registry`` and add them to ``events`` (the process's by default)."""
    metrics = RunMetrics(registry, workflow_labels=settings.metrics_workflow_labels)
    (events or run_events).add(metrics)
    return metrics


# Running runs whose lease lapsed: recovery normally takes them within a housekeeping pass, so a
# count that stays above zero means nothing is recovering them (no worker, no scheduler leader).
EXPIRED_LEASES_SQL = "SELECT count(*) AS n FROM runs WHERE status = 'running' AND lease_expires_at < now()"


def expired_leases(pool: Pool) -> int:
    with pool.connection() as conn:
        row = conn.execute(EXPIRED_LEASES_SQL).fetchone()
    return int(row["n"]) if row is not None else 0


class QueueDepthCollector(Collector):
    """Exact queue gauges computed at scrape time (at most one query per ``cache_seconds``).

    ``stats`` is what the stats endpoint computes (``get_queue_stats`` bound to the process's pool
    and limiter); ``expired`` counts running runs past their lease. When PostgreSQL does not
    answer, the scrape still succeeds with ``sluice_queue_stats_up`` 0 and no queue gauges.
    """

    def __init__(
        self,
        stats: Callable[[], QueueStats],
        expired: Callable[[], int] | None = None,
        *,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stats = stats
        self._expired = expired
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def describe(self) -> Iterable[Metric]:
        # Registering must not query the database; an empty description says "collect to know".
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:  # concurrent scrapes wait for one query instead of each making their own
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= self._cache_seconds:
                self._cached = (now, list(self._compute()))
            return list(self._cached[1])

    def _compute(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("sluice_queue_stats_up", "1 when the last scrape could read the queue from PostgreSQL")
        try:
            stats = self._stats()
            expired = self._expired() if self._expired is not None else None
        except Exception as exc:
            log.warning("queue metrics: cannot read the queue (%s: %s)", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        gauges = (
            ("sluice_queue_waiting", "Runs ready to start and waiting for a worker (queued, or delayed and due)"),
            ("sluice_queue_active", "Runs executing now"),
            ("sluice_queue_delayed", "Runs delayed until a later time (a delay, a retry backoff)"),
            ("sluice_queue_waiting_subworkflows", "Runs parked until a sub-workflow run ends"),
            ("sluice_queue_completed_24h", "Runs that succeeded in the last 24 hours"),
            ("sluice_queue_failed_7d", "Runs that failed in the last 7 days"),
            ("sluice_rate_limit_per_minute", "The global run-start rate limit (starts per minute)"),
            ("sluice_rate_limit_used", "Run starts in the last 60 seconds (the rate limit's window)"),
        )
        values = (
            stats.waiting,
            stats.active,
            stats.delayed,
            int(stats.extra.get("waitingOnSubWorkflows", 0)),
            stats.completed,
            stats.failed,
            stats.rate_limit_per_minute,
            stats.rate_used,
        )
        for (name, doc), value in zip(gauges, values, strict=True):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        by_priority = GaugeMetricFamily(
            "sluice_queue_waiting_by_priority", "Waiting runs by priority (1 is the most urgent)", labels=["priority"]
        )
        for priority in range(1, 11):
            by_priority.add_metric([str(priority)], stats.waiting_by_priority.get(priority, 0))
        yield by_priority
        if expired is not None:
            gauge = GaugeMetricFamily(
                "sluice_runs_lease_expired", "Running runs whose worker's lease has lapsed (not yet recovered)"
            )
            gauge.add_metric([], expired)
            yield gauge


def serve(settings: Settings, registry: CollectorRegistry, *, port: int | None = None) -> Any:
    """Serve ``/metrics`` of ``registry`` on ``SLUICE_METRICS_HOST:SLUICE_METRICS_PORT`` in a daemon thread.

    Returns the server (``shutdown()`` stops it), or None when no port is set.
    """
    port = settings.metrics_port if port is None else port
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=settings.metrics_host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.server_port)
    return server
