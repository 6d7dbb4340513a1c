"""``sluice standalone`` as a process: one process, PostgreSQL only, stops cleanly."""

from __future__ import annotations

import json
import signal

import psutil

from tests.conftest import start_sluice
from tests.e2e.helpers import free_port, http, wait_for


def test_standalone_serves_without_redis(service_env: dict[str, str]) -> None:
    port = free_port()
    env = {k: v for k, v in service_env.items() if k != "REDIS_URL"}
    env["SLUICE_API_BIND"] = f"127.0.0.1:{port}"
    proc = start_sluice(env, "standalone")
    try:
        wait_for(f"http://127.0.0.1:{port}/api/ready", proc=proc)
        body = json.loads(http("GET", f"http://127.0.0.1:{port}/api/ready")[2])
        assert body["checks"] == {"database": "ok", "redis": "not used (standalone)"}
        # One process: no children (no gunicorn workers, no separate services).
        assert psutil.Process(proc.pid).children(recursive=True) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
