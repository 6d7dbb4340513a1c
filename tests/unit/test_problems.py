"""The API's one error mapping: every error is RFC 9457 problem JSON, never a traceback."""

from typing import Any

import falcon
import falcon.testing
import psycopg
import psycopg_pool
import pytest
import redis

from sluice_api import problems
from sluice_common.errors import (
    AuthError,
    ConflictError,
    FieldProblem,
    InfrastructureError,
    NotFoundError,
    SluiceError,
    StepFailure,
    ValidationFailed,
)
from sluice_common.steps import StepError
from sluice_worker.expressions import ExpressionError
from sluice_worker.safehttp import HttpRefused
from sluice_worker.steps.base import StepFailed


class Raiser:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise self.exc


def client_raising(exc: Exception) -> falcon.testing.TestClient:
    app = falcon.App()
    problems.install(app)
    app.add_route("/boom", Raiser(exc))
    return falcon.testing.TestClient(app)


def problem(result: falcon.testing.Result) -> dict[str, Any]:
    assert result.headers["content-type"] == "application/problem+json"
    body = result.json
    assert isinstance(body, dict)
    assert {"type", "title", "status"} <= body.keys()
    assert body["status"] == result.status_code
    return body


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (NotFoundError("no such workflow"), 404),
        (ConflictError("workflow is paused"), 409),
        (AuthError("unknown token"), 401),
        (InfrastructureError("redis down"), 503),
    ],
)
def test_sluice_errors_map_to_status(exc: Exception, status: int) -> None:
    result = client_raising(exc).simulate_get("/boom")
    body = problem(result)
    assert result.status_code == status
    assert body["detail"] == str(exc)


def test_auth_errors_ask_for_a_bearer_token() -> None:
    result = client_raising(AuthError("x")).simulate_get("/boom")
    assert result.headers["www-authenticate"] == "Bearer"


def test_validation_lists_every_field() -> None:
    exc = ValidationFailed([FieldProblem("$.name", "too short"), FieldProblem("$.steps[0].id", "bad")])
    body = problem(client_raising(exc).simulate_get("/boom"))
    assert body["status"] == 422
    assert body["errors"] == [
        {"path": "$.name", "message": "too short"},
        {"path": "$.steps[0].id", "message": "bad"},
    ]


def test_unexpected_errors_hide_their_details() -> None:
    result = client_raising(RuntimeError("secret internals")).simulate_get("/boom")
    body = problem(result)
    assert result.status_code == 500
    assert "secret internals" not in result.text
    assert "Traceback" not in result.text
    assert body["title"] == "Internal Server Error"


def test_falcon_errors_and_unknown_routes_are_problems() -> None:
    client = client_raising(falcon.HTTPTooManyRequests(description="slow down", retry_after=7))
    result = client.simulate_get("/boom")
    assert problem(result)["detail"] == "slow down"
    assert result.headers["retry-after"] == "7"
    missing = client.simulate_get("/nowhere")
    assert missing.status_code == 404
    assert problem(missing)["status"] == 404


@pytest.mark.parametrize(
    "exc",
    [
        redis.ConnectionError("connection refused"),
        psycopg.OperationalError("server closed the connection"),
        psycopg_pool.PoolTimeout("no connection in 30 s"),
    ],
)
def test_backing_services_down_is_a_503_not_a_500(exc: Exception) -> None:
    result = client_raising(exc).simulate_get("/boom")
    assert result.status_code == 503
    assert result.headers["retry-after"] == "5"
    assert problem(result)["detail"] == "a backing service is unavailable"


@pytest.mark.parametrize(
    "exc",
    [
        StepFailed("fetch", "GET https://example.com answered 500"),
        StepError("key is empty", final=True),
        ExpressionError("no secret named 'KEY'"),
        HttpRefused("refused to connect to 127.0.0.1"),
        StepFailure("a step failed"),
    ],
)
def test_step_failures_are_never_answered_as_client_errors(exc: StepFailure) -> None:
    # Steps run in the worker; a step failure reaching the API is a bug, answered as one.
    assert isinstance(exc, SluiceError)
    result = client_raising(exc).simulate_get("/boom")
    assert result.status_code == 500
    assert problem(result)["title"] == "Internal Server Error"
    assert str(exc) not in result.text
