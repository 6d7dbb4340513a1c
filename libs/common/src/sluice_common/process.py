"""Process start-up shared by the long-running services (worker, scheduler, standalone).

:func:`service_main` reads settings, sets up logging, takes the server URLs from the settings,
installs SIGTERM/SIGINT handlers and calls the service's ``run`` with a stop event; a configuration
or infrastructure error ends the process with a one-line message instead of a traceback. It never
starts a server: when ``DATABASE_URL`` / ``REDIS_URL`` are unset, the ``sluice`` command starts the
embedded ones and hands their URLs to the service in its environment.
"""

from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Callable

from sluice_common.errors import SluiceError
from sluice_common.logs import configure_logging
from sluice_common.settings import ServerUrls, Settings, load_settings, server_urls

ServiceRun = Callable[[Settings, ServerUrls, threading.Event], None]


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for a service's main loop to wait on."""
    event = threading.Event()

    def _handler(signum: int, frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return event


def freeze_startup_objects() -> None:
    """Keep what a process made while it started (modules, settings, pools, the app) out of its
    garbage collections from now on.

    A full collection visits every object the collector tracks while it holds the GIL, so it stops
    every thread of the process, for longer than a run takes from its request to its end when it
    visits everything a service loads (docs/scaling.md). Frozen objects are not visited (and stay:
    they live as long as the process anyway); the garbage of the start is collected first.
    """
    gc.collect()
    gc.freeze()


def service_main(name: str, run: ServiceRun, *, need_redis: bool = True) -> None:
    """Run one service process: ``run(settings, urls, stopping)`` until SIGTERM or SIGINT."""
    try:
        settings = load_settings()
    except SluiceError as exc:
        raise SystemExit(str(exc)) from None
    configure_logging(settings.log_level, name, settings.log_format)
    try:
        urls = server_urls(settings, need_redis=need_redis)
        stopping = stop_event()
        run(settings, urls, stopping)
    except SluiceError as exc:
        raise SystemExit(f"{name}: {exc}") from None
