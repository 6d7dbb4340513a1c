"""The run pipeline assembled from real parts for tests: PostgreSQL, Redis, Dramatiq, workers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pytest
import redis
from psycopg.types.json import Jsonb

from sluice_common import groupcommit, runstate
from sluice_common.broker import make_broker, ready_queue_key
from sluice_common.db import Pool, open_pool
from sluice_common.ratelimit import RedisRateLimiter
from sluice_common.runs import EnqueuedRun, NewRun, enqueue_run
from sluice_common.settings import Settings, load_settings
from sluice_worker.service import WorkerApp, create_worker
from tests.conftest import Servers
from tests.httpserver import LocalServer, serve

FAST = {
    "SLUICE_RETRY_BACKOFF_MIN_MS": "50",
    "SLUICE_RETRY_BACKOFF_MAX_MS": "200",
    "SLUICE_LEASE_SECONDS": "2",
    "SLUICE_RATE_LIMIT_PER_MINUTE": "100000",
    # The local HTTP server is on 127.0.0.1, which HTTP steps refuse by default.
    "SLUICE_HTTP_ALLOW_PRIVATE": "true",
}


@dataclass
class Pipeline:
    settings: Settings
    pool: Pool
    redis: redis.Redis
    redis_url: str
    brokers: list[dramatiq.Broker] = field(default_factory=list)
    workers: list[WorkerApp] = field(default_factory=list)

    @property
    def broker(self) -> dramatiq.Broker:
        return self.brokers[0]

    @property
    def limiter(self) -> RedisRateLimiter:
        return RedisRateLimiter(self.redis, self.settings.redis_prefix, self.settings.rate_limit_per_minute)

    def new_broker(self) -> dramatiq.Broker:
        broker = make_broker(self.settings, self.redis_url)
        self.brokers.append(broker)
        return broker

    def user(self) -> str:
        with self.pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO users (name) VALUES (%s) RETURNING id", (f"u-{uuid.uuid4().hex[:8]}",)
            ).fetchone()
        assert row is not None
        return str(row["id"])

    def workflow(self, owner: str, steps: list[dict[str, Any]], **settings: Any) -> str:
        with self.pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps, settings) "
                "VALUES (%s, 'test', 'manual', %s, %s, %s) RETURNING id",
                (owner, Jsonb({"type": "manual"}), Jsonb(steps), Jsonb(settings)),
            ).fetchone()
        assert row is not None
        return str(row["id"])

    def enqueue(self, workflow_id: str, owner: str, **options: Any) -> EnqueuedRun:
        return enqueue_run(self.pool, self.broker, self.settings, NewRun(workflow_id, owner, **options))

    def start_worker(self, threads: int = 1, **overrides: Any) -> WorkerApp:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        broker = self.new_broker()
        limiter = RedisRateLimiter(
            self.redis, settings.redis_prefix, settings.rate_limit_per_minute, ready_queue=ready_queue_key(broker)
        )
        app = create_worker(settings, self.pool, broker, limiter, threads=threads)
        app.start()
        self.workers.append(app)
        return app

    def run(self, run_id: object) -> dict[str, Any]:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = %s", (str(run_id),)).fetchone()
        assert row is not None
        return dict(row)

    def attempts(self, run_id: object) -> list[dict[str, Any]]:
        """The run's attempts as the API shows them (a running one is the run's row), by number."""
        with self.pool.connection() as conn:
            rows = conn.execute(runstate.ATTEMPTS, {"run": str(run_id)}).fetchall()
        return sorted((dict(r) for r in rows), key=lambda a: (a["attempt"], a["lost"]))

    def steps(self, run_id: object) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT * FROM run_steps WHERE run_id = %s ORDER BY position", (str(run_id),)
            ).fetchall()
        return [dict(r) for r in rows]

    def wait_for(self, run_ids: list[object], statuses: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = [self.run(r) for r in run_ids]
            if all(r["status"] in statuses for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"runs not {statuses} after {timeout}s: {[r['status'] for r in rows]}")
            time.sleep(0.05)


@pytest.fixture
def pipeline_factory(servers: Servers, fresh_database: str, redis_prefix: str) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []
    client = redis.Redis.from_url(servers.redis_url)
    prefix = f"{redis_prefix}:{uuid.uuid4().hex[:8]}"

    def make(**env: str) -> Pipeline:
        settings = load_settings(
            {
                "DATABASE_URL": fresh_database,
                "REDIS_URL": servers.redis_url,
                "SLUICE_REDIS_PREFIX": prefix,
                **FAST,
                **env,
            }
        )
        pool = open_pool(settings, fresh_database, name="test", max_size=30)
        p = Pipeline(settings, pool, client, servers.redis_url)
        p.new_broker()
        made.append(p)
        return p

    yield make
    for p in made:
        for w in p.workers:
            w.stop(timeout_ms=5000)
        for b in p.brokers:
            b.close()
        p.pool.close()
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    return pipeline_factory()


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    with serve() as server:
        yield server


@pytest.fixture
def steady_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commits as under steady load: a caller that finds a write in flight queues for the
    next batch (at light load a second one would go beside a lone write; see groupcommit)."""
    monkeypatch.setattr(groupcommit, "LONE_WRITES", 1)
