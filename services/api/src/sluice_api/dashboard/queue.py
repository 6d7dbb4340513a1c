"""The queue page: the stats endpoint's numbers, live, and the last hour's throughput and depth."""

from __future__ import annotations

from typing import Any

import falcon

from sluice_api.dashboard import views
from sluice_api.dashboard.web import Page
from sluice_api.resources.queue import queue_stats_body
from sluice_common.runs import queue_history

HISTORY_MINUTES = 60


class QueuePage(Page):
    """``GET /queue``: the numbers of ``GET /api/workflows/queue/stats`` and two charts; ``/queue/live``
    is the same body alone, polled every 2 s."""

    nav = "queue"
    template = "queue.html"

    def context(self) -> dict[str, Any]:
        history = queue_history(self._deps.pool, HISTORY_MINUTES)
        return {
            "body": queue_stats_body(*self._dash.stats.get()),
            "throughput": views.chart(history, ["succeeded", "failed", "cancelled"]),
            "depth": views.chart(history, ["depth"]),
            "minutes": HISTORY_MINUTES,
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.render(req, resp, self.template, **self.context())


class QueueLivePage(QueuePage):
    template = "queue_body.html"
