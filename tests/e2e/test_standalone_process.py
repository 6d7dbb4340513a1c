"""``sluice standalone`` as a process: one process, PostgreSQL only, stops cleanly."""

from __future__ import annotations

import json
import signal
import time

import psutil
import psycopg

from sluice_common import users
from tests.conftest import start_sluice
from tests.e2e.helpers import free_port, http, wait_for


def test_standalone_serves_without_redis(service_env: dict[str, str]) -> None:
    port = free_port()
    env = {k: v for k, v in service_env.items() if k != "REDIS_URL"}
    env["SLUICE_API_BIND"] = f"127.0.0.1:{port}"
    proc = start_sluice(env, "standalone")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/ready", proc=proc)
        body = json.loads(http("GET", f"http://127.0.0.1:{port}/api/ready")[2])
        assert body["checks"] == {"database": "ok", "redis": "not used (standalone)"}
        # The seeds' run call and stats, without Redis: the run is queued and executed in-process.
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            token = users.create_user(conn, f"solo{port}").token
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        workflow = {
            "name": "solo",
            "trigger": {"type": "manual"},
            "steps": [{"id": "a", "type": "transform", "config": {"value": 7}}],
        }
        code, _, created = http("POST", f"{base}/api/workflows", json.dumps(workflow).encode(), auth)
        assert code == 201
        wf_id = json.loads(created)["id"]
        code, _, queued = http("POST", f"{base}/api/workflows/{wf_id}/run", b"{}", auth)
        assert code == 202
        assert json.loads(queued)["message"] == "Workflow queued for execution"
        run_url = f"{base}/api/runs/{json.loads(queued)['runId']}"
        deadline = time.monotonic() + 30
        while json.loads(http("GET", run_url, None, auth)[2])["status"] != "succeeded":
            assert time.monotonic() < deadline, "the standalone run did not finish"
            time.sleep(0.1)
        stats = json.loads(http("GET", f"{base}/api/workflows/queue/stats")[2])
        assert stats["queue"]["redis"] is False
        assert stats["queue"]["stats"]["completed"] >= 1
        assert stats["capacity"] == {"recommendation": "Set REDIS_URL to enable queued execution"}
        # One process: no children (no gunicorn workers, no separate services).
        assert psutil.Process(proc.pid).children(recursive=True) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
