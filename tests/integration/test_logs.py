"""Structured logs from real runs: a line logged inside a step names its run, workflow, step and
attempt, and nothing of the run is left in the context after it (the worker as wired in production)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from sluice_common.logs import JsonFormatter, clear, current_context
from sluice_worker.service import create_worker
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
