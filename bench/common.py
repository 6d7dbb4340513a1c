"""What every benchmark needs: servers, databases and a Redis namespace of its own, removed after.

Uses SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else starts the embedded servers.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql
from psycopg.types.json import Jsonb

from sluice_cli.embedded import EmbeddedServers
from sluice_common import users


def with_db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


@dataclass(frozen=True)
class BenchServers:
    redis_url: str
    prefix: str  # Redis keys and database names of this run start with it
    databases: dict[str, str]  # suffix -> database URL


@contextmanager
def bench_servers(*suffixes: str) -> Iterator[BenchServers]:
    """Empty databases ``sluice_bench_<tag>_<suffix>`` and a Redis prefix, dropped at the end."""
    admin = os.environ.get("SLUICE_TEST_DATABASE_URL")
    redis_url = os.environ.get("SLUICE_TEST_REDIS_URL")
    embedded = None
    if not admin or not redis_url:
        embedded = EmbeddedServers(Path(tempfile.mkdtemp(prefix="sluice-bench-")))
        admin = admin or embedded.postgres_admin_url()
        redis_url = redis_url or embedded.redis_url()
    prefix = f"sluice_bench_{uuid.uuid4().hex[:8]}"
    names = {suffix: f"{prefix}_{suffix}" for suffix in suffixes}
    client = redis.Redis.from_url(redis_url)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names.values():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield BenchServers(redis_url, prefix, {s: with_db(admin, n) for s, n in names.items()})
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names.values():
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if embedded is not None:
            embedded.stop_started()


def worker_env(db_url: str, redis_url: str, prefix: str, threads: int) -> dict[str, str]:
    """Settings of a benchmarked Sluice worker: no rate limit or per-user cap in the way."""
    return {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "SLUICE_REDIS_PREFIX": prefix,
        "SLUICE_CONCURRENCY": str(threads),
        "SLUICE_RATE_LIMIT_PER_MINUTE": "10000000",
        "SLUICE_USER_CONCURRENCY": "10000",
        "SLUICE_LOG_LEVEL": "WARNING",
    }


def bench_user_and_workflow(url: str) -> tuple[str, str]:
    """A user ``bench`` and a one-step manual workflow of theirs: (API token, workflow id)."""
    with psycopg.connect(url, autocommit=True) as conn:
        issued = users.create_user(conn, "bench")
        row = conn.execute(
            "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
            "VALUES (%s, 'bench', 'manual', %s, %s) RETURNING id",
            (
                issued.user.id,
                Jsonb({"type": "manual"}),
                Jsonb([{"id": "a", "type": "transform", "config": {"value": 1}}]),
            ),
        ).fetchone()
    assert row is not None
    return issued.token, str(row[0])


def finish_params(row: dict[str, Any], *, user_cap: int = 100_000, output: Any = None) -> dict[str, Any]:
    """``runstate.FINISH_ENDED``'s parameters for a claimed run (``row``) that succeeded in one step."""
    return {
        "id": row["id"],
        "claim": row["claim_id"],
        "attempt": row["attempt"],
        "worker": "bench",
        "status": "succeeded",
        "attempt_status": "succeeded",
        "error": None,
        "owner": row["owner_id"],
        "user_cap": user_cap,
        "step": "a",
        "pos": 0,
        "output": output,
        "started": datetime.now(UTC),
    }
