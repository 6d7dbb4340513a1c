"""Prometheus multiprocess mode for the API's gunicorn workers.

Each gunicorn worker is its own process, so its metric values live in files of a directory
shared by them all (``PROMETHEUS_MULTIPROC_DIR``), and ``/metrics`` reads the directory with a
fresh registry per scrape (:mod:`sluice_api.metrics`). The pieces:

- :func:`prepare_directory`, in the gunicorn master before it forks: sets the variable to a fresh
  directory when it is unset (removed when the master exits), or empties the one given (values
  of a previous master are stale);
- :func:`child_exit`, the gunicorn hook that marks a dead worker (its live gauges leave the sums);
- :func:`mark_dead_workers`, run at every scrape: does the same for any worker whose files are
  left while its process is gone, so a missing hook (or a killed master) cannot keep a dead
  worker's gauges in the sums;
- :class:`Flusher`, in each worker: every update of a multiprocess value is a write to a file
  under a process-wide lock, so the API's per-request metrics are tallied in memory instead and
  written by a flush: every second, at the worker's exit, and whenever a scrape asks
  (:func:`request_flush`: each worker listens on ``flush_<pid>.sock`` in the directory), so that
  a scrape still counts every request answered before it.

The runner (``sluice_api.__main__``) calls :func:`prepare_directory` before building gunicorn and
adds ``"child_exit": child_exit`` to its options. Without them, a directory set in the environment
(as the images and manifests do) is used as it is, with dead workers marked at scrape time.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import re
import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Live gauges are the values a dead worker must stop adding to (counters and histograms keep
# counting what it did, which is right).
_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")
# Where a worker's Flusher listens for a scrape's request to flush now.
_FLUSH_SOCKET = re.compile(r"^flush_(\d+)\.sock$")
# How often a worker writes its tallies to its files when no scrape asks (and so how late a
# worker that cannot answer a scrape in time shows its figures).
FLUSH_SECONDS = 1.0
# How long a scrape waits for the workers' flushes in all (one wedged worker must not stall it).
FLUSH_WAIT_SECONDS = 0.5


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
    for stale in [*glob.glob(os.path.join(path, "*.db")), *glob.glob(os.path.join(path, "flush_*.sock"))]:
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


class Flusher:
    """A worker's flushes (each moves an in-memory tally to the metrics, so to this process's files).

    :meth:`start` (after the fork) runs them from a daemon thread every ``seconds``, whenever a
    scrape connects to ``flush_<pid>.sock`` in ``path`` (answered once they are done), and once
    more at exit (:meth:`close`). A worker killed outright (SIGKILL) loses what it tallied since
    its last flush. Without ``path``, or when the socket cannot be made (a path too long for a
    Unix socket), only the timer and the exit flush remain, and a scrape may miss up to
    ``seconds`` of that worker's requests.
    """

    def __init__(self, path: str | None, seconds: float = FLUSH_SECONDS) -> None:
        self._path = path
        self._seconds = seconds
        self._flushes: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._address: str | None = None

    def add(self, flush: Callable[[], None]) -> None:
        self._flushes.append(flush)

    def flush(self) -> None:
        for flush in self._flushes:
            try:
                flush()
            except Exception:  # logged; the others still flush
                log.exception("metrics: flush %r failed", flush)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._listener = self._listen()
        self._thread = threading.Thread(target=self._run, name="sluice-metrics-flush", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the thread and its socket, and flush what is left."""
        self._stop.set()
        if self._address is not None:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                wake.settimeout(1)
                wake.connect(self._address)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._address is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._address)
            self._address = None
        atexit.unregister(self.close)
        self.flush()

    def _listen(self) -> socket.socket | None:
        if self._path is None:
            return None
        address = os.path.join(self._path, f"flush_{os.getpid()}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.remove(address)  # left by a dead process that had this pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            log.warning("metrics: a scrape cannot make this worker flush (%s); it does every %g s", exc, self._seconds)
            return None
        self._address = address
        return listener

    def _run(self) -> None:
        next_at = time.monotonic() + self._seconds
        while not self._stop.is_set():
            asked = self._wait(max(0.0, next_at - time.monotonic()))
            if self._stop.is_set():
                if asked is not None:
                    asked.close()
                break
            self.flush()
            if asked is None:
                next_at = time.monotonic() + self._seconds
            else:
                with asked, contextlib.suppress(OSError):
                    asked.sendall(b"\n")  # done: the scrape reads the files now

    def _wait(self, seconds: float) -> socket.socket | None:
        """A scrape's connection, or None when ``seconds`` have passed first."""
        if self._listener is None:
            self._stop.wait(seconds)
            return None
        try:
            ready, _, _ = select.select([self._listener], [], [], seconds)
            if not ready:
                return None
            conn, _ = self._listener.accept()
        except (OSError, ValueError):  # closed under us: the process is stopping
            self._stop.wait(seconds)
            return None
        return conn


def request_flush(path: str, timeout: float = FLUSH_WAIT_SECONDS) -> int:
    """Before a scrape: ask every worker listening in ``path`` to flush now, and wait for them
    (``timeout`` in all). Returns how many answered; a dead worker's socket is removed."""
    deadline = time.monotonic() + timeout
    asked: list[socket.socket] = []
    for name in os.listdir(path):
        match = _FLUSH_SOCKET.match(name)
        if match is None:
            continue
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout)
        try:
            conn.connect(os.path.join(path, name))
        except OSError:  # nobody listens: a dead worker (or one stopping)
            conn.close()
            if not _alive(int(match[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, name))
            continue
        asked.append(conn)
    answered = 0
    for conn in asked:
        with conn:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                answered += len(conn.recv(1))
    return answered
