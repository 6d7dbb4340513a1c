"""The queue as a whole: its statistics (the seeds' shape) and the scheduler's manual refresh."""

from __future__ import annotations

from typing import Any, ClassVar

import falcon
import redis

from sluice_api import schemas
from sluice_api.openapi import AUTH, Operations, errors, ref, response
from sluice_api.resources.base import Context, Resource
from sluice_common.errors import InfrastructureError
from sluice_common.runs import QueueStats


def queue_stats_body(stats: QueueStats, scheduler: dict[str, Any]) -> dict[str, Any]:
    """The ``/api/workflows/queue/stats`` body: the seeds' shape, plus Sluice's extra fields."""
    queue: dict[str, Any] = {
        "available": True,
        "redis": stats.redis,
        "stats": {
            "waiting": stats.waiting,
            "active": stats.active,
            "completed": stats.completed,
            "failed": stats.failed,
            "delayed": stats.delayed,
            "total": stats.total,
        },
        "waitingByPriority": {str(k): v for k, v in sorted(stats.waiting_by_priority.items())},
        "rateLimit": {"perMinute": stats.rate_limit_per_minute, "usedLastMinute": stats.rate_used},
        "concurrency": stats.concurrency,
        # Runs parked until a sub-workflow ends: they hold no worker and are not waiting for one.
        "waitingOnSubWorkflows": int(stats.extra.get("waitingOnSubWorkflows", 0)),
    }
    capacity: dict[str, Any]
    if stats.redis:
        capacity = {
            "message": f"Running up to {stats.concurrency} workflows concurrently. "
            f"{stats.active} active, {stats.waiting} queued."
        }
    else:
        # The seeds' wording; Sluice still queues, retries and limits without Redis.
        capacity = {"recommendation": "Set REDIS_URL to enable queued execution"}
    alerts = []
    if stats.waiting > 50:
        alerts.append("Queue backlog growing - consider scaling")
    finished = stats.completed + stats.failed
    if finished and stats.failed / finished > 0.1:
        alerts.append("High failure rate detected")
    return {"queue": queue, "scheduler": scheduler, "capacity": capacity, "alerts": alerts}


class QueueStatsResource(Resource):
    """The seeds' queue stats: aggregate counts only, so readable without a token."""

    public = True  # aggregate counts; a flood of reads costs one computation a second (QueueStatsCache)
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "queueStats",
            "summary": "Queue statistics in the seeds' shape (aggregate counts; no token needed)",
            "responses": {"200": response(ref(schemas.QueueStatsBody), "Statistics"), **errors(503)},
        },
    }

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._stats = ctx.stats

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = queue_stats_body(*self._stats.get())


class SchedulerRefreshResource(Resource):
    """The seeds' manual refresh; changes made through the API reach the scheduler on their own."""

    operations: ClassVar[Operations] = {
        "post": {
            "operationId": "refreshScheduler",
            "summary": "Ask the scheduler to reload every cron trigger",
            "responses": {
                "202": response({"type": "object"}, "Requested"),
                **errors(*AUTH, 503),
            },
        },
    }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._deps.scheduler is None:
            raise InfrastructureError("no scheduler is connected")
        try:
            self._deps.scheduler.refresh()
        except redis.RedisError:
            raise InfrastructureError("Redis is unavailable; the scheduler reloads on its own every 30 s") from None
        resp.status = falcon.HTTP_202
        resp.media = {"success": True, "message": "Scheduler refresh requested"}
