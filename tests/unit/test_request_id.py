"""Every API request has an id: the client's when acceptable, else a new one; in the answer's
``X-Request-Id`` and in each line logged while it is served; gone from the context afterwards."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any, cast

import falcon
import falcon.testing
import pytest
from dramatiq.brokers.stub import StubBroker

from sluice_api.app import Dependencies, create_app
from sluice_api.http_worker import RequestBuffer, error_response
from sluice_api.openapi import document
from sluice_api.requestid import HEADER, request_id
from sluice_api.routes import ROUTES
from sluice_common.db import Pool
from sluice_common.logs import JsonFormatter, clear, current_context
from sluice_common.ratelimit import LocalRateLimiter
from sluice_common.settings import load_settings

GENERATED = re.compile(r"[0-9a-f]{32}")


class Boom:
    public = True  # no token needed (the auth middleware's mark)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        logging.getLogger("sluice.test.api").warning("serving")
        raise RuntimeError("boom")


@pytest.fixture
def client() -> falcon.testing.TestClient:
    # Nothing the requests below reach touches the pool: no database is needed.
    deps = Dependencies(load_settings({}), cast(Pool, None), None, StubBroker(), LocalRateLimiter(100))
    app = create_app(deps)
    app.add_route("/boom", Boom())  # through the real app's middleware and error handlers
    return falcon.testing.TestClient(app)


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("api"))
    root = logging.getLogger()
    root.addHandler(handler)
    clear()
    yield out
    root.removeHandler(handler)
    clear()


def test_a_request_without_an_id_gets_a_new_one(client: falcon.testing.TestClient) -> None:
    first = client.simulate_get("/api/health")
    second = client.simulate_get("/api/health")
    assert first.status_code == 200
    assert GENERATED.fullmatch(first.headers[HEADER])
    assert GENERATED.fullmatch(second.headers[HEADER])
    assert first.headers[HEADER] != second.headers[HEADER]


@pytest.mark.parametrize("given", ["abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "edge.lb-1:42_x", "a" * 128])
def test_an_acceptable_id_is_echoed(client: falcon.testing.TestClient, given: str) -> None:
    assert client.simulate_get("/api/health", headers={HEADER: given}).headers[HEADER] == given


@pytest.mark.parametrize("junk", ["", "two words", "a" * 129, "<script>", "x\ty", "id,other", "é"])
def test_junk_is_replaced(client: falcon.testing.TestClient, junk: str) -> None:
    answer = client.simulate_get("/api/health", headers={HEADER: junk})
    assert answer.status_code == 200
    assert GENERATED.fullmatch(answer.headers[HEADER])


def test_refusals_and_unknown_paths_carry_it_too(client: falcon.testing.TestClient) -> None:
    refused = client.simulate_get("/api/workflows", headers={HEADER: "r-1"})  # no token
    assert (refused.status_code, refused.headers[HEADER]) == (401, "r-1")
    unknown = client.simulate_get("/nowhere", headers={HEADER: "r-2"})
    assert (unknown.status_code, unknown.headers[HEADER]) == (404, "r-2")


def test_lines_logged_for_a_request_name_it_and_nothing_is_left_after(
    client: falcon.testing.TestClient, lines: io.StringIO
) -> None:
    answer = client.simulate_get("/boom", headers={HEADER: "req-7"})
    assert answer.status_code == 500
    assert answer.headers[HEADER] == "req-7"
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    ours = [line for line in logged if line["logger"] in ("sluice.test.api", "sluice_api.problems")]
    assert [line["message"] for line in ours] == ["serving", "unhandled error on GET /boom"]
    assert all(line["request_id"] == "req-7" for line in ours)
    assert "RuntimeError: boom" in ours[1]["exc_info"]
    # The test client serves on this thread, as a gunicorn thread would: the next request starts clean.
    assert current_context() == {}


def test_request_id_keeps_only_acceptable_ids() -> None:
    assert request_id("abc") == "abc"
    assert GENERATED.fullmatch(request_id(None))
    assert GENERATED.fullmatch(request_id("no spaces please"))


def test_the_workers_own_refusals_carry_an_id() -> None:
    buf = RequestBuffer(8192, 10, b"")
    buf.feed(b"POST /x HTTP/1.1\r\nX-Request-Id: big-1\r\nContent-Length: 11\r\n\r\n")
    assert buf.request_id == "big-1"
    head = error_response(413, "Content Too Large", "too big", buf.request_id).split(b"\r\n\r\n")[0]
    assert b"\r\nX-Request-Id: big-1\r\n" in head
    generated = error_response(408, "Request Timeout", "slow").split(b"\r\n\r\n")[0]
    [value] = [line.split(b": ", 1)[1] for line in generated.split(b"\r\n") if line.startswith(b"X-Request-Id:")]
    assert GENERATED.fullmatch(value.decode())


def test_the_document_lists_the_header_on_every_answer() -> None:
    answers: list[dict[str, Any]] = [
        answer
        for item in document(ROUTES)["paths"].values()
        for method, operation in item.items()
        if method != "parameters"
        for answer in operation["responses"].values()
    ]
    assert len(answers) > 20
    assert all(answer["headers"][HEADER]["required"] for answer in answers)
    # The headers an answer had before are still there.
    assert any("Retry-After" in answer["headers"] for answer in answers)
