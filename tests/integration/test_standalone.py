"""Standalone mode: PostgreSQL only, with the same priority, delays, retries and rate limit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sluice_api.resources.queue import queue_stats_body
from sluice_common.broker import make_broker
from sluice_common.runs import NewRun, enqueue_run, get_queue_stats
from sluice_standalone.app import Standalone, create_standalone
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline

NOOP = [{"id": "a", "type": "transform", "config": {"value": 1}}]
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def standalone(pipeline: Pipeline) -> Iterator[Callable[..., Standalone]]:
    made: list[Standalone] = []

    def make(**overrides: Any) -> Standalone:
        settings = pipeline.settings.model_copy(update={"redis_url": None, **overrides})
        app = create_standalone(settings, pipeline.pool)
        made.append(app)
        return app

    yield make
    for app in made:
        if not app.stopping.is_set():
            app.stop()


def enqueue(pipeline: Pipeline, app: Standalone, wf: str, owner: str, **options: Any) -> Any:
    return enqueue_run(app.pool, app.broker, app.settings, NewRun(wf, owner, **options)).run_id


def test_priority_delay_and_retry_without_redis(
    pipeline: Pipeline, standalone: Callable[..., Standalone], http_server: LocalServer
) -> None:
    app = standalone(concurrency=1)
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    low = [enqueue(pipeline, app, wf, owner, priority=10) for _ in range(20)]
    urgent = enqueue(pipeline, app, wf, owner, priority=1)
    later = enqueue(pipeline, app, wf, owner, delay_ms=1200)
    flaky = pipeline.workflow(
        owner, [{"id": "f", "type": "http", "config": {"url": f"{http_server.base}/flaky?key=sa&fail=2"}}]
    )
    retried = enqueue(pipeline, app, flaky, owner, priority=1)
    app.start()
    rows = pipeline.wait_for([*low, urgent, later, retried], TERMINAL, timeout=30)
    assert all(r["status"] == "succeeded" for r in rows)
    by_id = {r["id"]: r for r in rows}
    first = min(rows, key=lambda r: r["started_at"])
    assert first["id"] in (urgent, retried)
    assert by_id[urgent]["started_at"] < min(by_id[r]["started_at"] for r in low)
    assert (by_id[later]["started_at"] - by_id[later]["queued_at"]).total_seconds() >= 1.2
    assert by_id[retried]["attempt"] == 3


def test_rate_limit_and_stats_without_redis(pipeline: Pipeline, standalone: Callable[..., Standalone]) -> None:
    app = standalone(rate_limit_per_minute=2)
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    runs = [enqueue(pipeline, app, wf, owner) for _ in range(4)]
    app.start()
    time.sleep(2)
    statuses = sorted(pipeline.run(r)["status"] for r in runs)
    assert statuses == ["queued", "queued", "succeeded", "succeeded"]
    stats = get_queue_stats(app.pool, app.settings, app.limiter, redis=False)
    assert (stats.waiting, stats.completed, stats.rate_used, stats.rate_limit_per_minute) == (2, 2, 2, 2)
    body = queue_stats_body(stats, {"initialized": True, "scheduledWorkflows": 0})
    assert body["queue"]["redis"] is False
    assert body["capacity"] == {"recommendation": "Set REDIS_URL to enable queued execution"}


def test_runs_left_queued_are_resumed_at_the_next_start(
    pipeline: Pipeline, standalone: Callable[..., Standalone]
) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    # A previous process accepted these and stopped before running them: its broker is gone.
    gone = make_broker(pipeline.settings, None)
    runs = [enqueue_run(pipeline.pool, gone, pipeline.settings, NewRun(wf, owner)).run_id for _ in range(3)]
    runs.append(enqueue_run(pipeline.pool, gone, pipeline.settings, NewRun(wf, owner, delay_ms=800)).run_id)
    gone.close()
    app = standalone()
    app.start()
    rows = pipeline.wait_for(runs, TERMINAL, timeout=20)
    assert all(r["status"] == "succeeded" and r["attempt"] == 1 for r in rows)
