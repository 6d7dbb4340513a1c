"""PostgreSQL crashes under the running services (a PostgreSQL of the test's own, never a shared one).

An outage longer than the lease: a run held by a live worker is not executed a second time, a
run request during the outage gets a quick 503 and writes nothing, and the services are back
within seconds of the database.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from sluice_cli.embedded import EmbeddedServers
from sluice_common import users
from sluice_common.db import migrate
from tests.conftest import SLUICE, Servers, process_env, wait_until
from tests.e2e.helpers import free_port, wait_for
from tests.httpserver import LocalServer, serve

pytestmark = pytest.mark.chaos

LEASE = 6
OUTAGE = 12  # seconds PostgreSQL is down: twice the lease


def start_postgres(data: Path) -> str:
    """Start (or restart) the test's PostgreSQL in a process of its own; return its URL.

    A fresh process each time: the embedded server's library remembers servers it started.
    """
    code = "import sys; from pathlib import Path; from sluice_cli.embedded import EmbeddedServers; "
    code += "print(EmbeddedServers(Path(sys.argv[1])).postgres_url())"
    done = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def crash_postgres(data: Path) -> None:
    """SIGQUIT: PostgreSQL's immediate shutdown, no checkpoint (recovery runs at the next start)."""
    pid = EmbeddedServers(data).postgres_pid()
    assert pid is not None
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("PostgreSQL did not stop")


@pytest.fixture
def target() -> Iterator[LocalServer]:
    with serve() as server:
        yield server


@pytest.mark.parametrize("claim", ["durable", "maybe_lost"])
def test_an_outage_longer_than_the_lease_loses_nothing_and_repeats_nothing(
    claim: str, tmp_path: Path, servers: Servers, redis_prefix: str, target: LocalServer
) -> None:
    """``durable``: the crash comes after the claim reached the disk; the live worker keeps its run.
    ``maybe_lost``: the crash comes as the step starts, so the claim (committed without waiting for
    the WAL flush) may be lost with it and the run claimed again: every execution is then recorded,
    and the run's result is the one execution that still holds it."""
    # Not under pytest's temporary root: pytest keeps that private to its user (0700), and the
    # embedded PostgreSQL runs as a user of its own when the tests run as root.
    data = Path(tempfile.mkdtemp(prefix="sluice-chaos-"))
    data.chmod(0o755)
    url = start_postgres(data)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            token = users.create_user(conn, "chaos").token
        port = free_port()
        env = process_env(
            url,
            servers.redis_url,
            f"{redis_prefix}_chaos{port}",
            SLUICE_DATA_DIR=str(tmp_path / "data"),
            SLUICE_API_BIND=f"127.0.0.1:{port}",
            SLUICE_LEASE_SECONDS=str(LEASE),
            SLUICE_RECONCILE_SECONDS="1",
            SLUICE_DB_POOL_TIMEOUT_SECONDS="3",
            SLUICE_HTTP_ALLOW_PRIVATE="true",
        )
        for service in ("api", "worker", "scheduler"):
            log = (logs / f"{service}.log").open("wb")
            procs.append(subprocess.Popen([*SLUICE, service], env=env, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/ready", proc=procs[0])
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        slow = f"{target.base}/slow?s={OUTAGE + LEASE + 4}&key=held"
        wf = client.post(
            "/api/workflows",
            json={
                "name": "held",
                "trigger": {"type": "manual"},
                "steps": [{"id": "s", "type": "http", "config": {"url": slow}}],
            },
        ).json()
        run_id = client.post(f"/api/workflows/{wf['id']}/run").json()["runId"]
        wait_until(lambda: target.hits["held"] == 1, 30)  # the worker is in the step's call
        if claim == "durable":
            # A commit that waits for the flush flushes every commit before it, the claim's too.
            with psycopg.connect(url, autocommit=True) as conn:
                users.create_user(conn, "flush")

        crash_postgres(data)
        down_at = time.monotonic()
        started = time.monotonic()
        refused = client.post(f"/api/workflows/{wf['id']}/run", json={"triggerData": {"during": "outage"}})
        answered_in = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.headers.get("retry-after")
        assert answered_in < 6, answered_in  # the pool waits 3 s at most; never half a minute

        time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
        start_postgres(data)
        back_at = time.monotonic()
        wait_for(f"{base}/api/ready", timeout=30)
        ready_in = time.monotonic() - back_at

        def finished() -> dict[str, object] | None:
            body: dict[str, object] = client.get(f"/api/runs/{run_id}").json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        run = wait_until(finished, OUTAGE + LEASE + 60)
        print(f"503 in {answered_in:.2f} s during the outage; API ready {ready_in:.2f} s after PostgreSQL")
        print(f"{claim}: attempts {run['attempts']}, {target.hits['held']} call(s) to the target")
        assert ready_in < 5
        assert (run["status"], run["attempt"]) == ("succeeded", 1), run
        attempts = run["attempts"]
        assert isinstance(attempts, list)
        if claim == "durable":
            assert target.hits["held"] == 1  # the live worker's run was not executed again elsewhere
            assert [(a["status"], a["lost"]) for a in attempts] == [("succeeded", False)]
        else:
            # Each execution of the step is on record: the one that holds the run, and any whose
            # claim the crash lost (its late finish refused, not the run's result).
            assert len(attempts) == target.hits["held"], attempts
            assert [a["lost"] for a in attempts if a["status"] == "succeeded"] == [False]
            assert sum(a["lost"] for a in attempts) == target.hits["held"] - 1
        runs = client.get(f"/api/workflows/{wf['id']}/runs").json()["items"]
        assert [r["id"] for r in runs] == [run_id]  # the refused request wrote nothing
    except BaseException:
        for log_file in sorted(logs.glob("*.log")):
            print(f"--- {log_file.name}", log_file.read_text(errors="replace")[-6000:], sep="\n")
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        EmbeddedServers(data).stop_postgres()
        shutil.rmtree(data, ignore_errors=True)
