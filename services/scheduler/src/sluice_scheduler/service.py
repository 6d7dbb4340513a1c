"""Builds and runs the scheduler service.

Today it runs the pipeline's maintenance on a fixed interval (``SLUICE_RECONCILE_SECONDS``): the
reconciler, which wakes runs PostgreSQL holds but Redis lost, and the recovery of runs whose
worker died. Both are safe to run from several replicas at once. Cron firing arrives with its
own change.
"""

from __future__ import annotations

import logging
import threading

import dramatiq

from sluice_common.broker import make_broker
from sluice_common.db import Pool, open_pool
from sluice_common.lifecycle import service_main
from sluice_common.runs import reconcile, recover_expired
from sluice_common.runtime import Endpoints
from sluice_common.settings import Settings

log = logging.getLogger(__name__)


def maintain(settings: Settings, pool: Pool, broker: dramatiq.Broker) -> None:
    """One maintenance pass; errors are logged and retried on the next pass."""
    try:
        recover_expired(pool, broker)
        reconcile(pool, broker, settings)
    except Exception:
        log.warning("maintenance pass failed; will retry", exc_info=True)


def maintenance_loop(settings: Settings, pool: Pool, broker: dramatiq.Broker, stopping: threading.Event) -> None:
    while True:
        maintain(settings, pool, broker)
        if stopping.wait(settings.reconcile_seconds):
            return


def run(settings: Settings, endpoints: Endpoints, stopping: threading.Event) -> None:
    pool = open_pool(settings, endpoints.database_url, name="scheduler")
    broker = make_broker(settings, endpoints.redis_url)
    try:
        log.info("scheduler ready (maintenance every %.1fs)", settings.reconcile_seconds)
        maintenance_loop(settings, pool, broker, stopping)
        log.info("scheduler stopping")
    finally:
        broker.close()
        pool.close()


def main() -> None:
    service_main("scheduler", run)
