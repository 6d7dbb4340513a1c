"""The API app factory. ``create_app`` takes its dependencies; ``get_app`` builds them for gunicorn.

Nothing here opens a pool or a connection at import time: gunicorn calls ``get_app`` in each
worker process after the fork.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass

import falcon
import redis

from sluice_api import problems
from sluice_common.db import Pool, open_pool
from sluice_common.runtime import resolve_endpoints
from sluice_common.settings import Settings, load_settings


@dataclass(frozen=True)
class Dependencies:
    settings: Settings
    pool: Pool
    redis: redis.Redis | None  # None in standalone mode


class HealthResource:
    """Liveness: the process answers."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    """Readiness: PostgreSQL and Redis both answer, else 503."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks: dict[str, str] = {}
        try:
            with self._deps.pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        if self._deps.redis is None:
            checks["redis"] = "not used (standalone)"
        else:
            try:
                self._deps.redis.ping()
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = f"error: {type(exc).__name__}"
        ready = not any(v.startswith("error") for v in checks.values())
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"status": "ready" if ready else "unavailable", "checks": checks}


def create_app(deps: Dependencies) -> falcon.App[falcon.Request, falcon.Response]:
    app = falcon.App()
    app.req_options.strip_url_path_trailing_slash = True
    problems.install(app)
    app.add_route("/api/health", HealthResource())
    app.add_route("/api/ready", ReadyResource(deps))
    return app


def get_app() -> falcon.App[falcon.Request, falcon.Response]:
    """Build the app and its dependencies from the environment (one call per gunicorn worker)."""
    settings = load_settings()
    endpoints = resolve_endpoints(settings)
    pool = open_pool(settings, endpoints.database_url, name="api")
    client = redis.Redis.from_url(endpoints.redis_url, socket_timeout=5, socket_connect_timeout=5)
    atexit.register(pool.close)
    atexit.register(client.close)
    atexit.register(endpoints.close)
    return create_app(Dependencies(settings, pool, client))
