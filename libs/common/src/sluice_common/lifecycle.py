"""Process lifecycle shared by the long-running services (worker, scheduler).

:func:`service_main` reads settings, sets up logging, finds the servers, installs SIGTERM/SIGINT
handlers and calls the service's ``run`` with a stop event; a configuration or infrastructure
error ends the process with a one-line message instead of a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from sluice_common.errors import SluiceError
from sluice_common.logs import configure_logging
from sluice_common.runtime import Endpoints, resolve_endpoints
from sluice_common.settings import Settings, load_settings

ServiceRun = Callable[[Settings, Endpoints, threading.Event], None]


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for a service's main loop to wait on."""
    event = threading.Event()

    def _handler(signum: int, frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return event


def service_main(name: str, run: ServiceRun, *, need_redis: bool = True) -> None:
    try:
        settings = load_settings()
    except SluiceError as exc:
        raise SystemExit(str(exc)) from None
    configure_logging(settings.log_level, name)
    stopping = stop_event()
    try:
        endpoints = resolve_endpoints(settings, need_redis=need_redis)
        try:
            run(settings, endpoints, stopping)
        finally:
            endpoints.close()
    except SluiceError as exc:
        raise SystemExit(f"{name}: {exc}") from None
