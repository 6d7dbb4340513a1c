"""Workflow versions through real HTTP and real worker processes: a run executes the version it was
queued with, whatever happens to the workflow afterwards."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import wait_until
from tests.e2e.conftest import Api
from tests.e2e.test_api import problem, wait_run
from tests.httpserver import LocalServer

FINISHED = {"succeeded", "failed", "cancelled"}


def transform(step_id: str) -> dict[str, Any]:
    return {"id": step_id, "type": "transform", "config": {"value": {"ran": step_id}}}


def manual(name: str, *steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "trigger": {"type": "manual"}, "steps": list(steps), **extra}


def create(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post("/api/workflows", json=body)
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


def replace(client: httpx.Client, workflow_id: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.put(f"/api/workflows/{workflow_id}", json=body)
    assert resp.status_code == 200, resp.text
    updated: dict[str, Any] = resp.json()
    return updated


def run(client: httpx.Client, workflow_id: str, **body: Any) -> str:
    resp = client.post(f"/api/workflows/{workflow_id}/run", json=body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["runId"])


def step_ids(run_body: dict[str, Any]) -> list[str]:
    return [s["stepId"] for s in run_body["steps"]]


def test_a_delayed_run_executes_the_version_it_was_queued_with(api: Api) -> None:
    _, client = api.user()
    wf = create(client, manual("pinned", transform("A")))
    assert wf["version"] == 1
    run_id = run(client, wf["id"], delay=4000)
    assert replace(client, wf["id"], manual("pinned", transform("B")))["version"] == 2

    done = wait_run(client, run_id, FINISHED)
    assert done["status"] == "succeeded", done
    assert done["workflowVersion"] == 1
    assert step_ids(done) == ["A"]
    assert done["steps"][0]["output"] == {"ran": "A"}
    assert "definition" not in done or done["definition"] is None

    with_definition = client.get(f"/api/runs/{run_id}", params={"include": "definition"}).json()
    assert with_definition["definition"]["version"] == 1
    assert [s["id"] for s in with_definition["definition"]["steps"]] == ["A"]
    problem(client.get(f"/api/runs/{run_id}", params={"include": "everything"}), 422)

    # A run queued now executes version 2.
    later = wait_run(client, run(client, wf["id"]), FINISHED)
    assert (later["workflowVersion"], step_ids(later)) == (2, ["B"])


def test_versions_are_listed_newest_first_in_pages_and_restored_by_a_put(api: Api) -> None:
    _, client = api.user()
    body = manual("history", transform("v1"), settings={"maxAttempts": 2})
    wf = create(client, body)
    for n in (2, 3, 4):
        replace(client, wf["id"], manual("history", transform(f"v{n}")))

    first = client.get(f"/api/workflows/{wf['id']}/versions", params={"limit": 2})
    assert first.status_code == 200, first.text
    page = first.json()
    assert [v["version"] for v in page["items"]] == [4, 3]
    assert page["nextCursor"]
    rest = client.get(f"/api/workflows/{wf['id']}/versions", params={"limit": 2, "cursor": page["nextCursor"]}).json()
    assert [v["version"] for v in rest["items"]] == [2, 1]
    assert rest["nextCursor"] is None

    one = client.get(f"/api/workflows/{wf['id']}/versions/1")
    assert one.status_code == 200
    v1 = one.json()
    assert v1["steps"] == [{**transform("v1")}]
    assert v1["settings"]["maxAttempts"] == 2
    assert v1["trigger"] == {"type": "manual", "config": {}}
    problem(client.get(f"/api/workflows/{wf['id']}/versions/5"), 404)
    problem(client.get(f"/api/workflows/{wf['id']}/versions", params={"cursor": "bm90IGEgY3Vyc29y"}), 422)

    # Restoring version 1 is a PUT of its body: it becomes version 5, the same definition.
    restore = {k: v1[k] for k in ("name", "trigger", "steps", "settings")}
    restored = replace(client, wf["id"], restore)
    assert restored["version"] == 5
    assert restored["steps"] == v1["steps"]
    assert restored["settings"] == v1["settings"]

    # Versions are the owner's: another user sees none of them.
    _, other = api.user()
    problem(other.get(f"/api/workflows/{wf['id']}/versions"), 404)
    problem(other.get(f"/api/workflows/{wf['id']}/versions/1"), 404)


def test_a_retry_after_an_edit_runs_the_failed_version_again(api: Api, http_server: LocalServer) -> None:
    _, client = api.user()
    flaky = f"{http_server.base}/flaky?fail=1&key=retry-{time.monotonic_ns()}"
    v1 = manual(
        "retried",
        transform("prepare"),
        {"id": "call", "type": "http", "config": {"url": flaky}},
        settings={"maxAttempts": 1},
    )
    wf = create(client, v1)
    run_id = run(client, wf["id"])
    failed = wait_run(client, run_id, FINISHED)
    assert failed["status"] == "failed", failed
    replace(client, wf["id"], manual("retried", transform("other")))

    assert client.post(f"/api/runs/{run_id}/retry").status_code == 202
    done = wait_run(client, run_id, FINISHED)
    assert done["status"] == "succeeded", done
    assert done["workflowVersion"] == 1
    assert step_ids(done) == ["prepare", "call"]
    steps = {s["stepId"]: s for s in done["steps"]}
    assert steps["prepare"]["attempt"] == 1  # checkpointed by the first attempt, not repeated
    assert steps["call"]["attempt"] == 2


def test_an_automatic_retry_after_an_edit_runs_the_version_the_run_was_queued_with(
    api: Api, http_server: LocalServer
) -> None:
    _, client = api.user()
    flaky = f"{http_server.base}/flaky?fail=1&key=auto-{time.monotonic_ns()}"
    wf = create(
        client,
        manual(
            "auto-retried",
            {"id": "call", "type": "http", "config": {"url": flaky}},
            settings={"maxAttempts": 2, "backoffMinMs": 3000, "backoffMaxMs": 3000},
        ),
    )
    run_id = run(client, wf["id"])

    def backing_off() -> bool:
        body = client.get(f"/api/runs/{run_id}").json()
        return body["status"] == "delayed" and body["attempt"] == 1

    wait_until(backing_off, 20)
    replace(client, wf["id"], manual("auto-retried", transform("other")))
    done = wait_run(client, run_id, FINISHED)
    assert (done["status"], done["attempt"], done["workflowVersion"]) == ("succeeded", 2, 1)
    assert step_ids(done) == ["call"]


def test_a_parked_run_wakes_up_with_its_version(api: Api) -> None:
    _, client = api.user()
    wait_step = {"id": "wait", "type": "delay", "config": {"seconds": 2}}
    wf = create(client, manual("parked", wait_step, transform("A")))
    run_id = run(client, wf["id"])

    def parked() -> bool:
        body = client.get(f"/api/runs/{run_id}").json()
        return body["status"] == "delayed" and any(s["status"] == "waiting" for s in body["steps"])

    wait_until(parked, 20)
    replace(client, wf["id"], manual("parked", wait_step, transform("B")))
    done = wait_run(client, run_id, FINISHED)
    assert done["status"] == "succeeded", done
    assert (done["workflowVersion"], step_ids(done)) == (1, ["wait", "A"])


def test_a_sub_workflow_run_pins_the_child_version_current_when_it_is_queued(api: Api) -> None:
    _, client = api.user()
    child = create(client, manual("child", transform("child-A")))
    parent = create(
        client,
        manual("parent", {"id": "call", "type": "workflow", "config": {"workflowId": child["id"]}}),
    )
    run_id = run(client, parent["id"], delay=5000)
    # Both change before the parent starts: the parent runs its version 1, and the child is queued
    # (by the parent's step) after the child's edit, so it runs the child's version 2.
    replace(client, child["id"], manual("child", transform("child-B")))
    replace(client, parent["id"], manual("parent", transform("parent-B")))

    done = wait_run(client, run_id, FINISHED, timeout=40)
    assert done["status"] == "succeeded", done
    assert (done["workflowVersion"], step_ids(done)) == (1, ["call"])
    [child_run] = client.get(f"/api/workflows/{child['id']}/runs").json()["items"]
    assert child_run["parentRunId"] == run_id
    child_done = client.get(f"/api/runs/{child_run['id']}").json()
    assert (child_done["workflowVersion"], step_ids(child_done)) == (2, ["child-B"])
    assert done["steps"][0]["output"]["output"] == {"ran": "child-B"}


def hold_user(client: httpx.Client, server: LocalServer, seconds: float) -> list[str]:
    """Fill the user's concurrency cap (5 by default) with runs that take ``seconds``: the user's
    next runs stay queued until these end."""
    blocker = create(
        client,
        manual("blocker", {"id": "hold", "type": "http", "config": {"url": f"{server.base}/slow?s={seconds}"}}),
    )
    runs = [run(client, blocker["id"]) for _ in range(5)]
    wait_until(lambda: all(client.get(f"/api/runs/{r}").json()["status"] == "running" for r in runs), 20)
    return runs


def test_webhook_and_cron_runs_pin_the_version_current_when_they_are_created(
    api: Api, http_server: LocalServer
) -> None:
    _, client = api.user()
    hook = create(client, {"name": "hooked", "trigger": {"type": "webhook"}, "steps": [transform("hook-A")]})
    cron_trigger = {"type": "cron", "config": {"schedule": "* * * * * *"}}
    blockers = hold_user(client, http_server, 10)

    accepted = api.anonymous().post(hook["webhook"]["url"].replace(api.base, ""), json={"n": 1})
    assert accepted.status_code == 202, accepted.text
    hook_run = accepted.json()["runId"]
    cron = create(client, {"name": "ticking", "trigger": cron_trigger, "steps": [transform("cron-A")]})

    def cron_runs() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = client.get(f"/api/workflows/{cron['id']}/runs").json()["items"]
        return items or None

    first_cron = wait_until(cron_runs, 15)[-1]
    assert first_cron["status"] in ("queued", "delayed")  # held by the user's cap
    assert client.get(f"/api/runs/{hook_run}").json()["status"] == "queued"
    replace(client, hook["id"], {"name": "hooked", "trigger": {"type": "webhook"}, "steps": [transform("hook-B")]})
    # The edit also pauses the cron workflow, so it fires no more.
    replace(
        client,
        cron["id"],
        {"name": "ticking", "trigger": cron_trigger, "steps": [transform("cron-B")], "status": "paused"},
    )

    for blocker in blockers:
        wait_run(client, blocker, FINISHED)
    hooked = wait_run(client, hook_run, FINISHED)
    assert (hooked["status"], hooked["workflowVersion"], step_ids(hooked)) == ("succeeded", 1, ["hook-A"])
    ticked = wait_run(client, first_cron["id"], FINISHED)
    assert (ticked["status"], ticked["workflowVersion"], step_ids(ticked)) == ("succeeded", 1, ["cron-A"])


def test_a_deleted_workflows_runs_keep_the_definition_they_ran(api: Api) -> None:
    _, client = api.user()
    wf = create(client, manual("short-lived", transform("only")))
    done = wait_run(client, run(client, wf["id"]), FINISHED)
    assert client.delete(f"/api/workflows/{wf['id']}").status_code == 204

    kept = client.get(f"/api/runs/{done['id']}", params={"include": "definition"}).json()
    assert kept["definition"]["steps"] == [transform("only")]
    problem(client.get(f"/api/workflows/{wf['id']}/versions"), 404)
    problem(client.get(f"/api/workflows/{wf['id']}/versions/1"), 404)
