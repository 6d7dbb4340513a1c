"""``sluice dev`` on the embedded default, as a process: start, serve, stop with nothing left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import psycopg

from sluice_cli.embedded import EmbeddedServers
from sluice_common import users
from tests.e2e.helpers import free_port, http, wait_for


def test_sluice_dev_runs_everything_and_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SLUICE_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(SLUICE_DATA_DIR=str(data), SLUICE_API_BIND=f"127.0.0.1:{port}")
    log = (tmp_path / "dev.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "sluice_cli", "dev"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/ready", proc=proc)
        code, _, body = http("GET", f"{base}/api/health")
        assert code == 200
        assert json.loads(body) == {"status": "ok"}
        ready = json.loads(http("GET", f"{base}/api/ready")[2])
        assert ready["checks"] == {"database": "ok", "redis": "ok"}
        code, _, body = http("GET", f"{base}/metrics")
        assert code == 200
        assert b"sluice_queue_waiting " in body
        assert b'sluice_http_requests_total{method="GET",route="/api/health",status="200"}' in body

        token = (data / "dev-token").read_text().strip()
        found = EmbeddedServers(data)
        with psycopg.connect(found.postgres_url()) as conn:
            assert users.authenticate(conn, token).name == "dev"
        assert found.started == []  # found the running ones

        sluice = psutil.Process(proc.pid)
        children = sluice.children(recursive=True)
        assert len(children) >= 3  # api (plus its gunicorn workers), worker, scheduler
        pg_pid = found.postgres_pid()
        redis_pid = found.redis_pid()
        assert redis_pid is not None
        assert pg_pid is not None

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            EmbeddedServers(data).stop_all()
    log.seek(0)
    output = log.read()
    assert f"Metrics: {base}/metrics (API)" in output
    for prefix in ("api       |", "worker    |", "scheduler |"):
        assert prefix in output, output
    assert "Sluice stopped." in output
    survivors = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    assert not psutil.pid_exists(pg_pid)
    assert not psutil.pid_exists(redis_pid)
