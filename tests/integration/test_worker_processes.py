"""Worker processes killed and stopped for real: nothing is lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from psycopg.types.json import Jsonb

from tests.conftest import process_env
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def spawn(pipeline: Pipeline) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []
    env = process_env(
        pipeline.settings.database_url or "",
        pipeline.redis_url,
        pipeline.settings.redis_prefix,
        SLUICE_LEASE_SECONDS="3",
        SLUICE_CONCURRENCY="2",
        SLUICE_RATE_LIMIT_PER_MINUTE="100000",
        SLUICE_HTTP_ALLOW_PRIVATE="true",  # the test HTTP server is on 127.0.0.1
    )

    def start(service: str = "worker", stderr: int | None = None, **settings: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", f"sluice_{service}"], env=env | settings, stderr=stderr)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sigkilled_workers_run_completes_elsewhere(
    pipeline: Pipeline, http_server: LocalServer, spawn: object
) -> None:
    owner = pipeline.user()
    steps = [
        {"id": "first", "type": "http", "config": {"url": f"{http_server.base}/ok?key=k1"}},
        {"id": "slow", "type": "http", "config": {"url": f"{http_server.base}/slow?s=3&key=k2"}},
    ]
    wf = pipeline.workflow(owner, steps)
    victim = spawn()  # type: ignore[operator]
    run = pipeline.enqueue(wf, owner)
    pipeline.wait_for([run.run_id], {"running"}, timeout=30)
    deadline = time.monotonic() + 10
    while http_server.hits["k2"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_server.hits["k2"] == 1  # killed in the middle of its second step
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    spawn()  # type: ignore[operator]
    [done] = pipeline.wait_for([run.run_id], TERMINAL, timeout=60)
    assert time.monotonic() - killed_at < 60
    assert done["status"] == "succeeded"
    assert done["attempt"] == 2
    attempts = pipeline.attempts(run.run_id)
    assert [a["status"] for a in attempts] == ["failed", "succeeded"]
    assert "worker lost" in attempts[0]["error"]
    assert attempts[0]["worker_id"] != attempts[1]["worker_id"]
    assert http_server.hits["k1"] == 1  # the checkpointed first step was not repeated
    assert http_server.hits["k2"] == 2


def test_a_run_recovered_from_a_killed_worker_executes_the_version_it_started_with(
    pipeline: Pipeline, http_server: LocalServer, spawn: object
) -> None:
    owner = pipeline.user()
    steps = [
        {"id": "first", "type": "http", "config": {"url": f"{http_server.base}/ok?key=v1-first"}},
        {"id": "slow", "type": "http", "config": {"url": f"{http_server.base}/slow?s=3&key=v1-slow"}},
    ]
    wf = pipeline.workflow(owner, steps)
    victim = spawn()  # type: ignore[operator]
    run = pipeline.enqueue(wf, owner)
    deadline = time.monotonic() + 20
    while http_server.hits["v1-slow"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    edited = [{"id": "other", "type": "http", "config": {"url": f"{http_server.base}/ok?key=v2-other"}}]
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET steps = %s, version = version + 1 WHERE id = %s", (Jsonb(edited), wf))
    spawn()  # type: ignore[operator]
    [done] = pipeline.wait_for([run.run_id], TERMINAL, timeout=60)
    assert (done["status"], done["attempt"], done["workflow_version"]) == ("succeeded", 2, 1)
    assert [s["step_id"] for s in pipeline.steps(run.run_id)] == ["first", "slow"]
    assert http_server.hits["v1-first"] == 1
    assert http_server.hits["v1-slow"] == 2
    assert http_server.hits["v2-other"] == 0


def test_sigterm_lets_the_worker_finish_and_exit(pipeline: Pipeline, http_server: LocalServer, spawn: object) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "s", "type": "http", "config": {"url": f"{http_server.base}/slow?s=1"}}])
    worker = spawn()  # type: ignore[operator]
    run = pipeline.enqueue(wf, owner)
    pipeline.wait_for([run.run_id], {"running"}, timeout=30)
    # Signalled once the step is under way (a signal between the claim and the first step hands
    # the run back instead, which another test covers).
    deadline = time.monotonic() + 10
    while http_server.hits["/slow"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    row = pipeline.run(run.run_id)
    assert (row["status"], row["attempt"]) == ("succeeded", 1)


def test_sigterm_waits_for_a_step_no_longer_than_the_grace_and_names_the_run_it_leaves(
    pipeline: Pipeline, http_server: LocalServer, spawn: object
) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "s", "type": "http", "config": {"url": f"{http_server.base}/slow?s=6"}}])
    worker = spawn(stderr=subprocess.PIPE, SLUICE_STOP_GRACE_SECONDS="1")  # type: ignore[operator]
    run = pipeline.enqueue(wf, owner)
    pipeline.wait_for([run.run_id], {"running"}, timeout=30)
    deadline = time.monotonic() + 10
    while http_server.hits["/slow"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    took = time.monotonic() - signalled
    assert worker.returncode == 0
    assert took < 5  # the grace, not the 6 s step
    assert f"still in a step after 1 s (SLUICE_STOP_GRACE_SECONDS): {run.run_id}" in err.decode()
    # Left running, with its lease: recovery takes it once the lease lapses.
    assert pipeline.run(run.run_id)["status"] == "running"


def test_scheduler_maintenance_wakes_runs_redis_lost(pipeline: Pipeline, spawn: object) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "a", "type": "transform", "config": {"value": 1}}])
    runs = [pipeline.enqueue(wf, owner).run_id for _ in range(3)]
    keys = list(pipeline.redis.scan_iter(match=f"{pipeline.settings.redis_prefix}*"))
    pipeline.redis.delete(*keys)
    spawn("worker")  # type: ignore[operator]
    spawn("scheduler")  # type: ignore[operator]
    rows = pipeline.wait_for(runs, TERMINAL, timeout=30)
    assert all(r["status"] == "succeeded" for r in rows)
