"""``python -m sluice_api``: serve the API with gunicorn (bind and worker count from settings).

The API takes DATABASE_URL and REDIS_URL as set; ``sluice api`` starts the embedded servers and sets
them when they are unset, before this process (and so before gunicorn forks its workers) starts.
Requests are read by the workers' event loops before a thread serves them
(:mod:`sluice_api.http_worker`), so slow clients cannot hold the threads.
"""

from __future__ import annotations

import gc
import resource
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from sluice_api import multiproc
from sluice_api.http_worker import buffering_worker
from sluice_common.errors import SluiceError
from sluice_common.logs import configure_logging
from sluice_common.process import freeze_startup_objects
from sluice_common.settings import Settings, load_settings, server_urls
from sluice_common.tracing import check_tracing_settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from sluice_api.app import get_app

        return get_app()


class ProcessLogger(Logger):  # type: ignore[misc]
    """gunicorn's own lines (a worker booted, timed out, exited) in the process's format, JSON in the
    images: they go through the root logger that ``configure_logging`` set up, not a handler of
    gunicorn's own that would write them in its format."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if cfg.errorlog == "-":  # to stderr, where the root logger writes too
            handler = self._get_gunicorn_handler(self.error_log)
            if handler is not None:
                self.error_log.removeHandler(handler)
            self.error_log.propagate = True


def main() -> None:
    try:
        settings = load_settings()
    except SluiceError as exc:
        raise SystemExit(str(exc)) from None
    try:
        # Checked before gunicorn forks: every worker reads the same URLs from the environment
        # (``sluice api`` sets them to the embedded servers', which outlive every worker, when unset).
        server_urls(settings)
        check_tracing_settings()  # each worker sets tracing up after the fork; a bad value stops here
    except SluiceError as exc:
        raise SystemExit(f"api: {exc}") from None
    configure_logging(settings.log_level, "api", settings.log_format)
    _serve(settings)


def _raise_open_files_limit(wanted: int) -> None:
    """Raise the soft limit on open files towards ``wanted`` (as far as the hard limit allows):
    every connection a worker holds open is a file descriptor, and 1024 is a common default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _freeze_before_fork(server: Any, worker: Any) -> None:
    """Keep the objects the master made out of the workers' garbage collections: a collection
    writes to every object it visits, and each write copies a page the worker shared with the
    master (gc.freeze, as Python's documentation advises for a forking server)."""
    gc.freeze()


def _freeze_after_worker_init(worker: Any) -> None:
    freeze_startup_objects()


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn's settings for the API (bind, workers, threads and limits from Sluice's settings)."""
    return {
        "bind": settings.api_bind,
        "workers": settings.api_workers,
        "worker_class": buffering_worker(settings.api_request_timeout_seconds, settings.api_max_body_bytes),
        "threads": settings.api_threads,
        "worker_connections": settings.api_max_connections,
        "graceful_timeout": 10,
        "accesslog": None,
        "loglevel": settings.log_level.lower(),
        "logger_class": ProcessLogger,
        "proc_name": "sluice-api",
        # One shared control socket path per machine would clash between instances.
        "control_socket_disable": True,
        # A dead worker's live gauges leave the scrape with it.
        "child_exit": multiproc.child_exit,
        "pre_fork": _freeze_before_fork,
        # And what each worker made while it loaded the app (freeze_startup_objects).
        "post_worker_init": _freeze_after_worker_init,
    }


def _serve(settings: Settings) -> None:
    # Room for the connections plus the pools, pipes and log files of a worker.
    _raise_open_files_limit(settings.api_max_connections + 256)
    if settings.api_metrics:
        # Before the fork: every worker writes its metrics where the scrape reads them all.
        multiproc.prepare_directory()
    _Gunicorn(gunicorn_options(settings)).run()


if __name__ == "__main__":
    main()
