"""Metrics against the real pipeline: the executor's events counted, the queue gauges from PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from sluice_common.errors import ConflictError
from sluice_common.metrics import QueueDepthCollector, RunMetrics, expired_leases
from sluice_common.observe import RunEvents, run_events
from sluice_common.runs import QueueStats, cancel_run, get_queue_stats
from sluice_worker.executor import RunExecutor
from tests.integration.conftest import Pipeline

pytestmark = pytest.mark.integration

NOOP = [{"id": "a", "type": "transform", "config": {"value": {"ok": True}}}]
FAIL = [
    {"id": "a", "type": "transform", "config": {"value": 1}},
    {"id": "guard", "type": "fail", "config": {"message": "no input"}},
]


def test_the_executor_tells_its_observers_each_claim_step_and_end(pipeline: Pipeline) -> None:
    registry = CollectorRegistry()
    events = RunEvents()
    events.add(RunMetrics(registry))
    owner = pipeline.user()
    ok = pipeline.enqueue(pipeline.workflow(owner, NOOP), owner).run_id
    bad = pipeline.enqueue(pipeline.workflow(owner, FAIL), owner).run_id
    executor = RunExecutor(
        pipeline.settings,
        pipeline.pool,
        pipeline.broker,
        pipeline.limiter,
        httpx.Client(),
        "metrics-test",
        threading.Event(),
        events,
    )
    executor.handle(str(ok))
    executor.handle(str(bad))
    assert {pipeline.run(ok)["status"], pipeline.run(bad)["status"]} == {"succeeded", "failed"}

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("sluice_runs_started_total", trigger="manual") == 2
    assert value("sluice_runs_succeeded_total", trigger="manual") == 1
    assert value("sluice_runs_failed_total", trigger="manual") == 1
    assert value("sluice_run_duration_seconds_count", trigger="manual", outcome="succeeded") == 1
    assert value("sluice_run_duration_seconds_count", trigger="manual", outcome="failed") == 1
    assert value("sluice_step_duration_seconds_count", type="transform", status="succeeded") == 2
    assert value("sluice_step_duration_seconds_count", type="fail", status="failed") == 1
    # Queued a moment ago at the default priority: waited from zero to a few seconds, not its aging.
    assert value("sluice_run_queue_wait_seconds_count", trigger="manual") == 2
    waited = value("sluice_run_queue_wait_seconds_sum", trigger="manual")
    assert waited is not None
    assert 0 <= waited < 30


@pytest.fixture
def counted() -> Iterator[CollectorRegistry]:
    """Run metrics on a registry of their own, observing the process's run events during the test."""
    registry = CollectorRegistry()
    metrics = RunMetrics(registry)
    run_events.add(metrics)
    try:
        yield registry
    finally:
        run_events.remove(metrics)


def test_runs_created_are_counted_after_commit(pipeline: Pipeline, counted: CollectorRegistry) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    pipeline.enqueue(wf, owner, idempotency_key="k")
    pipeline.enqueue(wf, owner, idempotency_key="k")  # the same run: not created again
    pipeline.enqueue(wf, owner, delay_ms=60_000)
    assert counted.get_sample_value("sluice_runs_created_total", {"trigger": "manual"}) == 2


def test_runs_cancelled_without_a_worker_are_counted_once_committed(
    pipeline: Pipeline, counted: CollectorRegistry
) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    queued = pipeline.enqueue(wf, owner).run_id
    delayed = pipeline.enqueue(wf, owner, delay_ms=60_000).run_id
    assert cancel_run(pipeline.pool, queued, owner) == "cancelled"
    assert cancel_run(pipeline.pool, delayed, owner) == "cancelled"
    with pytest.raises(ConflictError):
        cancel_run(pipeline.pool, queued, owner)  # already over: not counted twice
    running = pipeline.enqueue(wf, owner).run_id
    with pipeline.pool.connection() as conn:  # a running run ends at its worker, which counts it
        conn.execute("UPDATE runs SET status = 'running' WHERE id = %s", (running,))
    assert cancel_run(pipeline.pool, running, owner) == "running"
    assert counted.get_sample_value("sluice_runs_cancelled_total", {"trigger": "manual"}) == 2


def test_queue_gauges_are_the_stats_endpoints_numbers(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    for priority in (1, 5, 5):
        pipeline.enqueue(wf, owner, priority=priority)
    pipeline.enqueue(wf, owner, delay_ms=600_000)

    def stats() -> QueueStats:
        return get_queue_stats(pipeline.pool, pipeline.settings, pipeline.limiter, redis=True)

    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(stats, lambda: expired_leases(pipeline.pool)))
    expected = get_queue_stats(pipeline.pool, pipeline.settings, pipeline.limiter, redis=True)
    assert registry.get_sample_value("sluice_queue_waiting") == expected.waiting == 3
    assert registry.get_sample_value("sluice_queue_delayed") == expected.delayed == 1
    assert registry.get_sample_value("sluice_queue_active") == 0
    assert registry.get_sample_value("sluice_queue_waiting_by_priority", {"priority": "1"}) == 1
    assert registry.get_sample_value("sluice_queue_waiting_by_priority", {"priority": "5"}) == 2
    assert registry.get_sample_value("sluice_runs_lease_expired") == 0
    assert registry.get_sample_value("sluice_rate_limit_per_minute") == expected.rate_limit_per_minute
