"""The queue stats are computed once per cache period per process, however many threads ask at once
(the stats endpoint, the dashboard and the /metrics gauges share them), and a computation stuck on
the database does not hold the others longer than a pool timeout."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from sluice_api import stats as stats_module
from sluice_api.resources import queue
from sluice_api.stats import QueueStatsCache
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


def _deps(pool_timeout: float) -> Any:
    settings = SimpleNamespace(db_pool_timeout_seconds=pool_timeout)
    return SimpleNamespace(pool=None, settings=settings, limiter=None, redis=object(), scheduler=None)


def test_threads_that_miss_the_cache_share_one_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def slow_stats(*args: Any, **kwargs: Any) -> QueueStats:
        calls.append(1)
        time.sleep(0.2)  # a query in flight while the other threads arrive
        return STATS

    monkeypatch.setattr(stats_module, "get_queue_stats", slow_stats)
    now = [100.0]
    cache = QueueStatsCache.of(_deps(5.0))
    cache._clock = lambda: now[0]  # the period ends when the test says so
    resource = queue.QueueStatsResource(SimpleNamespace(deps=_deps(5.0), stats=cache))  # type: ignore[arg-type]
    bodies: list[Any] = []

    def get() -> None:
        resp = SimpleNamespace(media=None)
        resource.on_get(None, resp)  # type: ignore[arg-type]
        bodies.append(resp.media)

    # The endpoint's readers and the /metrics gauges at once: one computation for all of them.
    threads = [threading.Thread(target=get) for _ in range(6)] + [
        threading.Thread(target=lambda: bodies.append(cache.stats())) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(bodies) == 8
    assert sum(b["queue"]["stats"]["completed"] == 3 for b in bodies if isinstance(b, dict)) == 6
    assert [b for b in bodies if isinstance(b, QueueStats)] == [STATS, STATS]

    get()
    assert len(calls) == 1  # still fresh
    now[0] += stats_module.CACHE_SECONDS  # the period is over: computed again
    get()
    assert len(calls) == 2


def test_a_thread_waits_for_a_stuck_computation_no_longer_than_a_pool_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck_stats(*args: Any, **kwargs: Any) -> QueueStats:
        release.wait(5)
        return STATS

    monkeypatch.setattr(stats_module, "get_queue_stats", stuck_stats)
    cache = QueueStatsCache.of(_deps(0.2))
    first = threading.Thread(target=cache.get)
    first.start()
    time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(InfrastructureError):
        cache.get()
    assert time.monotonic() - start < 1.0
    release.set()
    first.join()
    assert cache.stats() == STATS  # the stuck one's result, once it came
