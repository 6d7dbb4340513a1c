"""The web dashboard, served by the API process at ``/``: server-rendered pages with htmx.

``install`` mounts the pages of :mod:`sluice_api.dashboard.routes`, the static files (htmx,
vendored at a pinned version under ``static/vendor``, and the dashboard's own CSS and script) and
the HTML error pages. Sign-in turns an API token into a server-side session (``sessions``); the
pages call the same queries and commands as the JSON API (``sluice_api.queries``,
``sluice_api.commands``, ``sluice_common``), so both always apply the same rules. Live parts poll
every 2 s (htmx ``hx-trigger="every 2s"``): no connection is held per viewer.
"""

from __future__ import annotations

import falcon

from sluice_api.dashboard.routes import PAGES
from sluice_api.dashboard.web import (
    Dashboard,
    SessionMiddleware,
    install_error_pages,
    static_directory,
    template_environment,
)
from sluice_api.deps import Dependencies
from sluice_api.stats import QueueStatsCache

__all__ = ["SessionMiddleware", "install"]


def install(app: falcon.App[falcon.Request, falcon.Response], deps: Dependencies, stats: QueueStatsCache) -> None:
    """Mount the pages, ``/static`` and the error pages (after ``problems.install``: they take over
    from its handlers on dashboard paths only)."""
    templates = template_environment()
    dashboard = Dashboard(deps, templates, stats)
    for route in PAGES:
        app.add_route(route.template, route.page(dashboard))
    app.add_static_route("/static", static_directory())
    install_error_pages(app, templates)
