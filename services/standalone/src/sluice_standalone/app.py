"""Builds the standalone process from its parts (``create_standalone``) and serves it.

The cron scheduler runs in-process (always the leader; fires are still claimed in PostgreSQL) and
also runs the maintenance jobs; ``Standalone.scheduler_link`` is the API's link to it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import dramatiq
import httpx
from prometheus_client import CollectorRegistry

from sluice_api.app import Dependencies, create_app
from sluice_common.broker import make_broker
from sluice_common.db import Pool
from sluice_common.metrics import observe_runs
from sluice_common.ratelimit import LocalRateLimiter
from sluice_common.runs import group_inserts, reconcile
from sluice_common.settings import Settings
from sluice_scheduler.scheduler import CronScheduler, LocalSchedulerLink
from sluice_scheduler.service import create_local_scheduler
from sluice_worker.service import WorkerApp, create_worker

log = logging.getLogger(__name__)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s - %s", self.address_string(), format % args)


@dataclass
class Standalone:
    settings: Settings
    pool: Pool
    broker: dramatiq.Broker
    limiter: LocalRateLimiter
    worker: WorkerApp
    stopping: threading.Event
    scheduler: CronScheduler
    scheduler_link: LocalSchedulerLink

    def start(self) -> None:
        # Runs queued when the last process stopped have no wake-up in this new broker yet.
        woken = reconcile(self.pool, self.broker, self.settings)
        if woken:
            log.info("resuming %d run(s) left queued by the previous process", woken)
        self.worker.start()
        self.scheduler.start(self.stopping)

    def stop(self) -> None:
        self.stopping.set()
        self.worker.stop()
        self.scheduler.join(timeout=5)
        self.broker.close()


def create_standalone(settings: Settings, pool: Pool, *, http: httpx.Client | None = None) -> Standalone:
    broker = make_broker(settings, None)
    limiter = LocalRateLimiter(settings.rate_limit_per_minute)
    worker = create_worker(settings, pool, broker, limiter, http=http)
    stopping = threading.Event()
    scheduler, link = create_local_scheduler(settings, pool, broker)
    return Standalone(settings, pool, broker, limiter, worker, stopping, scheduler, link)


def serve(app: Standalone, stopping: threading.Event) -> None:
    """Serve the API on ``SLUICE_API_BIND`` until ``stopping`` is set."""
    host, port = app.settings.api_bind.rsplit(":", 1)
    registry = CollectorRegistry()
    if app.settings.api_metrics:
        observe_runs(registry, app.settings)  # the run metrics join the API's on its /metrics
    deps = Dependencies(
        app.settings,
        app.pool,
        None,
        app.broker,
        app.limiter,
        scheduler=app.scheduler_link,
        inserts=group_inserts(app.pool, app.settings),
    )
    wsgi = create_app(deps, registry=registry)
    server = make_server(host.strip("[]"), int(port), wsgi, _ThreadingWSGIServer, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="sluice-http", daemon=True)
    thread.start()
    log.info("standalone Sluice listening on http://%s (no Redis)", app.settings.api_bind)
    try:
        stopping.wait()
    finally:
        server.shutdown()
        server.server_close()
