"""A running API (``sluice api`` under gunicorn) and a worker process, shared by a test module."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from sluice_common import users
from tests.conftest import Servers, process_env, start_sluice
from tests.e2e.helpers import Stack, free_port, wait_for
from tests.httpserver import LocalServer, serve


@dataclass
class Api:
    base: str
    database_url: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def user(self) -> tuple[str, httpx.Client]:
        """A new user and an HTTP client that sends its token."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            issued = users.create_user(conn, f"u{uuid.uuid4().hex[:10]}")
        client = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {issued.token}"}, timeout=15)
        return issued.token, client

    def anonymous(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=15)

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        proc = start_sluice({**self.env, **env}, *args)
        self.procs.append(proc)
        return proc


@pytest.fixture(scope="module")
def api(
    servers: Servers, module_database: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """``sluice api`` (two gunicorn workers), ``sluice worker`` and ``sluice scheduler`` on this run's servers."""
    port = free_port()
    data: Path = tmp_path_factory.mktemp("api")
    env = process_env(
        module_database,
        servers.redis_url,
        # Its own namespace: the module's queue is not shared with other tests' workers.
        f"{redis_prefix}_api{port}",
        SLUICE_DATA_DIR=str(data),
        SLUICE_API_BIND=f"127.0.0.1:{port}",
        SLUICE_API_WORKERS="2",
        SLUICE_API_RATE_LIMIT_PER_MINUTE="100000",
        SLUICE_API_MAX_BODY_BYTES="65536",
        SLUICE_RATE_LIMIT_PER_MINUTE="100000",
        SLUICE_RETRY_BACKOFF_MIN_MS="50",
        SLUICE_RETRY_BACKOFF_MAX_MS="100",
        SLUICE_HTTP_ALLOW_PRIVATE="true",
    )
    api = Api(f"http://127.0.0.1:{port}", module_database, env)
    proc = api.start("api")
    api.start("worker")
    api.start("scheduler")
    try:
        wait_for(f"{api.base}/api/ready", proc=proc)
        yield api
    finally:
        for p in api.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in api.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def http_server() -> Iterator[LocalServer]:
    """A real local HTTP server for the steps of a module's workflows to call."""
    with serve() as server:
        yield server
