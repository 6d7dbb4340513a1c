"""``python -m sluice_standalone``: run Sluice in one process on PostgreSQL alone."""

from __future__ import annotations

import threading

from sluice_common.db import migrate, open_pool
from sluice_common.process import service_main
from sluice_common.settings import ServerUrls, Settings
from sluice_standalone.app import create_standalone, serve


def run(settings: Settings, urls: ServerUrls, stopping: threading.Event) -> None:
    migrate(urls.database_url)
    pool = open_pool(settings, urls.database_url, name="standalone", max_size=settings.concurrency + 8)
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
