"""The API app factory. ``create_app`` takes its dependencies; ``get_app`` builds them for gunicorn.

``create_app`` adds the middleware (the request id of :mod:`sluice_api.requestid` first) and mounts
the routes of ``sluice_api.routes``, the dashboard's pages (:mod:`sluice_api.dashboard`), and
``/metrics`` (:mod:`sluice_api.metrics`; the HTTP metrics are a middleware, the run metrics an
observer of the run events that ``get_app`` adds). With ``SLUICE_API_METRICS=false`` there is
none of the three.

Nothing here opens a pool or a connection at import time: gunicorn calls ``get_app`` in each
worker process after the fork.
"""

from __future__ import annotations

import atexit
from typing import Any

import falcon
import redis
from prometheus_client import CollectorRegistry, ProcessCollector

from sluice_api import dashboard, metrics, multiproc, problems, tracing
from sluice_api.auth import AuthMiddleware, LocalRequestLimiter, RedisRequestLimiter, RequestLimiter
from sluice_api.deps import Dependencies
from sluice_api.inputs import KnownParamsMiddleware
from sluice_api.requestid import RequestIdMiddleware
from sluice_api.resources.base import Context
from sluice_api.routes import ROUTES, mount
from sluice_api.stats import QueueStatsCache
from sluice_common.broker import WakeupSender, make_broker
from sluice_common.cron import RedisSchedulerLink
from sluice_common.db import open_pool
from sluice_common.metrics import observe_runs
from sluice_common.observe import run_events
from sluice_common.ratelimit import RedisRateLimiter
from sluice_common.runs import group_inserts
from sluice_common.settings import load_settings, server_urls
from sluice_common.tracing import configure_tracing, shutdown_tracing

__all__ = ["Dependencies", "create_app", "get_app"]


def create_app(
    deps: Dependencies, *, registry: CollectorRegistry | None = None, flusher: multiproc.Flusher | None = None
) -> falcon.App[falcon.Request, falcon.Response]:
    """The app on ``deps``; its metrics go to ``registry`` (a registry of its own by default), and
    ``flusher`` (a gunicorn worker's) flushes the HTTP metrics' tally."""
    registry = CollectorRegistry() if registry is None else registry
    limiter: RequestLimiter
    if deps.redis is not None:
        limiter = RedisRequestLimiter(deps.redis, deps.settings.redis_prefix, deps.settings.api_rate_limit_per_minute)
    else:
        limiter = LocalRequestLimiter(deps.settings.api_rate_limit_per_minute)
    # The request id first, so that every line logged for a request names it; then the metrics, so
    # that they time the whole request and see every answer, refusals included.
    middleware: list[Any] = [
        RequestIdMiddleware(),
        AuthMiddleware(deps.pool, limiter),
        dashboard.SessionMiddleware(deps, limiter),
        KnownParamsMiddleware(),
    ]
    if deps.settings.api_metrics:
        http_metrics = metrics.HttpMetrics(registry)
        if flusher is not None:
            flusher.add(http_metrics.flush)
        middleware.insert(1, http_metrics)
    tracing.instrument_falcon()  # before the app is built: the instrumented class replaces falcon.App
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    # Bodies are read and checked by the resources (size limit, media type, problems).
    app.req_options.auto_parse_form_urlencoded = False
    problems.install(app)
    stats = QueueStatsCache.of(deps)
    mount(app, Context(deps, limiter, ROUTES, stats))
    dashboard.install(app, deps, stats)
    if deps.settings.api_metrics:
        metrics.install(app, deps, registry, stats)
    return app


def get_app() -> falcon.App[falcon.Request, falcon.Response]:
    """Build the app and its dependencies from the environment (one call per gunicorn worker)."""
    settings = load_settings()
    urls = server_urls(settings)
    # After the fork, before any client exists (client spans wrap them when SLUICE_TRACE_CLIENTS is on).
    if configure_tracing("sluice-api", trace_clients=settings.trace_clients):
        atexit.register(shutdown_tracing)
    # Without waiting for PostgreSQL: gunicorn replaces a worker that died, and one that fails to
    # boot (as it would during an outage) makes the master stop the whole API. A worker booted
    # meanwhile answers 503 (and readiness says so) until the pool reaches the database.
    pool = open_pool(settings, urls.database_url, name="api", wait=False)
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
    registry = CollectorRegistry()
    flusher = None
    if settings.api_metrics:
        multiproc.ensure_directory()
        path = multiproc.directory()
        if path is None:
            ProcessCollector(registry=registry)  # per-process figures mean nothing summed over workers
            observe_runs(registry, settings)  # manual and webhook runs created
        else:
            # Metrics files: the tallies reach them at a flush (every second, each scrape, at exit).
            flusher = multiproc.Flusher(path)
            runs = metrics.RunsCreatedTally(registry, workflow_labels=settings.metrics_workflow_labels)
            flusher.add(runs.flush)
            run_events.add(runs)
    deps = Dependencies(
        settings, pool, client, broker, limiter, scheduler=link, sender=sender, inserts=group_inserts(pool, settings)
    )
    app = create_app(deps, registry=registry, flusher=flusher)
    if flusher is not None:
        flusher.start()
    return app
