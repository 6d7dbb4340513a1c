"""Builds and runs the scheduler service (queue mode) and the in-process scheduler (standalone).

The service fires the cron triggers stored in PostgreSQL and runs the pipeline's maintenance
(recovery of runs whose worker died, the reconciler, pruning of old history). Any number of
replicas can run: one leads through a lease in Redis and does all of that; the others wait to
take over. See :mod:`sluice_scheduler.scheduler` for how slots are fired exactly once.
"""

from __future__ import annotations

import logging
import threading

import dramatiq
import redis

from sluice_common import tracing
from sluice_common.broker import make_broker
from sluice_common.db import Pool, open_pool
from sluice_common.process import freeze_startup_objects, service_main
from sluice_common.settings import ServerUrls, Settings
from sluice_scheduler.hooks import SchedulerEvents
from sluice_scheduler.leadership import LocalLease, RedisLease
from sluice_scheduler.metrics import start_metrics
from sluice_scheduler.scheduler import CronScheduler, LocalSchedulerLink
from sluice_scheduler.signals import LocalSignals, RedisSignals

log = logging.getLogger(__name__)


def create_scheduler(
    settings: Settings, pool: Pool, broker: dramatiq.Broker, client: redis.Redis, events: SchedulerEvents | None = None
) -> CronScheduler:
    """A replica of the queue-mode scheduler: leader election and change notices through Redis."""
    lease = RedisLease(client, settings.redis_prefix, settings.scheduler_lease_seconds)
    return CronScheduler(settings, pool, broker, lease, RedisSignals(client, settings.redis_prefix), events=events)


def create_local_scheduler(
    settings: Settings, pool: Pool, broker: dramatiq.Broker
) -> tuple[CronScheduler, LocalSchedulerLink]:
    """The standalone scheduler (always the leader) and the link the API uses to reach it."""
    signals = LocalSignals()
    scheduler = CronScheduler(settings, pool, broker, LocalLease(), signals)
    return scheduler, LocalSchedulerLink(scheduler, signals)


def run(settings: Settings, urls: ServerUrls, stopping: threading.Event) -> None:
    # Before the pool and the Redis clients exist: client spans (SLUICE_TRACE_CLIENTS) wrap them.
    tracing.configure_tracing("sluice-scheduler", trace_clients=settings.trace_clients)
    pool = open_pool(settings, urls.database_url, name="scheduler")
    broker = make_broker(settings, urls.redis_url)
    client = redis.Redis.from_url(urls.redis_url)
    events = SchedulerEvents()
    metrics = start_metrics(settings, events)
    try:
        scheduler = create_scheduler(settings, pool, broker, client, events)
        freeze_startup_objects()
        log.info(
            "scheduler %s ready (lease %.0fs, maintenance every %.1fs)",
            scheduler.lease.instance,
            settings.scheduler_lease_seconds,
            settings.reconcile_seconds,
        )
        scheduler.start(stopping)
        stopping.wait()
        log.info("scheduler stopping")
        scheduler.join()
    finally:
        if metrics is not None:
            metrics.shutdown()
        tracing.shutdown_tracing()
        client.close()
        broker.close()
        pool.close()


def main() -> None:
    service_main("scheduler", run)
