"""One trace per run, across the API, the worker and the scheduler, each running as a process.

The three services export to a real OTLP/HTTP receiver running in the test (which decodes the
protobuf export requests); an ``http`` step calls a real local server. The run is started by a
caller that sends its own ``traceparent``; its wake-up is then lost (deleted from Redis before any
worker runs), so the scheduler's reconciler sends another. The workflow calls the server, fails
once (a retried attempt), waits in a delay step (a parked and resumed run) and starts a
sub-workflow. All of it must land in the caller's trace with the parent links described in
``sluice_common.tracing``, and the server must have received the same trace id. A cron
workflow's trace starts in the scheduler.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from sluice_common import users
from sluice_common.broker import RUN_QUEUE
from tests.conftest import SLUICE, Servers, process_env, wait_until
from tests.e2e.helpers import Stack, free_port, wait_for
from tests.httpserver import LocalServer
from tests.otlp import OtlpReceiver, ReceivedSpan, receive

pytestmark = pytest.mark.e2e

CALLER_TRACE = uuid.uuid4().hex
CALLER_SPAN = uuid.uuid4().hex[:16]
HOOK_TRACE = uuid.uuid4().hex
SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # span kinds in OTLP
ERROR = 2


@pytest.fixture
def receiver() -> Any:
    with receive() as r:
        yield r


def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def run_done(client: httpx.Client, run_id: str) -> dict[str, Any] | None:
    body: dict[str, Any] = client.get(f"/api/runs/{run_id}").json()
    return body if body["status"] in ("succeeded", "failed", "cancelled") else None


def test_one_trace_from_the_request_to_every_step_and_call(
    servers: Servers,
    module_database: str,
    redis_prefix: str,
    stack: Stack,
    tmp_path: Path,
    http_server: LocalServer,
    receiver: OtlpReceiver,
) -> None:
    prefix = f"{redis_prefix}_trace{free_port()}"
    api_port = free_port()
    env = process_env(
        module_database,
        servers.redis_url,
        prefix,
        SLUICE_DATA_DIR=str(tmp_path / "data"),
        SLUICE_API_BIND=f"127.0.0.1:{api_port}",
        SLUICE_API_WORKERS="2",
        SLUICE_HTTP_ALLOW_PRIVATE="true",
        SLUICE_RETRY_BACKOFF_MIN_MS="50",
        SLUICE_RETRY_BACKOFF_MAX_MS="100",
        SLUICE_RECONCILE_SECONDS="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        SLUICE_LOG_FORMAT="json",
    )
    base = f"http://127.0.0.1:{api_port}"
    api = stack.start("api", [*SLUICE, "api"], env)
    stack.start("scheduler", [*SLUICE, "scheduler"], env)
    try:
        wait_for(f"{base}/api/ready", proc=api)
        with psycopg.connect(module_database, autocommit=True) as conn:
            token = users.create_user(conn, f"t{uuid.uuid4().hex[:10]}").token
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=15)

        def workflow(body: dict[str, Any]) -> str:
            created = client.post("/api/workflows", json=body)
            assert created.status_code == 201, created.text
            return str(created.json()["id"])

        child_wf = workflow(
            {
                "name": "traced child",
                "trigger": {"type": "manual"},
                "steps": [{"id": "inner", "type": "transform", "config": {"value": 1}}],
            }
        )
        key = uuid.uuid4().hex[:8]
        traced_wf = workflow(
            {
                "name": "traced",
                "trigger": {"type": "manual"},
                "settings": {"maxAttempts": 3},
                "steps": [
                    {"id": "fetch", "type": "http", "config": {"url": f"{http_server.base}/ok?key=ok-{key}"}},
                    {"id": "flaky", "type": "http", "config": {"url": f"{http_server.base}/flaky?fail=1&key=f-{key}"}},
                    {"id": "wait", "type": "delay", "config": {"seconds": 1}},
                    {"id": "sub", "type": "workflow", "config": {"workflowId": child_wf}},
                ],
            }
        )
        started = client.post(
            f"/api/workflows/{traced_wf}/run", json={}, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        )
        assert started.status_code == 202, started.text
        run_id = started.json()["runId"]

        # Lose the wake-up before any worker runs: the reconciler (in the scheduler) sends another.
        queue = redis.Redis.from_url(servers.redis_url)
        msgs = f"{prefix}:dramatiq:{RUN_QUEUE}.msgs"
        wait_until(lambda: queue.hlen(msgs) >= 1, timeout=10)
        queue.delete(f"{prefix}:dramatiq:{RUN_QUEUE}", msgs)
        stack.start("worker", [*SLUICE, "worker"], env)

        run = wait_until(lambda: run_done(client, run_id), timeout=60, interval=0.2)
        assert run["status"] == "succeeded", run
        assert run["traceId"] == CALLER_TRACE

        # A webhook call continues its caller's trace too; the secret in its URL never reaches a span.
        hook = client.post(
            "/api/workflows",
            json={
                "name": "traced hook",
                "trigger": {"type": "webhook"},
                "steps": [{"id": "echo", "type": "transform", "config": {"value": 1}}],
            },
        ).json()
        hook_url = hook["webhook"]["url"]
        secret = hook_url.rsplit("/", 1)[1]
        hooked = httpx.post(hook_url, json={"a": 1}, headers={"traceparent": f"00-{HOOK_TRACE}-{CALLER_SPAN}-01"})
        assert hooked.status_code == 202, hooked.text
        hook_run = wait_until(lambda: run_done(client, hooked.json()["runId"]), timeout=30, interval=0.2)
        assert hook_run["traceId"] == HOOK_TRACE

        cron_wf = workflow(
            {
                "name": "traced cron",
                "trigger": {"type": "cron", "config": {"schedule": "* * * * * *", "timezone": "UTC"}},
                "steps": [{"id": "tick", "type": "transform", "config": {"value": 1}}],
            }
        )

        def cron_traced() -> list[ReceivedSpan] | None:
            spans = receiver.received()
            fires = [s for s in spans if s.name == "cron fire" and s.attributes.get("sluice.workflow.id") == cron_wf]
            for fire in fires:
                trace = [s for s in spans if s.trace_id == fire.trace_id]
                if any(s.kind == CONSUMER for s in trace):
                    return trace
            return None

        cron_trace = wait_until(cron_traced, timeout=30, interval=0.2)
        assert client.patch(f"/api/workflows/{cron_wf}", json={"status": "paused"}).status_code == 200

        def complete() -> list[ReceivedSpan] | None:
            spans = [s for s in receiver.received() if s.trace_id == CALLER_TRACE]
            consumers = [s for s in spans if s.kind == CONSUMER]
            # attempt 1 (retried), attempt 2 (parked: delay), resumed (parked: sub-workflow), the child, the end
            return spans if len(consumers) >= 5 and any(s.name == "step inner" for s in spans) else None

        spans = wait_until(complete, timeout=30, interval=0.2)
        hook_spans = wait_until(
            lambda: (
                [s for s in receiver.received() if s.trace_id == HOOK_TRACE and s.kind == CONSUMER]
                and [s for s in receiver.received() if s.trace_id == HOOK_TRACE]
            ),
            timeout=30,
            interval=0.2,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None

    ids = by_id(spans)
    assert {s.service for s in spans} == {"sluice-api", "sluice-worker", "sluice-scheduler"}

    # The request: a server span under the caller's span, and the run's create span under it.
    (request,) = [s for s in spans if s.kind == SERVER]
    assert request.service == "sluice-api"
    assert request.parent_span_id == CALLER_SPAN
    assert request.name == "POST /api/workflows/{workflow_id:uuid}/run"
    creates = [s for s in spans if s.name == "create sluice.runs"]
    (create,) = [s for s in creates if s.attributes["messaging.message.id"] == run_id]
    assert create.kind == PRODUCER
    assert create.service == "sluice-api"
    assert create.parent_span_id == request.span_id
    assert create.attributes["messaging.operation.type"] == "create"
    assert create.attributes["messaging.destination.name"] == "sluice.runs"

    # The reconciler's wake-up is in the run's trace.
    resends = [s for s in spans if s.service == "sluice-scheduler" and s.name == "send sluice.runs"]
    assert resends
    assert all(
        s.parent_span_id == create.span_id and s.attributes["sluice.wakeup.reason"] == "reconciler" for s in resends
    )

    # Every execution of the run is a consumer span under its create span.
    attempts = [s for s in spans if s.kind == CONSUMER and s.attributes["messaging.message.id"] == run_id]
    assert all(a.parent_span_id == create.span_id for a in attempts)
    outcomes = Counter(str(a.attributes["sluice.run.outcome"]) for a in attempts)
    assert outcomes == Counter({"retried": 1, "parked": 2, "succeeded": 1})
    assert all(a.attributes["messaging.operation.type"] == "process" for a in attempts)
    first = next(a for a in attempts if a.attributes["sluice.run.outcome"] == "retried")
    assert first.attributes["sluice.run.attempt"] == 1
    assert first.status_code == ERROR

    # Steps under their execution; the failed one recorded as an error.
    steps = [s for s in spans if s.name.startswith("step ")]
    assert all(ids[s.parent_span_id].kind == CONSUMER for s in steps)
    failed = [s for s in steps if s.name == "step flaky" and s.status_code == ERROR]
    assert len(failed) == 1
    assert ids[failed[0].parent_span_id].span_id == first.span_id
    assert failed[0].attributes["sluice.step.type"] == "http"

    # The outgoing calls: client spans under their steps, and the target saw the same trace.
    calls = [s for s in spans if s.kind == CLIENT]
    assert {ids[c.parent_span_id].name for c in calls} == {"step fetch", "step flaky"}
    (fetch_call,) = [c for c in calls if ids[c.parent_span_id].name == "step fetch"]
    (received,) = http_server.headers[f"ok-{key}"]
    version, trace_id, parent_id, _ = received["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", CALLER_TRACE, fetch_call.span_id)
    assert all(h["traceparent"].split("-")[1] == CALLER_TRACE for h in http_server.headers[f"f-{key}"])

    # The sub-workflow run is created under the step that started it, and runs in the same trace.
    (sub_step,) = [s for s in steps if s.name == "step sub" and s.attributes["sluice.step.outcome"] == "parked"]
    (child_create,) = [s for s in creates if s.parent_span_id == sub_step.span_id]
    assert child_create.service == "sluice-worker"
    child_attempts = [s for s in spans if s.kind == CONSUMER and s.parent_span_id == child_create.span_id]
    assert [a.attributes["sluice.run.outcome"] for a in child_attempts] == ["succeeded"]

    (hook_request,) = [s for s in hook_spans if s.kind == SERVER]
    assert hook_request.parent_span_id == CALLER_SPAN
    assert hook_request.name == "POST /api/hooks/{secret}"
    assert secret not in repr(receiver.received())

    # The worker's log line of the failed step names the run and the step span it was logged in.
    lines = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines() if line.startswith("{")]
    (logged,) = [line for line in lines if line["message"].startswith("step flaky (http) failed")]
    assert (logged["run_id"], logged["step_id"], logged["attempt"]) == (run_id, "flaky", 1)
    assert (logged["trace_id"], logged["span_id"]) == (CALLER_TRACE, failed[0].span_id)

    # A cron run's trace starts with the scheduler's fire.
    roots = [s for s in cron_trace if not s.parent_span_id]
    assert [(r.name, r.service) for r in roots] == [("cron fire", "sluice-scheduler")]
    cron_ids = by_id(cron_trace)
    cron_create = next(s for s in cron_trace if s.name == "create sluice.runs")
    assert cron_create.service == "sluice-scheduler"
    assert cron_create.parent_span_id == roots[0].span_id
    consumer = next(s for s in cron_trace if s.kind == CONSUMER)
    assert cron_ids[consumer.parent_span_id] == cron_create
    assert consumer.attributes["sluice.run.trigger"] == "cron"
