"""The queue page: the stats endpoint's numbers, live, and the last hour's throughput and depth."""

from __future__ import annotations

from typing import Any

import falcon

from sluice_api.dashboard import views
from sluice_api.dashboard.web import Page
from sluice_api.resources.queue import queue_stats_body, scheduler_status
from sluice_common.runs import get_queue_stats, queue_history

HISTORY_MINUTES = 60


class QueuePage(Page):
    """``GET /queue``: the numbers of ``GET /api/workflows/queue/stats`` and two charts; ``/queue/live``
    is the same body alone, polled every 2 s."""

    nav = "queue"
    template = "queue.html"

    def context(self) -> dict[str, Any]:
        deps = self._deps
        stats = get_queue_stats(deps.pool, deps.settings, deps.limiter, redis=deps.redis is not None)
        history = queue_history(deps.pool, HISTORY_MINUTES)
        return {
            "body": queue_stats_body(stats, scheduler_status(deps)),
            "throughput": views.chart(history, ["succeeded", "failed", "cancelled"]),
            "depth": views.chart(history, ["depth"]),
            "minutes": HISTORY_MINUTES,
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.render(req, resp, self.template, **self.context())


class QueueLivePage(QueuePage):
    template = "queue_body.html"
