"""``sluice api`` alone against the run's servers, through real HTTP via gunicorn."""

from __future__ import annotations

import json
import signal

from sluice_common.users import new_token
from tests.conftest import sluice, start_sluice
from tests.e2e.helpers import free_port, http, stop, wait_for


def test_api_serves_health_ready_and_problems(service_env: dict[str, str]) -> None:
    port = free_port()
    env = {**service_env, "SLUICE_API_BIND": f"127.0.0.1:{port}", "SLUICE_API_WORKERS": "1"}
    proc = start_sluice(env, "api")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/ready", proc=proc)
        code, headers, body = http("GET", f"{base}/api/no-such-thing")
        assert code == 404
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(body)["status"] == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_setting_stops_start_up_naming_the_variable(service_env: dict[str, str]) -> None:
    env = {**service_env, "SLUICE_API_BIND": "nowhere"}
    result = sluice(env, "api", check=False)
    assert result.returncode != 0
    assert "SLUICE_API_BIND" in result.stderr


def test_api_workers_booted_while_postgresql_is_down_come_up_and_answer_503(service_env: dict[str, str]) -> None:
    # gunicorn stops the whole API when a worker fails to boot, and it boots one whenever another
    # died: during an outage that worker must come up, say it is not ready and refuse with 503.
    port, nothing_there = free_port(), free_port()
    env = {
        **service_env,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{nothing_there}/sluice",
        "SLUICE_API_BIND": f"127.0.0.1:{port}",
        "SLUICE_API_WORKERS": "1",
        "SLUICE_DB_POOL_TIMEOUT_SECONDS": "1",
    }
    proc = start_sluice(env, "api")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/health", proc=proc, timeout=30)
        code, _, body = http("GET", f"{base}/api/ready")
        assert code == 503
        assert json.loads(body)["checks"]["database"].startswith("error"), body
        code, headers, body = http("GET", f"{base}/api/workflows", headers={"Authorization": f"Bearer {new_token()}"})
        assert code == 503, body
        assert headers["content-type"] == "application/problem+json"
        assert headers.get("retry-after")
        assert proc.poll() is None
    finally:
        stop(proc)
