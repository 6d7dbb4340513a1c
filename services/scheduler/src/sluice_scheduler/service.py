"""Builds and runs the scheduler service.

For now the service connects to PostgreSQL and Redis, reports ready, and stops cleanly on
SIGTERM or SIGINT; cron firing arrives with its own change.
"""

from __future__ import annotations

import logging
import threading

import redis

from sluice_common.db import open_pool
from sluice_common.lifecycle import service_main
from sluice_common.runtime import Endpoints
from sluice_common.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, endpoints: Endpoints, stopping: threading.Event) -> None:
    pool = open_pool(settings, endpoints.database_url, name="scheduler")
    client = redis.Redis.from_url(endpoints.redis_url)
    try:
        client.ping()
        log.info("scheduler ready")
        stopping.wait()
        log.info("scheduler stopping")
    finally:
        client.close()
        pool.close()


def main() -> None:
    service_main("scheduler", run)
