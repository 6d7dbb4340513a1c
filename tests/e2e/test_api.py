"""The HTTP API through real HTTP: gunicorn serving ``sluice api``, a ``sluice worker`` running the runs."""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import httpx
import psycopg

from tests.conftest import wait_until
from tests.e2e.conftest import Api
from tests.e2e.helpers import free_port, wait_for
from tests.httpserver import LocalServer

PROBLEM = "application/problem+json"


def workflow_body(url: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "fetch and shape",
        "trigger": {"type": "manual"},
        "steps": [
            {"id": "fetch", "type": "http", "config": {"url": url}},
            {"id": "shape", "type": "transform", "config": {"value": {"done": True}}},
        ],
    }
    body.update(extra)
    return body


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"]
    assert "Traceback" not in resp.text
    return body


def wait_run(client: httpx.Client, run_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        run: dict[str, Any] = client.get(f"/api/runs/{run_id}").json()
        return run if run["status"] in statuses else None

    result: dict[str, Any] = wait_until(done, timeout)
    return result


def count(api: Api, sql: str, *args: object) -> int:
    with psycopg.connect(api.database_url) as conn:
        row = conn.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


def test_the_seeds_calls_create_run_and_read_a_run(api: Api, http_server: LocalServer) -> None:
    _, client = api.user()
    created = client.post("/api/workflows", json=workflow_body(f"{http_server.base}/ok?key=seeds"))
    assert created.status_code == 201, created.text
    wf = created.json()
    assert wf["version"] == 1
    assert wf["status"] == "active"
    assert wf["trigger"] == {"type": "manual", "config": {}}
    assert created.headers["location"] == f"/api/workflows/{wf['id']}"

    resp = client.post(f"/api/workflows/{wf['id']}/run", json={"triggerData": {"n": 1}, "priority": 2})
    assert resp.status_code == 202
    body = resp.json()
    assert body == {
        "success": True,
        "queued": True,
        "jobId": body["runId"],
        "runId": body["runId"],
        "message": "Workflow queued for execution",
        "status": "queued",
    }
    run = wait_run(client, body["runId"], {"succeeded", "failed"})
    assert run["status"] == "succeeded", run
    assert run["priority"] == 2
    assert run["triggerType"] == "manual"
    assert run["triggerData"] == {"n": 1}
    assert [s["stepId"] for s in run["steps"]] == ["fetch", "shape"]
    assert run["steps"][0]["output"]["body"]["key"] == "seeds"
    assert run["steps"][1]["output"] == {"done": True}
    assert run["attempts"][0]["attempt"] == 1
    assert run["attempts"][0]["status"] == "succeeded"
    assert run["startedAt"]
    assert run["finishedAt"]
    assert run["queuedAt"]

    # An empty body is a run with defaults; the workflow's run list shows both runs.
    assert client.post(f"/api/workflows/{wf['id']}/run").status_code == 202
    runs = client.get(f"/api/workflows/{wf['id']}/runs").json()
    assert len(runs["items"]) == 2
    assert runs["nextCursor"] is None


def test_tokens_are_required_and_checked(api: Api) -> None:
    token, client = api.user()
    anon = api.anonymous()
    body = problem(anon.get("/api/workflows"), 401)
    assert "Bearer" in body["detail"]
    assert anon.get("/api/workflows").headers["www-authenticate"] == "Bearer"
    problem(anon.get("/api/workflows", headers={"Authorization": "Basic abc"}), 401)
    problem(anon.get("/api/workflows", headers={"Authorization": "Bearer slc_not-a-real-token"}), 401)
    assert client.get("/api/workflows").status_code == 200

    with psycopg.connect(api.database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE token_hash = sha256(%s::bytea)", (token.encode(),))
    # Verified tokens are remembered for two seconds per API process.
    wait_until(lambda: client.get("/api/workflows").status_code == 401, timeout=10)


def test_users_cannot_see_or_touch_each_others_objects(api: Api, http_server: LocalServer) -> None:
    _, alice = api.user()
    _, bob = api.user()
    wf = alice.post("/api/workflows", json=workflow_body(f"{http_server.base}/ok")).json()
    run = alice.post(f"/api/workflows/{wf['id']}/run").json()
    for method, path in [
        ("GET", f"/api/workflows/{wf['id']}"),
        ("PUT", f"/api/workflows/{wf['id']}"),
        ("PATCH", f"/api/workflows/{wf['id']}"),
        ("DELETE", f"/api/workflows/{wf['id']}"),
        ("POST", f"/api/workflows/{wf['id']}/run"),
        ("GET", f"/api/workflows/{wf['id']}/runs"),
        ("GET", f"/api/runs/{run['runId']}"),
        ("POST", f"/api/runs/{run['runId']}/cancel"),
        ("POST", f"/api/runs/{run['runId']}/retry"),
    ]:
        payload = workflow_body("https://example.com") if method == "PUT" else {"name": "x"}
        resp = bob.request(method, path, json=payload if method in ("PUT", "PATCH") else None)
        body = problem(resp, 404)
        assert wf["id"] not in json.dumps(body), (method, path)
    assert bob.get("/api/workflows").json()["items"] == []
    assert bob.get("/api/runs").json()["items"] == []
    assert bob.get(f"/api/runs?workflowId={wf['id']}").json()["items"] == []
    assert alice.get(f"/api/workflows/{wf['id']}").status_code == 200


def test_bad_input_is_a_clear_4xx_and_writes_nothing(api: Api) -> None:
    _, client = api.user()
    before = count(api, "SELECT count(*) FROM workflows")
    bad = {
        "name": "",
        "trigger": {"type": "cron", "config": {"schedule": "61 * * * *", "timezone": "Mars/Olympus"}},
        "steps": [
            {"id": "a", "type": "http", "config": {"url": "https://x", "extra": 1}},
            {"id": "a", "type": "teleport", "config": {}},
        ],
        "colour": "blue",
    }
    body = problem(client.post("/api/workflows", json=bad), 422)
    paths = {e["path"] for e in body["errors"]}
    assert {
        "$.name",
        "$.trigger.config.schedule",
        "$.trigger.config.timezone",
        "$.steps[0].config.extra",
        "$.steps[1].id",
        "$.steps[1].type",
        "$.colour",
    } <= paths, paths
    assert all(e["message"] for e in body["errors"])

    malformed = client.post("/api/workflows", content=b'{"name": ', headers={"content-type": "application/json"})
    assert "malformed JSON" in problem(malformed, 400)["detail"]
    problem(client.post("/api/workflows", content=b"name=x", headers={"content-type": "text/plain"}), 415)
    problem(client.post("/api/workflows", json={"name": "x" * 70_000}), 413)
    problem(client.post("/api/workflows", json=[1, 2]), 422)
    assert count(api, "SELECT count(*) FROM workflows") == before

    wf = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    runs_before = count(api, "SELECT count(*) FROM runs")
    for payload, path in [
        ({"priority": 0}, "$.priority"),
        ({"priority": "1"}, "$.priority"),
        ({"delay": -5}, "$.delay"),
        ({"priority": 11, "delay": 1.5}, "$.delay"),
        ({"triggerdata": {}}, "$.triggerdata"),
        ({"trigger_data": {"n": 1}}, "$.trigger_data"),  # the Python name is not an input name
    ]:
        body = problem(client.post(f"/api/workflows/{wf['id']}/run", json=payload), 422)
        assert path in {e["path"] for e in body["errors"]}, (payload, body)
    problem(client.post(f"/api/workflows/{wf['id']}/run", json={}, headers={"Idempotency-Key": "k" * 201}), 422)
    assert count(api, "SELECT count(*) FROM runs") == runs_before

    problem(client.get("/api/workflows/not-a-uuid"), 404)
    problem(client.get("/api/runs?limit=0"), 422)
    problem(client.get("/api/runs?status=weird"), 422)
    problem(client.get("/api/runs?since=yesterday"), 422)
    problem(client.get("/api/runs?cursor=garbage!"), 422)
    problem(client.get("/api/runs?limit=1&limit=2"), 400)


def test_costly_expressions_never_cost_the_api_and_fail_their_run_cleanly(api: Api) -> None:
    # Validation parses and never evaluates: an expression is judged by the worker's sandbox, at
    # run time, where its inputs are known (an expression over trigger data can be just as
    # costly), so these definitions are accepted and their runs fail at once without retries.
    _, client = api.user()
    digits = "1" * 5000  # a literal Python cannot read: a syntax-level problem, 422
    bad = {
        "name": "unreadable",
        "trigger": {"type": "manual"},
        "steps": [{"id": "t", "type": "transform", "config": {"value": "{{ " + digits + " }}"}}],
    }
    body = problem(client.post("/api/workflows", json=bad), 422)
    assert [(e["path"], e["message"]) for e in body["errors"]] == [
        ("$.steps[0].config.value", "a number has too many digits")
    ]
    for expression, message in [
        ("10**5000", "'**' result too large"),
        ("(10**100)**50", "'**' result too large"),
        ("'a' * 10**9", "'*' would build"),
    ]:
        definition = {
            "name": "costly",
            "trigger": {"type": "manual"},
            "steps": [
                {"id": "check", "type": "condition", "config": {"if": expression}},
                {"id": "after", "type": "transform", "config": {"value": "{{ " + expression + " }}"}},
            ],
        }
        start = time.monotonic()
        created = client.post("/api/workflows", json=definition)
        assert created.status_code == 201, (expression, created.status_code, created.text)
        assert time.monotonic() - start < 5
        run_id = client.post(f"/api/workflows/{created.json()['id']}/run").json()["runId"]
        run = wait_run(client, run_id, {"succeeded", "failed"})
        assert run["status"] == "failed", run
        assert message in run["error"], run["error"]
        assert [(s["stepId"], s["status"]) for s in run["steps"]] == [("check", "failed")]
        assert len(run["attempts"]) == 1  # a final failure: not retried


def raw_request(api: Api, token: str, path: str, head: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """One request written byte for byte (httpx would not send a malformed body); the status and
    the JSON answer."""
    host, port = api.base.removeprefix("http://").split(":")
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n{head}\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # the client has sent everything it will send
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        size, _, rest = payload.partition(b"\r\n")
        payload = rest[: int(size, 16)]
    return status, json.loads(payload) if payload else {}


def test_chunked_bodies_are_read_and_malformed_ones_refused(api: Api) -> None:
    token, client = api.user()
    wf = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    path = f"/api/workflows/{wf['id']}/run"
    chunked = "Transfer-Encoding: chunked\r\n"
    data = b'{"triggerData": {"n": 7}, "delay": 60000}'
    status, body = raw_request(api, token, path, chunked, b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
    assert status == 202, body
    assert client.get(f"/api/runs/{body['runId']}").json()["triggerData"] == {"n": 7}

    runs_before = count(api, "SELECT count(*) FROM runs")
    for framing, expected in (
        (b"zz\r\n" + data + b"\r\n0\r\n\r\n", 400),  # not a chunk size
        # A size the body never reaches, and far past the body limit: refused before it is read.
        (b"FFFFFFFFFFFFFFFF\r\n" + data + b"\r\n0\r\n\r\n", 413),
        (b"%x\r\n%s\r\n" % (len(data), data), 400),  # no last chunk
    ):
        status, body = raw_request(api, token, path, chunked, framing)
        assert status == expected, (framing[:20], status, body)
        assert body["status"] == expected
        if expected == 400:
            assert "could not be read" in body["detail"] or "malformed" in body["detail"].lower(), body
    status, body = raw_request(api, token, path, "Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n")
    assert status == 400, body
    assert count(api, "SELECT count(*) FROM runs") == runs_before


def test_http_steps_that_can_never_work_are_refused_at_creation(api: Api) -> None:
    _, client = api.user()
    before = count(api, "SELECT count(*) FROM workflows")
    for config, path in [
        ({"url": "http://[::1"}, "$.steps[0].config.url"),
        ({"url": "https://example.com/a\r\nX-Evil: 1"}, "$.steps[0].config.url"),
        ({"url": "https://example.com/\n"}, "$.steps[0].config.url"),
        ({"url": "https://example.com", "headers": {"X-A": "1\r\nX-Evil: 1"}}, "$.steps[0].config.headers['X-A']"),
        ({"url": "https://example.com", "headers": {"X-A\n": "1"}}, "$.steps[0].config.headers['X-A\\n']"),
        ({"url": "https://example.com", "headers": {"X(A)": "1"}}, "$.steps[0].config.headers['X(A)']"),
    ]:
        body = problem(client.post("/api/workflows", json=workflow_body("x") | {"steps": [step(config)]}), 422)
        assert [e["path"] for e in body["errors"]] == [path], (config, body)
    assert count(api, "SELECT count(*) FROM workflows") == before


def step(config: dict[str, Any]) -> dict[str, Any]:
    return {"id": "call", "type": "http", "config": config}


def test_idempotency_key_returns_the_same_run(api: Api) -> None:
    _, client = api.user()
    wf = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    headers = {"Idempotency-Key": "order-42"}
    first = client.post(f"/api/workflows/{wf['id']}/run", json={"delay": 60_000}, headers=headers).json()
    second = client.post(f"/api/workflows/{wf['id']}/run", json={"delay": 60_000}, headers=headers).json()
    assert first["runId"] == second["runId"]
    assert count(api, "SELECT count(*) FROM runs WHERE workflow_id = %s", wf["id"]) == 1
    other = client.post(f"/api/workflows/{wf['id']}/run", json={"delay": 60_000}, headers={"Idempotency-Key": "b"})
    assert other.json()["runId"] != first["runId"]


def test_webhooks_run_with_the_body_and_rotation_kills_the_old_url(api: Api) -> None:
    _, client = api.user()
    body = workflow_body("https://example.com", trigger={"type": "webhook"})
    body["steps"] = [{"id": "keep", "type": "transform", "config": {"value": 1}}]
    wf = client.post("/api/workflows", json=body).json()
    url = wf["webhook"]["url"]
    assert wf["webhook"]["enabled"]
    assert url.startswith(f"{api.base}/api/hooks/whk_")
    assert client.get(f"/api/workflows/{wf['id']}").json()["webhook"] == {"enabled": True, "url": None}

    anon = api.anonymous()
    resp = anon.post(url, json={"event": "push", "ref": "main"})
    assert resp.status_code == 202
    run = wait_run(client, resp.json()["runId"], {"succeeded", "failed"})
    assert run["triggerType"] == "webhook"
    assert run["triggerData"] == {"event": "push", "ref": "main"}
    form = anon.post(url, data={"a": "1"})
    assert client.get(f"/api/runs/{form.json()['runId']}").json()["triggerData"] == {"a": "1"}

    rotated = client.post(f"/api/workflows/{wf['id']}/webhook/rotate").json()["webhook"]["url"]
    assert rotated != url
    problem(anon.post(url, json={}), 404)
    assert anon.post(rotated, json={}).status_code == 202
    problem(anon.post(f"{api.base}/api/hooks/whk_guess", json={}), 404)

    manual = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    assert manual["webhook"] is None
    problem(client.post(f"/api/workflows/{manual['id']}/webhook/rotate"), 409)


def test_pages_cover_everything_once(api: Api) -> None:
    _, client = api.user()
    ids = [
        client.post("/api/workflows", json=workflow_body("https://example.com", name=f"w{i}")).json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/api/workflows", params=params).json()
        seen += [w["id"] for w in page["items"]]
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))

    for wf_id in ids[:3]:
        client.post(f"/api/workflows/{wf_id}/run", json={"delay": 60_000})
    first = client.get("/api/runs", params={"limit": 2}).json()
    rest = client.get("/api/runs", params={"limit": 2, "cursor": first["nextCursor"]}).json()
    assert len(first["items"]) == 2
    assert len(rest["items"]) == 1
    assert rest["nextCursor"] is None
    assert {r["status"] for r in first["items"] + rest["items"]} == {"delayed"}
    only = client.get("/api/runs", params={"workflowId": ids[0]}).json()["items"]
    assert [r["workflowId"] for r in only] == [ids[0]]
    assert client.get("/api/runs", params={"status": "succeeded"}).json()["items"] == []
    future = client.get("/api/runs", params={"since": "2999-01-01T00:00:00Z"}).json()["items"]
    assert future == []
    paused = client.patch(f"/api/workflows/{ids[1]}", json={"status": "paused"}).json()
    assert paused["status"] == "paused"
    assert paused["version"] == 2
    listed = client.get("/api/workflows", params={"status": "paused"}).json()["items"]
    assert [w["id"] for w in listed] == [ids[1]]


def test_cancel_delete_pause_and_versions(api: Api) -> None:
    _, client = api.user()
    wf = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    delayed = client.post(f"/api/workflows/{wf['id']}/run", json={"delay": 60_000}).json()
    assert delayed["status"] == "delayed"
    cancelled = client.post(f"/api/runs/{delayed['runId']}/cancel").json()
    assert cancelled == {"id": delayed["runId"], "status": "cancelled", "cancelRequested": False}
    problem(client.post(f"/api/runs/{delayed['runId']}/cancel"), 409)

    # Versions: PUT and PATCH bump it; If-Match guards against a concurrent change.
    replaced = client.put(f"/api/workflows/{wf['id']}", json=workflow_body("https://example.org", name="v2"))
    assert replaced.json()["version"] == 2
    assert replaced.headers["etag"] == '"2"'
    problem(client.patch(f"/api/workflows/{wf['id']}", json={"name": "v3"}, headers={"If-Match": '"1"'}), 409)
    patched = client.patch(
        f"/api/workflows/{wf['id']}",
        json={"status": "paused", "description": "paused for now"},
        headers={"If-Match": '"2"', "content-type": "application/merge-patch+json"},
    ).json()
    assert patched["version"] == 3
    assert patched["status"] == "paused"
    assert patched["name"] == "v2"
    assert "paused" in problem(client.post(f"/api/workflows/{wf['id']}/run"), 409)["detail"]
    body = problem(client.patch(f"/api/workflows/{wf['id']}", json={"steps": []}), 422)
    assert body["errors"][0]["path"] == "$.steps"
    assert client.get(f"/api/workflows/{wf['id']}").json()["version"] == 3

    client.patch(f"/api/workflows/{wf['id']}", json={"status": "active"})
    queued = client.post(f"/api/workflows/{wf['id']}/run", json={"delay": 60_000}).json()
    assert client.delete(f"/api/workflows/{wf['id']}").status_code == 204
    problem(client.get(f"/api/workflows/{wf['id']}"), 404)
    run = client.get(f"/api/runs/{queued['runId']}").json()
    assert run["status"] == "cancelled"
    assert run["error"] == "the workflow was deleted"


def test_a_failed_run_can_be_retried(api: Api, http_server: LocalServer) -> None:
    _, client = api.user()
    body = workflow_body(f"{http_server.base}/flaky?key=retry-me&fail=1", settings={"maxAttempts": 1})
    wf = client.post("/api/workflows", json=body).json()
    run_id = client.post(f"/api/workflows/{wf['id']}/run").json()["runId"]
    failed = wait_run(client, run_id, {"failed", "succeeded"})
    assert failed["status"] == "failed"
    assert "500" in failed["error"]
    problem(client.post(f"/api/runs/{run_id}/cancel"), 409)

    retried = client.post(f"/api/runs/{run_id}/retry")
    assert retried.status_code == 202
    assert retried.json()["runId"] == run_id
    done = wait_run(client, run_id, {"failed", "succeeded"})
    assert done["status"] == "succeeded", done
    assert [(a["attempt"], a["status"]) for a in done["attempts"]] == [(1, "failed"), (2, "succeeded")]
    assert http_server.hits["retry-me"] == 2
    problem(client.post(f"/api/runs/{run_id}/retry"), 409)


def test_queue_stats_in_the_seeds_shape_without_a_token(api: Api) -> None:
    _, client = api.user()
    wf = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    client.post(f"/api/workflows/{wf['id']}/run", json={"delay": 60_000, "priority": 3})
    anon = api.anonymous()
    # Each API process keeps the public stats for a second.
    body = wait_until(lambda: (b := anon.get("/api/workflows/queue/stats").json())["queue"]["stats"]["delayed"] and b)
    queue = body["queue"]
    assert queue["available"] is True
    assert queue["redis"] is True
    assert set(queue["stats"]) == {"waiting", "active", "completed", "failed", "delayed", "total"}
    assert queue["stats"]["delayed"] >= 1
    assert queue["stats"]["total"] == queue["stats"]["active"] + queue["stats"]["waiting"]
    assert set(body["scheduler"]) == {"initialized", "scheduledWorkflows"}
    message = body["capacity"]["message"]
    assert message == (
        f"Running up to {queue['concurrency']} workflows concurrently. "
        f"{queue['stats']['active']} active, {queue['stats']['waiting']} queued."
    )


def test_openapi_document_is_served(api: Api) -> None:
    doc = api.anonymous().get("/api/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    assert "/api/workflows/{workflowId}/run" in doc["paths"]
    step = doc["components"]["schemas"]["Step"]
    assert {v["properties"]["type"]["const"] for v in step["oneOf"]} >= {"http", "transform", "condition"}


def test_request_limit_answers_429_with_retry_after(api: Api) -> None:
    port = free_port()
    proc = api.start(
        "api", SLUICE_API_BIND=f"127.0.0.1:{port}", SLUICE_API_WORKERS="1", SLUICE_API_RATE_LIMIT_PER_MINUTE="5"
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(f"{base}/api/ready", proc=proc)
    for _ in range(2):  # a burst that straddles a minute boundary is tried again with a new user
        token, _ = api.user()
        headers = {"Authorization": f"Bearer {token}"}
        responses = [httpx.get(f"{base}/api/workflows", headers=headers) for _ in range(7)]
        if [r.status_code for r in responses] == [200] * 5 + [429] * 2:
            break
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 2
    body = problem(responses[-1], 429)
    assert 1 <= int(responses[-1].headers["retry-after"]) <= 60
    assert "retry" in body["detail"]


def test_secrets_are_write_only_and_per_user(api: Api) -> None:
    _, alice = api.user()
    _, bob = api.user()
    stored = alice.put("/api/secrets/API_KEY", json={"value": "s3cr3t-value"})
    assert stored.status_code == 200
    assert stored.json()["name"] == "API_KEY"
    assert "s3cr3t" not in stored.text
    listed = alice.get("/api/secrets")
    assert [s["name"] for s in listed.json()["items"]] == ["API_KEY"]
    assert "s3cr3t" not in listed.text
    assert bob.get("/api/secrets").json()["items"] == []
    problem(bob.delete("/api/secrets/API_KEY"), 404)
    problem(alice.put("/api/secrets/bad-name", json={"value": "x"}), 422)
    problem(alice.put("/api/secrets/EMPTY", json={"value": ""}), 422)

    # A step uses it; the run shows it masked.
    body = {
        "name": "uses a secret",
        "trigger": {"type": "manual"},
        "steps": [{"id": "echo", "type": "transform", "config": {"value": "key={{ secrets.API_KEY }}"}}],
    }
    wf = alice.post("/api/workflows", json=body).json()
    run = wait_run(alice, alice.post(f"/api/workflows/{wf['id']}/run").json()["runId"], {"succeeded", "failed"})
    assert run["status"] == "succeeded", run
    assert run["steps"][0]["output"] == "key=***"

    assert alice.delete("/api/secrets/API_KEY").status_code == 204
    problem(alice.delete("/api/secrets/API_KEY"), 404)


def test_cron_triggers_follow_api_changes_without_a_refresh(api: Api) -> None:
    _, client = api.user()
    body = {
        "name": "ticker",
        "trigger": {"type": "cron", "config": {"schedule": "0 0 1 1 *", "timezone": "Europe/Paris"}},
        "steps": [{"id": "tick", "type": "transform", "config": {"value": "{{ trigger }}"}}],
    }
    wf = client.post("/api/workflows", json=body).json()
    preview = client.get(f"/api/workflows/{wf['id']}/schedule", params={"count": 3}).json()
    assert preview["schedule"] == "0 0 1 1 *"
    assert preview["timezone"] == "Europe/Paris"
    assert preview["active"] is True
    assert len(preview["nextFires"]) == 3
    assert preview["nextFire"] == preview["nextFires"][0]
    assert preview["lastFire"] is None
    assert preview["missedCount"] == 0

    def cron_runs() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = client.get(f"/api/workflows/{wf['id']}/runs").json()["items"]
        return [r for r in items if r["triggerType"] == "cron"]

    # Every second from now on: the scheduler sees the change within 2 seconds, with no refresh.
    changed = time.monotonic()
    patched = client.patch(
        f"/api/workflows/{wf['id']}", json={"trigger": {"config": {"schedule": "* * * * * *"}}}
    ).json()
    assert patched["version"] == 2
    wait_until(cron_runs, timeout=10, interval=0.05)
    assert time.monotonic() - changed < 2.5
    assert cron_runs()[0]["priority"] == 7  # cron runs queue behind manual ones by default
    stats = api.anonymous().get("/api/workflows/queue/stats").json()["scheduler"]
    assert stats["initialized"] is True
    assert stats["scheduledWorkflows"] >= 1

    paused = client.patch(f"/api/workflows/{wf['id']}", json={"status": "paused"}).json()
    time.sleep(2.5)
    assert all(r["queuedAt"] <= paused["updatedAt"] for r in cron_runs())
    assert client.get(f"/api/workflows/{wf['id']}/schedule").json()["nextFire"] is None
    last = client.get(f"/api/workflows/{wf['id']}/schedule").json()["lastFire"]
    assert last["outcome"] == "fired"

    assert client.post("/api/scheduler/refresh").status_code == 202
    manual = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    problem(client.get(f"/api/workflows/{manual['id']}/schedule"), 409)
    problem(client.get(f"/api/workflows/{wf['id']}/schedule", params={"count": 0}), 422)


def test_inputs_postgresql_cannot_store_are_4xx(api: Api) -> None:
    _, client = api.user()
    wf = client.post("/api/workflows", json=workflow_body("https://example.com")).json()
    run_url = f"/api/workflows/{wf['id']}/run"
    json_type = {"content-type": "application/json"}
    for raw in (
        b'{"triggerData": NaN}',
        b'{"triggerData": 1e999}',
        b'{"triggerData": "\\ud800"}',
        b'{"triggerData": "a\\u0000b"}',
        b'{"triggerData": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"triggerData": ' + b"1" * 5000 + b"}",
    ):
        resp = client.post(run_url, content=raw, headers=json_type)
        assert resp.status_code in (400, 422), (raw[:40], resp.status_code, resp.text)
        problem(resp, resp.status_code)
    name = {**workflow_body("https://example.com"), "name": "\ud800"}
    resp = client.post("/api/workflows", content=json.dumps(name).encode(), headers=json_type)
    problem(resp, 422)
    cursor = base64.urlsafe_b64encode(b'["2026-01-01T00:00:00+00:00", 5]').decode()
    problem(client.get("/api/runs", params={"cursor": cursor}), 422)

    hook = {**workflow_body("https://example.com"), "trigger": {"type": "webhook"}}
    url = client.post("/api/workflows", json=hook).json()["webhook"]["url"]
    anon = api.anonymous()
    problem(anon.post(url, content=b"a=%00", headers={"content-type": "application/x-www-form-urlencoded"}), 422)
    problem(anon.post(url, content=b"nul\x00", headers={"content-type": "text/plain"}), 422)
    assert count(api, "SELECT count(*) FROM runs WHERE workflow_id = %s", wf["id"]) == 0


def test_a_parked_run_reads_fine_while_it_waits(api: Api) -> None:
    _, client = api.user()
    body = {
        "name": "nap",
        "trigger": {"type": "manual"},
        "steps": [
            {"id": "nap", "type": "delay", "config": {"seconds": 1}},
            {"id": "after", "type": "transform", "config": {"value": "{{ run.attempt }}"}},
        ],
    }
    wf = client.post("/api/workflows", json=body).json()
    run_id = client.post(f"/api/workflows/{wf['id']}/run").json()["runId"]
    parked = wait_until(lambda: client.get(f"/api/runs/{run_id}").json()["attempts"], timeout=10)
    assert parked[0]["status"] in ("running", "parked", "succeeded")
    done = wait_run(client, run_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert {a["status"] for a in done["attempts"]} <= {"parked", "succeeded"}
    assert client.get("/api/runs", params={"status": "waiting"}).status_code == 200


def test_a_running_attempt_is_shown_while_it_runs_and_keeps_its_start(api: Api, http_server: LocalServer) -> None:
    _, client = api.user()
    wf = client.post("/api/workflows", json=workflow_body(f"{http_server.base}/slow?s=1.5")).json()
    run_id = client.post(f"/api/workflows/{wf['id']}/run").json()["runId"]
    running = wait_until(
        lambda: (r := client.get(f"/api/runs/{run_id}").json())["status"] == "running" and r, timeout=10
    )
    [attempt] = running["attempts"]
    assert (attempt["attempt"], attempt["status"], attempt["lost"], attempt["finishedAt"]) == (
        1,
        "running",
        False,
        None,
    )
    assert attempt["workerId"]
    assert count(api, "SELECT count(*) FROM run_attempts WHERE run_id = %s", run_id) == 0  # written at its end
    done = wait_run(client, run_id, {"succeeded", "failed"})
    assert [(a["attempt"], a["status"], a["workerId"], a["startedAt"]) for a in done["attempts"]] == [
        (1, done["status"], attempt["workerId"], attempt["startedAt"])
    ]
    assert done["attempts"][0]["finishedAt"]
