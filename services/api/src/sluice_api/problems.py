"""The one place where errors become HTTP responses: RFC 9457 ``application/problem+json``.

No response ever carries a traceback: unexpected exceptions are logged and answered with a
plain 500 problem.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon
import psycopg
import psycopg_pool
import redis

from sluice_common.errors import (
    AuthError,
    ConflictError,
    InfrastructureError,
    NotFoundError,
    SluiceError,
    ValidationFailed,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://sluice.dev/problems/"

_STATUS: list[tuple[type[SluiceError], int, str]] = [
    (ValidationFailed, 422, "validation-failed"),
    (NotFoundError, 404, "not-found"),
    (ConflictError, 409, "conflict"),
    (AuthError, 401, "unauthorized"),
    (InfrastructureError, 503, "unavailable"),
]


def problem_body(status: int, title: str, detail: str | None, slug: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": _TYPE_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body


def _respond(resp: falcon.Response, status: int, body: dict[str, Any]) -> None:
    resp.status = status
    resp.content_type = PROBLEM_JSON
    # Serialised here: Falcon's media handlers are keyed by content type and know only JSON.
    resp.text = json.dumps(body)


def handle_sluice_error(req: falcon.Request, resp: falcon.Response, exc: SluiceError, params: dict[str, Any]) -> None:
    for cls, status, slug in _STATUS:
        if isinstance(exc, cls):
            extra: dict[str, Any] = {}
            if isinstance(exc, ValidationFailed):
                extra["errors"] = [{"path": p.path, "message": p.message} for p in exc.problems]
            if isinstance(exc, AuthError):
                resp.set_header("WWW-Authenticate", "Bearer")
            title = falcon.code_to_http_status(status).split(" ", 1)[1]
            _respond(resp, status, problem_body(status, title, str(exc), slug, **extra))
            return
    handle_unexpected(req, resp, exc, params)


def handle_http_error(
    req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: dict[str, Any]
) -> None:
    status = exc.status_code
    slug = exc.title.lower().replace(" ", "-") if exc.title else str(status)
    if exc.headers:
        resp.set_headers(exc.headers)
    _respond(resp, status, problem_body(status, exc.title or str(status), exc.description, slug))


def handle_unavailable(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
    """PostgreSQL or Redis did not answer: a 503 the client may retry, not a 500."""
    log.warning("%s %s: backing service unavailable: %s", req.method, _loggable(req.path), type(exc).__name__)
    resp.set_header("Retry-After", "5")
    _respond(resp, 503, problem_body(503, "Service Unavailable", "a backing service is unavailable", "unavailable"))


def _loggable(path: str) -> str:
    # A webhook's path is its secret.
    return "/api/hooks/<secret>" if path.startswith("/api/hooks/") else path


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
    if isinstance(exc, falcon.HTTPError):
        handle_http_error(req, resp, exc, params)
        return
    log.exception("unhandled error on %s %s", req.method, _loggable(req.path))
    _respond(resp, 500, problem_body(500, "Internal Server Error", None, "internal"))


def install(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    # Falcon looks handlers up by the most specific class, so the catch-all goes first.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(SluiceError, handle_sluice_error)
    for unavailable in (redis.RedisError, psycopg.OperationalError, psycopg_pool.PoolTimeout):
        app.add_error_handler(unavailable, handle_unavailable)
