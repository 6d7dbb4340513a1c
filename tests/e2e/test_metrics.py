"""A real Prometheus scrapes the API, the worker and the scheduler, each running as a process.

The API runs two gunicorn workers in multiprocess mode; the worker and the scheduler serve
``/metrics`` on ``SLUICE_METRICS_PORT``. After a workflow has run, the test asks Prometheus'
HTTP API (never the services directly) for a queue-depth gauge, the run-duration histogram and
the HTTP request count summed over both API workers. Everything listens on 127.0.0.1 and is
stopped at the end.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest

from sluice_common import users
from tests.conftest import SLUICE, Servers, process_env
from tests.e2e.helpers import Stack, free_port, http, wait_for
from tests.tools import need_binary

pytestmark = pytest.mark.e2e

SCRAPE_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: sluice-api
    static_configs: [{{targets: ["127.0.0.1:{api}"]}}]
  - job_name: sluice-worker
    static_configs: [{{targets: ["127.0.0.1:{worker}"]}}]
  - job_name: sluice-scheduler
    static_configs: [{{targets: ["127.0.0.1:{scheduler}"]}}]
"""


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    code, _, body = http("GET", f"{prometheus}/api/v1/query?{urlencode({'query': promql})}")
    assert code == 200, body
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def eventually(prometheus: str, promql: str, check: Any, timeout: float = 45.0) -> list[dict[str, Any]]:
    """Query until ``check(result)`` holds (scrapes come every second), or fail with the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(prometheus, promql)
        if result and check(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{promql}: {result!r} after {timeout}s")
        time.sleep(0.5)


def test_prometheus_scrapes_the_three_services(
    servers: Servers, module_database: str, redis_prefix: str, stack: Stack, tmp_path: Path
) -> None:
    prometheus_bin = need_binary("prometheus")
    api_port, worker_port, scheduler_port, prom_port = (free_port() for _ in range(4))
    env = process_env(
        module_database,
        servers.redis_url,
        f"{redis_prefix}_metrics{api_port}",  # its own queue: no other test's worker takes its runs
        SLUICE_DATA_DIR=str(tmp_path / "data"),
        SLUICE_API_BIND=f"127.0.0.1:{api_port}",
        SLUICE_API_WORKERS="2",
        SLUICE_RATE_LIMIT_PER_MINUTE="100000",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # The API's gunicorn workers share their values through files (as in the image); the worker
    # and the scheduler are one process each.
    api = stack.start("api", [*SLUICE, "api"], {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "api-metrics")})
    stack.start("worker", [*SLUICE, "worker"], {**env, "SLUICE_METRICS_PORT": str(worker_port)})
    stack.start("scheduler", [*SLUICE, "scheduler"], {**env, "SLUICE_METRICS_PORT": str(scheduler_port)})
    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(api=api_port, worker=worker_port, scheduler=scheduler_port))
    prometheus = f"http://127.0.0.1:{prom_port}"
    prom = stack.start(
        "prometheus",
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
    )
    try:
        base = f"http://127.0.0.1:{api_port}"
        wait_for(f"{base}/api/ready", proc=api)
        wait_for(f"{prometheus}/-/ready", proc=prom)
        eventually(prometheus, "up", lambda r: len(r) == 3 and all(s["value"][1] == "1" for s in r))

        with psycopg.connect(module_database, autocommit=True) as conn:
            token = users.create_user(conn, f"m{uuid.uuid4().hex[:10]}").token
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=15)
        created = client.post(
            "/api/workflows",
            json={
                "name": "metrics",
                "trigger": {"type": "manual"},
                "steps": [{"id": "say", "type": "transform", "config": {"value": {"hello": "world"}}}],
            },
        )
        assert created.status_code == 201, created.text
        workflow_id = created.json()["id"]
        for _ in range(3):
            assert client.post(f"/api/workflows/{workflow_id}/run", json={}).status_code == 202
        for _ in range(10):
            assert http("GET", f"{base}/api/health")[0] == 200

        # The queue gauges come from PostgreSQL at scrape time; the runs succeed on the worker.
        waiting = eventually(prometheus, 'sluice_queue_waiting{job="sluice-api"}', lambda r: True)
        assert float(waiting[0]["value"][1]) >= 0
        done = eventually(
            prometheus,
            'sum(sluice_run_duration_seconds_count{job="sluice-worker", outcome="succeeded"})',
            lambda r: float(r[0]["value"][1]) >= 3,
        )
        assert float(done[0]["value"][1]) == 3
        eventually(
            prometheus,
            'sum(sluice_runs_created_total{job="sluice-api", trigger="manual"})',
            lambda r: float(r[0]["value"][1]) == 3,
        )
        eventually(prometheus, 'sluice_queue_active{job="sluice-api"}', lambda r: r[0]["value"][1] == "0")
        # Both gunicorn workers answered some of the ten: the scrape sums their files.
        eventually(
            prometheus,
            'sum(sluice_http_requests_total{job="sluice-api", route="/api/health", status="200"})',
            lambda r: float(r[0]["value"][1]) == 10,
        )
        eventually(prometheus, 'sluice_scheduler_leader{job="sluice-scheduler"}', lambda r: r[0]["value"][1] == "1")
        eventually(prometheus, 'sluice_worker_threads{job="sluice-worker"}', lambda r: float(r[0]["value"][1]) > 0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
