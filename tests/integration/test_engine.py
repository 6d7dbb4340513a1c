"""The workflow engine inside the real pipeline: PostgreSQL, Redis, Dramatiq workers, a local HTTP server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from psycopg.types.json import Jsonb

import sluice_worker.executor as executor_module
from sluice_api.resources.queue import queue_stats_body
from sluice_common.runs import cancel_run, get_queue_stats
from sluice_common.secrets import generate_key, put_secret
from sluice_worker.checkpoints import PgStepStore
from sluice_worker.service import create_worker
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline

TERMINAL = {"succeeded", "failed", "cancelled"}


def outputs(pipeline: Pipeline, run_id: object) -> dict[str, Any]:
    return {s["step_id"]: s["output"] for s in pipeline.steps(run_id)}


def test_a_step_uses_the_json_of_an_earlier_step(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    steps = [
        {"id": "first", "type": "http", "config": {"url": "{{ vars.base }}/ok", "query": {"key": "{{ trigger.key }}"}}},
        {
            "id": "second",
            "type": "http",
            "config": {
                "method": "POST",
                "url": "{{ vars.base }}/ok?key={{ steps.first.body.key }}-2",
                "json": {"hit": "{{ steps.first.body.hit }}"},
            },
        },
        {
            "id": "shape",
            "type": "transform",
            "config": {
                "value": {
                    "keys": ["{{ steps.first.body.key }}", "{{ steps.second.body.key }}"],
                    "ok": "{{ steps.second.status == 200 }}",
                }
            },
        },
    ]
    wf = pipeline.workflow(owner, steps, variables={"base": http_server.base})
    run = pipeline.enqueue(wf, owner, trigger_data={"key": "multi"})
    pipeline.start_worker()
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "succeeded", row["error"]
    assert outputs(pipeline, run.run_id)["shape"] == {"keys": ["multi", "multi-2"], "ok": True}
    assert http_server.hits["multi"] == http_server.hits["multi-2"] == 1


class Crash(BaseException):
    """The worker process dying between two steps (not an error the engine could catch)."""


def test_resume_after_a_crash_between_steps_skips_the_finished_step(
    pipeline: Pipeline, http_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = pipeline.user()
    steps = [
        {"id": "first", "type": "http", "config": {"url": f"{http_server.base}/ok?key=crash"}},
        {"id": "second", "type": "transform", "config": {"value": {"seen": "{{ steps.first.body.hit }}"}}},
    ]
    wf = pipeline.workflow(owner, steps)
    run = pipeline.enqueue(wf, owner)

    class CrashAfterFirst(PgStepStore):
        def succeeded(self, step_id: str, position: int, output: Any, started_at: Any) -> None:
            super().succeeded(step_id, position, output, started_at)
            if step_id == "first":
                raise Crash

    dying = create_worker(pipeline.settings, pipeline.pool, pipeline.new_broker(), pipeline.limiter, threads=1)
    claimed = dying.executor.claim()
    assert claimed is not None
    assert str(claimed.run_id) == str(run.run_id)
    with monkeypatch.context() as patch:
        patch.setattr(executor_module, "PgStepStore", CrashAfterFirst)
        with pytest.raises(Crash):
            dying.executor.run(claimed)
    assert pipeline.run(run.run_id)["status"] == "running"  # nobody finished it: the lease lapses
    assert [s["step_id"] for s in pipeline.steps(run.run_id)] == ["first"]

    pipeline.start_worker()  # recovers the run once its lease lapses, then resumes it
    [row] = pipeline.wait_for([run.run_id], TERMINAL, timeout=30)
    assert row["status"] == "succeeded", row["error"]
    assert row["attempt"] == 2
    assert http_server.hits["crash"] == 1  # the first step was not executed again
    assert outputs(pipeline, run.run_id)["second"] == {"seen": 1}


def test_a_durable_delay_does_not_hold_the_only_worker_thread(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    delayed_wf = pipeline.workflow(
        owner,
        [
            {"id": "wait", "type": "delay", "config": {"seconds": 2}},
            {"id": "after", "type": "transform", "config": {"value": "done"}},
        ],
    )
    hour_wf = pipeline.workflow(owner, [{"id": "wait", "type": "delay", "config": {"seconds": 3600}}])
    quick_wf = pipeline.workflow(owner, [{"id": "a", "type": "transform", "config": {"value": 1}}])
    pipeline.start_worker(threads=1, user_concurrency=1000)
    hours = [pipeline.enqueue(hour_wf, owner).run_id for _ in range(100)]
    delayed = pipeline.enqueue(delayed_wf, owner)
    pipeline.wait_for([delayed.run_id, *hours], {"delayed"}, timeout=30)
    parked_at = time.monotonic()
    quick = pipeline.enqueue(quick_wf, owner)
    [done] = pipeline.wait_for([quick.run_id], TERMINAL, timeout=10)
    assert done["status"] == "succeeded"
    assert pipeline.run(delayed.run_id)["status"] == "delayed"  # the quick run went past it
    [row] = pipeline.wait_for([delayed.run_id], TERMINAL, timeout=15)
    assert row["status"] == "succeeded", row["error"]
    assert time.monotonic() - parked_at < 5
    assert row["finished_at"] >= done["finished_at"]
    assert row["attempt"] == 1  # parking used no attempt
    assert [a["status"] for a in pipeline.attempts(delayed.run_id)] == ["succeeded"]
    recorded = {s["step_id"]: s for s in pipeline.steps(delayed.run_id)}
    assert recorded["wait"]["status"] == "succeeded"
    assert (row["finished_at"] - row["queued_at"]).total_seconds() >= 2
    # The 100 one-hour delays are parked, not running, and used no attempt.
    rows = [pipeline.run(r) for r in hours]
    assert {(r["status"], r["attempt"]) for r in rows} == {("delayed", 0)}
    assert {s["status"] for r in hours for s in pipeline.steps(r)} == {"waiting"}


def self_referencing(pipeline: Pipeline, owner: str, steps: Callable[[str], list[dict[str, Any]]]) -> str:
    wf = pipeline.workflow(owner, [{"id": "x", "type": "transform", "config": {"value": 0}}])
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET steps = %s, version = version + 1 WHERE id = %s", (Jsonb(steps(wf)), wf))
    return wf


def test_a_sub_workflow_result_is_used_by_the_parent(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    child_wf = pipeline.workflow(
        owner,
        [
            {"id": "pause", "type": "delay", "config": {"seconds": 0.5}},
            {"id": "double", "type": "transform", "config": {"value": {"doubled": "{{ trigger.n * 2 }}"}}},
        ],
    )
    parent_wf = pipeline.workflow(
        owner,
        [
            {
                "id": "sub",
                "type": "workflow",
                "config": {"workflowId": child_wf, "triggerData": {"n": "{{ trigger.n }}"}},
            },
            {"id": "use", "type": "transform", "config": {"value": "{{ steps.sub.output.doubled + 1 }}"}},
        ],
    )
    pipeline.start_worker(threads=1)  # the parent must not hold the only thread while its child runs
    run = pipeline.enqueue(parent_wf, owner, trigger_data={"n": 21})
    [row] = pipeline.wait_for([run.run_id], TERMINAL, timeout=20)
    assert row["status"] == "succeeded", row["error"]
    assert row["attempt"] == 1
    found = outputs(pipeline, run.run_id)
    assert found["use"] == 43
    child_id = found["sub"]["runId"]
    assert found["sub"] == {"runId": child_id, "status": "succeeded", "output": {"doubled": 42}}
    child = pipeline.run(child_id)
    assert (str(child["parent_run_id"]), child["trigger_type"], child["trigger_data"]) == (
        str(run.run_id),
        "workflow",
        {"n": 21},
    )


def test_a_failing_child_fails_the_parent_step(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    child_wf = pipeline.workflow(owner, [{"id": "guard", "type": "fail", "config": {"message": "no input"}}])
    parent_wf = pipeline.workflow(
        owner, [{"id": "sub", "type": "workflow", "config": {"workflowId": child_wf}}], maxAttempts=1
    )
    pipeline.start_worker(threads=1)
    run = pipeline.enqueue(parent_wf, owner)
    [row] = pipeline.wait_for([run.run_id], TERMINAL, timeout=20)
    assert row["status"] == "failed"
    assert "step 'sub': sub-workflow run" in row["error"]
    assert "failed: step 'guard': no input" in row["error"]


def test_sub_workflows_cannot_recurse_forever(pipeline_factory: Callable[..., Pipeline]) -> None:
    pipeline = pipeline_factory(SLUICE_WORKFLOW_MAX_DEPTH="3")
    owner = pipeline.user()
    wf = self_referencing(
        pipeline, owner, lambda me: [{"id": "again", "type": "workflow", "config": {"workflowId": me}}]
    )
    pipeline.start_worker(threads=1)
    run = pipeline.enqueue(wf, owner)
    [row] = pipeline.wait_for([run.run_id], TERMINAL, timeout=30)
    assert row["status"] == "failed"
    with pipeline.pool.connection() as conn:
        count = conn.execute("SELECT count(*) AS n FROM runs WHERE workflow_id = %s", (wf,)).fetchone()
    assert count is not None
    assert count["n"] == 3  # the top run and two levels below it
    assert "nest 3 levels deep" in row["error"]


def test_a_waiting_parent_can_be_cancelled(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    child_wf = pipeline.workflow(owner, [{"id": "w", "type": "delay", "config": {"seconds": 3600}}])
    parent_wf = pipeline.workflow(owner, [{"id": "sub", "type": "workflow", "config": {"workflowId": child_wf}}])
    pipeline.start_worker(threads=1)
    run = pipeline.enqueue(parent_wf, owner)
    [row] = pipeline.wait_for([run.run_id], {"waiting"}, timeout=10)
    assert row["attempt"] == 0
    child_id = row["waiting_for"]
    pipeline.wait_for([child_id], {"delayed"}, timeout=10)  # parked on its delay step, not mid-step
    stats = get_queue_stats(pipeline.pool, pipeline.settings, pipeline.limiter, redis=True)
    assert stats.extra["waitingOnSubWorkflows"] == 1
    assert queue_stats_body(stats, {})["queue"]["waitingOnSubWorkflows"] == 1
    assert cancel_run(pipeline.pool, run.run_id, owner) == "cancelled"
    assert pipeline.run(run.run_id)["status"] == "cancelled"
    # The sub-workflow run it waited for goes with it.
    child = pipeline.run(child_id)
    assert (child["status"], child["error"]) == ("cancelled", "its parent run was cancelled")


def test_the_sweep_wakes_a_parent_whose_child_ended_outside_a_worker(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    child_wf = pipeline.workflow(owner, [{"id": "w", "type": "delay", "config": {"seconds": 3600}}])
    parent_wf = pipeline.workflow(
        owner, [{"id": "sub", "type": "workflow", "config": {"workflowId": child_wf}}], maxAttempts=1
    )
    # A long lease spaces the worker's own sweeps (a third of it) well beyond this test.
    app = pipeline.start_worker(threads=1, lease_seconds=90)
    run = pipeline.enqueue(parent_wf, owner)
    [row] = pipeline.wait_for([run.run_id], {"waiting"}, timeout=10)
    pipeline.wait_for([row["waiting_for"]], {"delayed"}, timeout=10)
    cancel_run(pipeline.pool, row["waiting_for"], owner)  # no worker finishes the child
    assert app.executor.wake_waiting() == 1
    [row] = pipeline.wait_for([run.run_id], TERMINAL, timeout=10)
    assert row["status"] == "failed"
    assert "cancelled" in row["error"]


def test_the_ssrf_guard_refuses_127_0_0_1_by_default(
    pipeline_factory: Callable[..., Pipeline], http_server: LocalServer
) -> None:
    pipeline = pipeline_factory(SLUICE_HTTP_ALLOW_PRIVATE="false")
    assert pipeline.settings.http_allow_private is False
    owner = pipeline.user()
    wf = pipeline.workflow(
        owner, [{"id": "call", "type": "http", "config": {"url": f"{http_server.base}/ok?key=ssrf"}}]
    )
    pipeline.start_worker()
    run = pipeline.enqueue(wf, owner)
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "failed"
    assert row["attempt"] == 1  # a refusal is final: retrying cannot help
    assert row["error"].startswith("step 'call': refused to connect to 127.0.0.1 (127.0.0.1): a loopback address")
    assert http_server.hits["ssrf"] == 0
    [step] = pipeline.steps(run.run_id)
    assert (step["status"], step["error"]) == ("failed", row["error"])


def test_secrets_are_used_in_steps_and_masked_in_what_is_stored(
    pipeline_factory: Callable[..., Pipeline], http_server: LocalServer
) -> None:
    pipeline = pipeline_factory(SLUICE_SECRET_KEY=generate_key())
    owner = pipeline.user()
    put_secret(pipeline.pool, pipeline.settings, owner, "API_KEY", "sk-test-9f8e7d")
    steps = [
        {
            "id": "call",
            "type": "http",
            "config": {
                "url": f"{http_server.base}/ok",
                "query": {"key": "{{ secrets.API_KEY }}"},
                "headers": {"Authorization": "Bearer {{ secrets.API_KEY }}"},
            },
        },
        {
            "id": "echo",
            "type": "transform",
            "config": {"value": {"key": "{{ secrets.API_KEY }}", "len": "{{ secrets.API_KEY | length }}"}},
        },
    ]
    wf = pipeline.workflow(owner, steps)
    pipeline.start_worker()
    run = pipeline.enqueue(wf, owner)
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "succeeded", row["error"]
    assert http_server.hits["sk-test-9f8e7d"] == 1  # the server got the real value
    found = outputs(pipeline, run.run_id)
    assert found["call"]["body"]["key"] == "***"  # the server's echo of it is masked
    assert found["echo"] == {"key": "***", "len": 14}
    with pipeline.pool.connection() as conn:
        stored = conn.execute("SELECT output::text AS t FROM run_steps WHERE run_id = %s", (run.run_id,)).fetchall()
    assert not any("sk-test-9f8e7d" in r["t"] for r in stored)


def test_large_step_outputs_are_truncated_not_fatal(pipeline_factory: Callable[..., Pipeline]) -> None:
    pipeline = pipeline_factory(SLUICE_STEP_OUTPUT_MAX_BYTES="4096")
    owner = pipeline.user()
    steps = [
        {"id": "big", "type": "transform", "config": {"value": "{{ 'x' * 90000 }}"}},
        {"id": "last", "type": "transform", "config": {"value": "{{ 'y' * 90000 }}"}},
    ]
    wf = pipeline.workflow(owner, steps)
    pipeline.start_worker()
    run = pipeline.enqueue(wf, owner)
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "succeeded", row["error"]
    for output in outputs(pipeline, run.run_id).values():
        assert (output["truncated"], output["bytes"], len(output["preview"])) == (True, 90002, 1024)
