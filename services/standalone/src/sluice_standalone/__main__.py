"""``python -m sluice_standalone``: run Sluice in one process on PostgreSQL alone."""

from __future__ import annotations

import threading

from sluice_common import tracing
from sluice_common.db import migrate, open_pool
from sluice_common.observe import run_events
from sluice_common.process import freeze_startup_objects, service_main
from sluice_common.settings import ServerUrls, Settings
from sluice_standalone.app import create_standalone, serve
from sluice_worker.safehttp import make_client
from sluice_worker.tracing import start_tracing


def run(settings: Settings, urls: ServerUrls, stopping: threading.Event) -> None:
    http = make_client()
    start_tracing(settings, http, run_events, service_name="sluice-standalone")
    migrate(urls.database_url)
    pool = open_pool(settings, urls.database_url, name="standalone", max_size=settings.concurrency + 8)
    try:
        app = create_standalone(settings, pool, http=http)
        freeze_startup_objects()
        app.start()
        try:
            serve(app, stopping)
        finally:
            app.stop()
    finally:
        tracing.shutdown_tracing()
        http.close()
        pool.close()


if __name__ == "__main__":
    service_main("standalone", run, need_redis=False)
