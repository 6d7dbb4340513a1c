"""This API process's queue stats: computed by one thread at a time, at most once a second.

The stats endpoint (public: a flood of reads must cost one computation a second), the dashboard's
queue page and the ``/metrics`` queue gauges all read the same :class:`QueueStatsCache`, built once
per app by ``create_app``: one computation serves all three, and they never disagree.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sluice_api.deps import Dependencies
from sluice_common.errors import InfrastructureError
from sluice_common.runs import QueueStats, get_queue_stats

CACHE_SECONDS = 1.0


def scheduler_status(deps: Dependencies) -> dict[str, Any]:
    """What the scheduler says of itself (through Redis), or that there is none to ask."""
    if deps.scheduler is None:
        return {"initialized": False, "scheduledWorkflows": 0}
    try:
        return dict(deps.scheduler.status())
    except Exception:
        return {"initialized": False, "scheduledWorkflows": 0}


class QueueStatsCache:
    """The queue stats and the scheduler's status, as of at most ``seconds`` ago.

    A reader that finds them stale computes them; the readers that arrive meanwhile wait for that
    result rather than each querying at once. A computation stuck on the database (an outage)
    holds the others for at most ``wait_seconds`` (the pool timeout), then they get an
    :class:`InfrastructureError` (a 503) instead of queueing one behind another.
    """

    def __init__(
        self,
        compute: Callable[[], tuple[QueueStats, dict[str, Any]]],
        *,
        wait_seconds: float,
        seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._wait = wait_seconds
        self._seconds = seconds
        self._clock = clock
        self._cached: tuple[float, QueueStats, dict[str, Any]] | None = None
        self._computing = threading.Lock()

    @classmethod
    def of(cls, deps: Dependencies) -> QueueStatsCache:
        def compute() -> tuple[QueueStats, dict[str, Any]]:
            stats = get_queue_stats(deps.pool, deps.settings, deps.limiter, redis=deps.redis is not None)
            return stats, scheduler_status(deps)

        return cls(compute, wait_seconds=deps.settings.db_pool_timeout_seconds)

    def get(self) -> tuple[QueueStats, dict[str, Any]]:
        """The stats and the scheduler's status."""
        cached = self._fresh()
        if cached is not None:
            return cached
        if not self._computing.acquire(timeout=self._wait):
            raise InfrastructureError("the queue stats are not available: PostgreSQL does not answer")
        try:
            cached = self._fresh()
            if cached is None:
                stats, scheduler = self._compute()
                self._cached = (self._clock() + self._seconds, stats, scheduler)
                cached = (stats, scheduler)
            return cached
        finally:
            self._computing.release()

    def stats(self) -> QueueStats:
        return self.get()[0]

    def _fresh(self) -> tuple[QueueStats, dict[str, Any]] | None:
        cached = self._cached
        return (cached[1], cached[2]) if cached is not None and cached[0] > self._clock() else None
