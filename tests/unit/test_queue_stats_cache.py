"""The queue stats are computed once per cache period per process, however many threads ask at once,
and a computation stuck on the database does not hold the others longer than a pool timeout."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from sluice_api.resources import queue
from sluice_common.errors import InfrastructureError
from sluice_common.runs import QueueStats

STATS = QueueStats(
    waiting=1,
    active=2,
    completed=3,
    failed=4,
    delayed=5,
    waiting_by_priority={5: 1},
    concurrency=10,
    rate_limit_per_minute=100,
    rate_used=0,
    redis=True,
)


def test_threads_that_miss_the_cache_share_one_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def slow_stats(*args: Any, **kwargs: Any) -> QueueStats:
        calls.append(1)
        time.sleep(0.2)  # a query in flight while the other threads arrive
        return STATS

    monkeypatch.setattr(queue, "get_queue_stats", slow_stats)
    settings = SimpleNamespace(db_pool_timeout_seconds=5.0)
    deps = SimpleNamespace(pool=None, settings=settings, limiter=None, redis=object(), scheduler=None)
    resource = queue.QueueStatsResource(SimpleNamespace(deps=deps))  # type: ignore[arg-type]
    bodies: list[Any] = []

    def get() -> None:
        resp = SimpleNamespace(media=None)
        resource.on_get(None, resp)  # type: ignore[arg-type]
        bodies.append(resp.media)

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(bodies) == 8
    assert all(b["queue"]["stats"]["completed"] == 3 for b in bodies)

    resource._cached = (time.monotonic() - 1, bodies[0])  # the period is over: computed again
    get()
    assert len(calls) == 2


def test_a_thread_waits_for_a_stuck_computation_no_longer_than_a_pool_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck_stats(*args: Any, **kwargs: Any) -> QueueStats:
        release.wait(5)
        return STATS

    monkeypatch.setattr(queue, "get_queue_stats", stuck_stats)
    settings = SimpleNamespace(db_pool_timeout_seconds=0.2)
    deps = SimpleNamespace(pool=None, settings=settings, limiter=None, redis=object(), scheduler=None)
    resource = queue.QueueStatsResource(SimpleNamespace(deps=deps))  # type: ignore[arg-type]
    first = threading.Thread(target=resource.on_get, args=(None, SimpleNamespace(media=None)))
    first.start()
    time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(InfrastructureError):
        resource.on_get(None, SimpleNamespace(media=None))  # type: ignore[arg-type]
    assert time.monotonic() - start < 1.0
    release.set()
    first.join()
