"""HTTP steps against a real local HTTP server: bodies, status rules, redirects through the guard."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from sluice_worker.engine import Outcome, RunContext, Runtime, execute
from sluice_worker.safehttp import HttpPolicy, make_client
from tests.httpserver import serve
from tests.unit.test_engine import MemoryStore


class _Echo(BaseHTTPRequestHandler):
    """Echoes the request as JSON; /redirect?to=URL&code=N redirects; /text and /big answer text."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if url.path == "/redirect":
            self.send_response(int(query.get("code", "302")))
            self.send_header("Location", query["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path == "/slow":
            time.sleep(float(query.get("s", "1")))
        if url.path in ("/text", "/big"):
            data = ("x" * int(query.get("n", "10"))).encode()
            ctype = "text/plain"
        else:
            data = json.dumps(
                {"method": method, "path": url.path, "query": query, "headers": dict(self.headers), "body": body}
            ).encode()
            ctype = "application/json"
        self.send_response(int(query.get("status", "200")))
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PUT(self) -> None:
        self._answer("PUT")

    def do_HEAD(self) -> None:
        self._answer("HEAD")


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_http(
    config: dict[str, Any], policy: HttpPolicy | None = None, trigger: Any = None, **runtime: Any
) -> tuple[Outcome, Any]:
    store = MemoryStore()
    ctx = RunContext(
        "r",
        "w",
        1,
        "manual",
        {"id": 5} if trigger is None else trigger,
        [{"id": "h", "type": "http", "config": config}],
        time.monotonic() + 30,
    )
    with make_client() as client:
        outcome = execute(ctx, store, Runtime(client, http_policy=policy or HttpPolicy(allow_private=True), **runtime))
    return outcome, store.done.get("h")


def test_json_body_query_and_headers(echo: str) -> None:
    outcome, out = run_http(
        {
            "method": "POST",
            "url": echo + "/items?a=1",
            "query": {"b": "{{ trigger.id }}"},
            "headers": {"X-Trace": "t-{{ trigger.id }}"},
            "json": {"id": "{{ trigger.id }}", "tags": ["x"]},
        }
    )
    assert outcome.status == "succeeded", outcome.error
    assert out["status"] == 200
    assert out["headers"]["content-type"] == "application/json"
    body = out["body"]  # parsed JSON
    assert (body["method"], body["path"], body["query"]) == ("POST", "/items", {"a": "1", "b": "5"})
    assert body["headers"]["X-Trace"] == "t-5"
    assert json.loads(body["body"]) == {"id": 5, "tags": ["x"]}
    assert body["headers"]["Content-Type"] == "application/json"


def test_text_and_form_bodies(echo: str) -> None:
    _, out = run_http({"method": "PUT", "url": echo + "/t", "body": "plain {{ trigger.id }}"})
    assert out["body"]["body"] == "plain 5"
    _, out = run_http({"method": "POST", "url": echo + "/f", "form": {"a": "1", "b": "x y"}})
    assert out["body"]["body"] == "a=1&b=x+y"
    assert out["body"]["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    _, out = run_http({"url": echo + "/text?n=3"})
    assert out["body"] == "xxx"  # not JSON: the text


def test_status_codes(echo: str) -> None:
    outcome, _ = run_http({"url": echo + "/x?status=404"})
    assert outcome.status == "failed"
    assert outcome.error == f"step 'h': GET {echo}/x?status=404 answered 404"
    assert not outcome.final  # a server may recover: retried
    outcome, out = run_http({"url": echo + "/x?status=404", "acceptStatus": [200, 404]})
    assert (outcome.status, out["status"]) == ("succeeded", 404)


def test_redirects_are_followed_up_to_the_limit(echo: str) -> None:
    target = f"{echo}/redirect?to=/final"
    outcome, out = run_http({"method": "POST", "url": target, "json": {"a": 1}})
    assert outcome.status == "succeeded"
    assert (out["body"]["method"], out["body"]["path"], out["url"]) == ("GET", "/final", echo + "/final")
    outcome, out = run_http({"method": "POST", "url": target + "&code=307", "json": {"a": 1}})
    assert (out["body"]["method"], json.loads(out["body"]["body"])) == ("POST", {"a": 1})
    chain = f"{echo}/redirect?" + str(httpx.QueryParams({"to": "/redirect?to=/end"}))
    outcome, _ = run_http({"url": chain, "maxRedirects": 1})
    assert outcome.status == "failed"
    assert "more than 1 redirects" in (outcome.error or "")
    # maxRedirects 0: not followed; the 302 itself is the answer.
    outcome, out = run_http({"url": target, "maxRedirects": 0, "acceptStatus": [302]})
    assert (outcome.status, out["status"], out["headers"]["location"]) == ("succeeded", 302, "/final")


def test_every_redirect_hop_is_checked(echo: str) -> None:
    # `localhost` is allowed by name; its redirect to 127.0.0.1 is not, and is refused.
    port = echo.rsplit(":", 1)[1]
    policy = HttpPolicy(allow_hosts=frozenset({"localhost"}))
    outcome, _ = run_http({"url": f"http://localhost:{port}/echo"}, policy)
    assert outcome.status == "succeeded", outcome.error
    outcome, _ = run_http({"url": f"http://localhost:{port}/redirect?to={echo}/echo"}, policy)
    assert outcome.status == "failed"
    assert "refused to connect to 127.0.0.1" in (outcome.error or "")
    assert outcome.final


def test_credentials_are_not_sent_to_another_origin(echo: str) -> None:
    port = echo.rsplit(":", 1)[1]
    elsewhere = f"http://localhost:{port}/echo"
    headers = {"Authorization": "Bearer abc", "X-Other": "kept"}
    _, out = run_http({"url": f"{echo}/redirect?to={elsewhere}", "headers": headers})
    assert "Authorization" not in out["body"]["headers"]
    assert out["body"]["headers"]["X-Other"] == "kept"
    _, out = run_http({"url": f"{echo}/redirect?to=/same", "headers": headers})
    assert out["body"]["headers"]["Authorization"] == "Bearer abc"


def test_timeouts_and_large_bodies(echo: str) -> None:
    outcome, _ = run_http({"url": echo + "/slow?s=2", "timeoutSeconds": 0.3})
    assert outcome.status == "failed"
    assert outcome.error == "step 'h': timed out after 0.3s"
    outcome, out = run_http({"url": echo + "/big?n=200000"}, output_max_bytes=4096)
    assert outcome.status == "succeeded"
    assert out["truncated"] is True  # the stored output carries the marker, the run goes on


def test_requests_that_can_never_be_sent_fail_finally(echo: str) -> None:
    # Literal ones are refused at creation; rendered from templates they are caught before sending.
    for config, trigger, message in [
        ({"url": "{{ trigger.url }}"}, {"url": "http://[::1"}, "config.url: is not a valid URL"),
        ({"url": "{{ trigger.url }}"}, {"url": echo + "/x\r\nX-Evil: 1"}, "config.url: must not contain control"),
        ({"url": echo, "headers": {"X-A": "{{ trigger.v }}"}}, {"v": "a\r\nX-Evil: 1"}, "must not contain CR, LF"),
        ({"url": echo, "headers": {"X-A": "{{ trigger.v }}"}}, {"v": "caf\u00e9"}, "must be ASCII"),
        ({"url": echo, "headers": {"X-A": "x{{ trigger.v }}"}}, {"v": "{{\n}}"}, "config.headers.X-A: a header value"),
    ]:
        outcome, _ = run_http(config, trigger=trigger)
        assert outcome.status == "failed", (config, trigger)
        assert message in (outcome.error or ""), outcome.error
        assert outcome.final, outcome.error  # no retry could send it either


def test_http_steps_send_one_idempotency_key_per_step_of_a_run() -> None:
    with serve() as server:

        def url(key: str) -> str:
            return f"{server.base}/ok?key={key}"

        steps = [
            {"id": "a", "type": "http", "config": {"url": url("a")}},
            {"id": "b", "type": "http", "config": {"method": "POST", "url": url("b"), "json": {"n": 1}}},
            {"id": "off", "type": "http", "config": {"url": url("off"), "idempotencyKey": False}},
            {"id": "renamed", "type": "http", "config": {"url": url("renamed"), "idempotencyHeader": "X-Request-Id"}},
            {
                "id": "own",
                "type": "http",
                "config": {"url": url("own"), "headers": {"idempotency-key": "k-{{ run.id }}"}},
            },
        ]

        def execute_run(run_id: str, attempt: int) -> None:
            # A fresh store: nothing checkpointed, as when a worker dies before recording the steps.
            ctx = RunContext(run_id, "w", attempt, "manual", {}, steps, time.monotonic() + 30)
            with make_client() as client:
                outcome = execute(ctx, MemoryStore(), Runtime(client, http_policy=HttpPolicy(allow_private=True)))
            assert outcome.status == "succeeded", outcome.error

        execute_run("run-1", 1)
        execute_run("run-1", 2)  # the same steps executed again: another attempt of the same run
        execute_run("run-2", 1)

    def keys(key: str, header: str = "Idempotency-Key") -> list[str | None]:
        return [next((v for k, v in h.items() if k.lower() == header.lower()), None) for h in server.headers[key]]

    first, again, other_run = keys("a")
    assert first is not None
    assert first == again  # one operation for the target, however often it is executed
    assert other_run is not None
    assert other_run != first
    assert keys("b")[0] == keys("b")[1]
    assert keys("b")[0] not in (first, other_run)  # another step, another key
    assert keys("off") == [None, None, None]
    assert keys("renamed", "Idempotency-Key") == [None, None, None]
    renamed = keys("renamed", "X-Request-Id")
    assert renamed[0] == renamed[1]
    assert renamed[0] != renamed[2]
    assert keys("own") == ["k-run-1", "k-run-1", "k-run-2"]  # the step's own header wins
