"""The queue stats are computed once per cache period per process, however many threads ask at once."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from sluice_api.resources import queue
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
    deps = SimpleNamespace(pool=None, settings=None, limiter=None, redis=object(), scheduler=None)
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
