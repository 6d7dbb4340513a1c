"""The scheduler's metrics (an observer of :mod:`sluice_scheduler.hooks`) and its ``/metrics`` listener."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from sluice_common.metrics import observe_runs, serve
from sluice_common.settings import Settings
from sluice_scheduler.hooks import SchedulerEvents

# Seconds a slot fired after its scheduled time: normally milliseconds, up to the late tolerance.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RUN_OUTCOMES = ("fired", "catch_up")


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "sluice_scheduler_leader",
            "1 while this scheduler replica leads (fires cron slots, runs maintenance)",
            registry=registry,
            multiprocess_mode="max",
        )
        self.fires = Counter(
            "sluice_scheduler_fires",
            "Cron slots handled, by outcome (fired, catch_up, missed, skipped_overlap, deferred, duplicate, stale)",
            ("outcome",),
            registry=registry,
        )
        self.missed = Counter(
            "sluice_scheduler_missed_fires",
            "Cron slots that did not fire on time because no scheduler was running",
            registry=registry,
        )
        self.lateness = Histogram(
            "sluice_scheduler_fire_lateness_seconds",
            "Time from a cron slot's scheduled time to its run being created",
            buckets=LATENESS_BUCKETS,
            registry=registry,
        )
        self.leader.set(0)

    def leadership(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)

    def slot_handled(self, workflow_id: str, outcome: str, lateness_seconds: float) -> None:
        self.fires.labels(outcome).inc()
        if outcome in _RUN_OUTCOMES:
            self.lateness.observe(max(0.0, lateness_seconds))

    def slots_missed(self, workflow_id: str, count: int) -> None:
        self.missed.inc(count)


def start_metrics(settings: Settings, events: SchedulerEvents) -> Any:
    """Turn the scheduler's metrics on (when ``SLUICE_METRICS_PORT`` is set); return the listener or None."""
    if settings.metrics_port is None:
        return None
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    observe_runs(registry, settings)  # cron runs created
    events.add(SchedulerMetrics(registry))
    return serve(settings, registry)
