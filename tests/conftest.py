"""Shared fixtures: real servers for integration and end-to-end tests, isolated per test run.

``SLUICE_TEST_DATABASE_URL`` / ``SLUICE_TEST_REDIS_URL`` point at servers to use (CI sets them to
the machine's own); when unset, the embedded PostgreSQL and Redis are started in a temporary
folder. Each run gets its own database and Redis key prefix, both removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg import sql

from sluice_cli.embedded import EmbeddedServers
from sluice_common.db import migrate
from sluice_common.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SLUICE = [sys.executable, "-m", "sluice_cli"]


def sluice(
    env: dict[str, str], *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``sluice`` command line with ``env`` and capture its output."""
    return subprocess.run([*SLUICE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=check)


def start_sluice(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """Start a long-running ``sluice`` command (its output merged, for the test to drain or ignore)."""
    return subprocess.Popen([*SLUICE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        time.sleep(interval)


def process_env(database_url: str, redis_url: str, redis_prefix: str, **settings: str) -> dict[str, str]:
    """This environment without any Sluice setting of its own, pointed at the given servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "DATABASE_URL", "REDIS_URL", "OTEL_"))}
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, SLUICE_REDIS_PREFIX=redis_prefix, **settings)
    return env


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@dataclass(frozen=True)
class Servers:
    admin_url: str  # a maintenance database on the test PostgreSQL server
    redis_url: str
    embedded: bool


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    db = os.environ.get("SLUICE_TEST_DATABASE_URL")
    rd = os.environ.get("SLUICE_TEST_REDIS_URL")
    embedded = None
    if not db or not rd:
        embedded = EmbeddedServers(tmp_path_factory.mktemp("embedded"))
    try:
        if not db:
            assert embedded is not None
            db = embedded.postgres_admin_url()
        if not rd:
            assert embedded is not None
            rd = embedded.redis_url()
        yield Servers(db, rd, embedded is not None)
    finally:
        if embedded is not None:
            embedded.stop_started()


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def database_url(servers: Servers, run_id: str) -> Iterator[str]:
    """A fresh, migrated database for this test run, dropped at the end."""
    name = f"sluice_test_{run_id}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(servers.admin_url, name)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def redis_prefix(servers: Servers, run_id: str) -> Iterator[str]:
    """A Redis key prefix for this test run; every key under it is deleted at the end."""
    prefix = f"sluice_test_{run_id}"
    yield prefix
    client = redis.Redis.from_url(servers.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextmanager
def _copy_of_run_database(servers: Servers, run_id: str) -> Iterator[str]:
    name = f"sluice_test_{run_id}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(f"sluice_test_{run_id}")
            )
        )
    try:
        yield with_database(servers.admin_url, name)
    finally:
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_database(servers: Servers, database_url: str, run_id: str) -> Iterator[str]:
    """A database of its own for one test, copied from the run's migrated one (fast)."""
    with _copy_of_run_database(servers, run_id) as url:
        yield url


@pytest.fixture(scope="module")
def module_database(servers: Servers, database_url: str, run_id: str) -> Iterator[str]:
    """A database of its own for one test module (the run's database stays the clean template)."""
    with _copy_of_run_database(servers, run_id) as url:
        yield url


@pytest.fixture
def db(fresh_database: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(fresh_database) as conn:
        yield conn


@pytest.fixture
def service_env(servers: Servers, fresh_database: str, redis_prefix: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a Sluice process bound to a database of its own, this run's Redis prefix
    and a temp dir (the run's database stays the clean template of the others)."""
    return process_env(
        fresh_database,
        servers.redis_url,
        redis_prefix,
        SLUICE_DATA_DIR=str(tmp_path / "data"),
        # The tests' HTTP server listens on 127.0.0.1, which HTTP steps refuse by default.
        SLUICE_HTTP_ALLOW_PRIVATE="true",
    )


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    return load_settings(service_env)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.relative_to(ROOT / "tests").parts[0]
        if tier in ("integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))
