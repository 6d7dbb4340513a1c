"""The API app factory. ``create_app`` takes its dependencies; ``get_app`` builds them for gunicorn.

Nothing here opens a pool or a connection at import time: gunicorn calls ``get_app`` in each
worker process after the fork.
"""

from __future__ import annotations

import atexit
from typing import Any

import falcon
import redis

from sluice_api import problems
from sluice_api.auth import AuthMiddleware, LocalRequestLimiter, RedisRequestLimiter, RequestLimiter
from sluice_api.deps import Dependencies
from sluice_api.inputs import KnownParamsMiddleware
from sluice_api.openapi import OpenApiResource
from sluice_api.resources import (
    CancelRunResource,
    HookResource,
    QueueStatsResource,
    RetryRunResource,
    RunResource,
    RunsResource,
    RunWorkflowResource,
    ScheduleResource,
    SchedulerRefreshResource,
    SecretResource,
    SecretsResource,
    WebhookRotateResource,
    WorkflowResource,
    WorkflowsResource,
    WorkflowVersionResource,
    WorkflowVersionsResource,
)
from sluice_common.broker import WakeupSender, make_broker
from sluice_common.cron import RedisSchedulerLink
from sluice_common.db import open_pool
from sluice_common.ratelimit import RedisRateLimiter
from sluice_common.settings import load_settings, server_urls

__all__ = ["Dependencies", "create_app", "get_app"]


class HealthResource:
    """Liveness: the process answers."""

    public = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    """Readiness: PostgreSQL and Redis both answer, else 503."""

    public = True

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
    limiter: RequestLimiter
    if deps.redis is not None:
        limiter = RedisRequestLimiter(deps.redis, deps.settings.redis_prefix, deps.settings.api_rate_limit_per_minute)
    else:
        limiter = LocalRequestLimiter(deps.settings.api_rate_limit_per_minute)
    middleware: list[Any] = [AuthMiddleware(deps.pool, limiter), KnownParamsMiddleware()]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    # Bodies are read and checked by the resources (size limit, media type, problems).
    app.req_options.auto_parse_form_urlencoded = False
    problems.install(app)
    app.add_route("/api/health", HealthResource())
    app.add_route("/api/ready", ReadyResource(deps))
    app.add_route("/api/openapi.json", OpenApiResource())
    app.add_route("/api/workflows", WorkflowsResource(deps))
    app.add_route("/api/workflows/queue/stats", QueueStatsResource(deps))
    app.add_route("/api/workflows/{workflow_id:uuid}", WorkflowResource(deps))
    app.add_route("/api/workflows/{workflow_id:uuid}/run", RunWorkflowResource(deps))
    app.add_route("/api/workflows/{workflow_id:uuid}/runs", RunsResource(deps, of_workflow=True))
    app.add_route("/api/workflows/{workflow_id:uuid}/webhook/rotate", WebhookRotateResource(deps))
    app.add_route("/api/workflows/{workflow_id:uuid}/schedule", ScheduleResource(deps))
    app.add_route("/api/workflows/{workflow_id:uuid}/versions", WorkflowVersionsResource(deps))
    app.add_route(
        "/api/workflows/{workflow_id:uuid}/versions/{version:int(min=1,max=2147483647)}", WorkflowVersionResource(deps)
    )
    app.add_route("/api/runs", RunsResource(deps))
    app.add_route("/api/runs/{run_id:uuid}", RunResource(deps))
    app.add_route("/api/runs/{run_id:uuid}/cancel", CancelRunResource(deps))
    app.add_route("/api/runs/{run_id:uuid}/retry", RetryRunResource(deps))
    app.add_route("/api/hooks/{secret}", HookResource(deps, limiter))
    app.add_route("/api/scheduler/refresh", SchedulerRefreshResource(deps))
    app.add_route("/api/secrets", SecretsResource(deps))
    app.add_route("/api/secrets/{name}", SecretResource(deps))
    return app


def get_app() -> falcon.App[falcon.Request, falcon.Response]:
    """Build the app and its dependencies from the environment (one call per gunicorn worker)."""
    settings = load_settings()
    urls = server_urls(settings)
    pool = open_pool(settings, urls.database_url, name="api")
    client = redis.Redis.from_url(urls.redis_url, socket_timeout=5, socket_connect_timeout=5)
    broker = make_broker(settings, urls.redis_url)
    limiter = RedisRateLimiter(client, settings.redis_prefix, settings.rate_limit_per_minute)
    sender = WakeupSender(broker)
    # atexit runs last-registered first: wake-ups still waiting are sent before anything closes.
    atexit.register(pool.close)
    atexit.register(client.close)
    atexit.register(broker.close)
    atexit.register(sender.close)
    link = RedisSchedulerLink(client, settings)
    return create_app(Dependencies(settings, pool, client, broker, limiter, scheduler=link, sender=sender))
