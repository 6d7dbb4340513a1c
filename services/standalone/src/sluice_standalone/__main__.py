"""``python -m sluice_standalone``: run Sluice in one process on PostgreSQL alone."""

from __future__ import annotations

import threading

from sluice_common.db import migrate, open_pool
from sluice_common.lifecycle import service_main
from sluice_common.runtime import Endpoints
from sluice_common.settings import Settings
from sluice_standalone.app import create_standalone, serve


def run(settings: Settings, endpoints: Endpoints, stopping: threading.Event) -> None:
    migrate(endpoints.database_url)
    pool = open_pool(settings, endpoints.database_url, name="standalone", max_size=settings.concurrency + 8)
    try:
        app = create_standalone(settings, pool)
        app.start()
        try:
            serve(app, stopping)
        finally:
            app.stop()
    finally:
        pool.close()


if __name__ == "__main__":
    service_main("standalone", run, need_redis=False)
