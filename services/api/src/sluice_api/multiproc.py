"""Prometheus multiprocess mode for the API's gunicorn workers.

Each gunicorn worker is its own process, so its metric values live in files of a directory
shared by them all (``PROMETHEUS_MULTIPROC_DIR``), and ``/metrics`` reads the directory with a
fresh registry per scrape (:mod:`sluice_api.metrics`). Three pieces:

- :func:`prepare_directory`, in the gunicorn master before it forks: sets the variable to a fresh
  directory when it is unset (removed when the master exits), or empties the one given (values
  of a previous master are stale);
- :func:`child_exit`, the gunicorn hook that marks a dead worker (its live gauges leave the sums);
- :func:`mark_dead_workers`, run at every scrape: does the same for any worker whose files are
  left while its process is gone, so a missing hook (or a killed master) cannot keep a dead
  worker's gauges in the sums.

The runner (``sluice_api.__main__``) calls :func:`prepare_directory` before building gunicorn and
adds ``"child_exit": child_exit`` to its options. Without them, a directory set in the environment
(as the images and manifests do) is used as it is, with dead workers marked at scrape time.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import MutableMapping
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Live gauges are the values a dead worker must stop adding to (counters and histograms keep
# counting what it did, which is right).
_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def directory(environ: MutableMapping[str, str] | None = None) -> str | None:
    """The multiprocess directory in use, or None (metrics then describe one process)."""
    env = os.environ if environ is None else environ
    return env.get(ENV) or env.get(ENV.lower()) or None


def prepare_directory(environ: MutableMapping[str, str] | None = None) -> str:
    """Before gunicorn forks: a fresh, empty multiprocess directory, named in ``environ``."""
    env = os.environ if environ is None else environ
    path = directory(env)
    if path is None:
        path = tempfile.mkdtemp(prefix="sluice-api-metrics-")
        env[ENV] = path
        master = os.getpid()

        def remove() -> None:
            # Forked workers inherit this exit handler: only the master removes the folder.
            if os.getpid() == master:
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
        return path
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    return path


def ensure_directory() -> None:
    """In a worker, before its first metric: the directory named in the environment exists."""
    path = directory()
    if path is not None:
        os.makedirs(path, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """Gunicorn's ``child_exit`` hook: a worker ended, its live gauges leave the sums."""
    from prometheus_client import multiprocess

    path = directory()
    if path is not None:
        multiprocess.mark_process_dead(worker.pid, path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_workers(path: str) -> list[int]:
    """Mark every process with live-gauge files in ``path`` that no longer exists; return their pids."""
    from prometheus_client import multiprocess

    dead = sorted(
        {
            int(match[1])
            for name in os.listdir(path)
            if (match := _LIVE_FILE.match(name)) is not None and not _alive(int(match[1]))
        }
    )
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return dead
