"""Structured logs from real runs: a line logged inside a step names its run, workflow, step and
attempt, and nothing of the run is left in the context after it (the worker as wired in production)."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from sluice_common.logs import JsonFormatter, clear, current_context
from sluice_common.observe import BaseRunObserver, RunCreated, run_events
from sluice_scheduler.service import create_scheduler
from sluice_worker.service import create_worker
from tests.conftest import wait_until
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline

pytestmark = pytest.mark.integration


class Lines:
    """Every record of the process at INFO and above, formatted as the JSON lines a service writes."""

    def __init__(self) -> None:
        self.out = io.StringIO()
        self.handler = logging.StreamHandler(self.out)
        self.handler.setFormatter(JsonFormatter("worker"))

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def http_requests(self) -> list[dict[str, Any]]:
        # httpx logs each request it sends at INFO: a line logged inside the step that sent it.
        return [line for line in self.all() if line["logger"] == "httpx"]


@pytest.fixture
def lines() -> Iterator[Lines]:
    captured = Lines()
    root, httpx_log = logging.getLogger(), logging.getLogger("httpx")
    saved = httpx_log.level
    root.addHandler(captured.handler)
    httpx_log.setLevel(logging.INFO)
    clear()
    yield captured
    root.removeHandler(captured.handler)
    httpx_log.setLevel(saved)
    clear()


def test_a_line_inside_a_step_names_the_run_and_the_context_is_empty_after(
    pipeline: Pipeline, http_server: LocalServer, lines: Lines
) -> None:
    owner = pipeline.user()
    steps = [
        {"id": "first", "type": "transform", "config": {"value": 1}},
        {"id": "fetch", "type": "http", "config": {"url": f"{http_server.base}/ok?key=logs"}},
    ]
    wf = pipeline.workflow(owner, steps)
    run_id = str(pipeline.enqueue(wf, owner).run_id)
    app = create_worker(pipeline.settings, pipeline.pool, pipeline.broker, pipeline.limiter, worker_id="logs-test")

    app.executor.handle(run_id)  # on this thread, as a Dramatiq thread would

    assert pipeline.run(run_id)["status"] == "succeeded"
    [line] = lines.http_requests()
    assert line["run_id"] == run_id
    assert line["workflow_id"] == wf
    assert line["step_id"] == "fetch"
    assert line["attempt"] == 1
    assert line["service"] == "worker"
    assert current_context() == {}


def test_a_failed_attempt_and_its_retry_each_carry_their_own_attempt(
    pipeline: Pipeline, http_server: LocalServer, lines: Lines
) -> None:
    owner = pipeline.user()
    steps = [{"id": "f", "type": "http", "config": {"url": f"{http_server.base}/fail?key=lf"}}]
    wf = pipeline.workflow(owner, steps, maxAttempts=2)
    run_id = str(pipeline.enqueue(wf, owner).run_id)
    pipeline.start_worker(threads=1)  # Dramatiq's thread, reused for the retry

    pipeline.wait_for([run_id], {"failed"})

    requests = lines.http_requests()
    assert [(line["run_id"], line["workflow_id"], line["step_id"]) for line in requests] == [(run_id, wf, "f")] * 2
    assert [line["attempt"] for line in requests] == [1, 2]
    # Outside a run the worker thread's lines carry no run (Dramatiq's own, the worker's).
    assert all("run_id" not in line for line in lines.all() if line["logger"] != "httpx")


class LoggingObserver(BaseRunObserver):
    """An observer that logs each run created, as a run-events observer may."""

    def run_created(self, event: RunCreated) -> None:
        logging.getLogger("sluice.test.observer").warning("created %s", event.run_id)


def test_a_cron_fire_names_its_workflow_and_then_its_run(pipeline: Pipeline, lines: Lines) -> None:
    owner = pipeline.user()
    # Every second, last scheduled a minute ago: the first turn warns of the slots missed meanwhile.
    trigger = {"type": "cron", "config": {"schedule": "* * * * * *", "missed": "skip"}}
    with pipeline.pool.connection() as conn:
        row = conn.execute(
            "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps, created_at, updated_at) "
            "VALUES (%s, 'cron', 'cron', %s, %s, now() - interval '60 seconds', now() - interval '60 seconds') "
            "RETURNING id",
            (owner, Jsonb(trigger), Jsonb([{"id": "a", "type": "transform", "config": {"value": 1}}])),
        ).fetchone()
    assert row is not None
    wf = str(row["id"])
    observer = LoggingObserver()
    run_events.add(observer)
    stopping = threading.Event()
    settings = pipeline.settings.model_copy(update={"cron_late_tolerance_seconds": 2.0})
    sched = create_scheduler(settings, pipeline.pool, pipeline.new_broker(), pipeline.redis)
    try:
        sched.start(stopping)
        created = wait_until(lambda: [line for line in lines.all() if line["logger"] == "sluice.test.observer"])
    finally:
        stopping.set()
        sched.join()
        run_events.remove(observer)
    [missed] = [line for line in lines.all() if "missed" in line["message"]]
    assert missed["workflow_id"] == wf
    assert "run_id" not in missed
    first = created[0]
    assert first["workflow_id"] == wf
    assert first["message"] == f"created {first['run_id']}"
    assert str(pipeline.run(first["run_id"])["workflow_id"]) == wf
