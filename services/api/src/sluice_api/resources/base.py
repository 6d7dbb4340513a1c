"""What every resource family shares: the ``Resource`` base, paging, model dumps and run answers.

A resource is built with a :class:`Context` (one per app) and declares, as class attributes, the
operations it documents (``operations``, see ``sluice_api.openapi``), the query parameters it
takes (``query_params``, checked by ``KnownParamsMiddleware``) and whether it needs a token
(``public``, checked by ``AuthMiddleware``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

import falcon

from sluice_api import queries
from sluice_api.auth import RequestLimiter
from sluice_api.deps import Dependencies
from sluice_api.inputs import decode_cursor, encode_cursor, int_param
from sluice_api.openapi import Operations
from sluice_common.errors import FieldProblem, ValidationFailed

if TYPE_CHECKING:
    from sluice_api.routes import Route
    from sluice_api.stats import QueueStatsCache

PAGE_DEFAULT = 50
IDEMPOTENCY_KEY_MAX = 200


@dataclass(frozen=True)
class Context:
    """What resources are built with."""

    deps: Dependencies
    # The per-token (and per-webhook) request limit; the auth middleware counts in the same one.
    limiter: RequestLimiter
    # Every route of the app: the OpenAPI resource documents them.
    routes: tuple[Route, ...]
    # This process's queue stats, shared with the dashboard and the /metrics queue gauges.
    stats: QueueStatsCache


class Resource:
    """A Falcon resource: ``on_<method>`` responders, each with its entry in ``operations``."""

    operations: ClassVar[Operations] = {}
    query_params: ClassVar[frozenset[str]] = frozenset()
    public: ClassVar[bool] = False
    # Schemas of path fields the route template alone does not describe (see ``openapi_path``).
    path_params: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._deps = ctx.deps


def dump(model: Any) -> dict[str, Any]:
    """A response model as camelCase JSON."""
    out: dict[str, Any] = model.model_dump(by_alias=True, mode="json")
    return out


def page_params(params: dict[str, str]) -> tuple[int, Any]:
    """``limit`` and the decoded ``cursor`` of a list request."""
    return int_param(params, "limit", PAGE_DEFAULT, 1, queries.PAGE_MAX), decode_cursor(params)


def page(rows: list[dict[str, Any]], limit: int, at: str) -> tuple[list[dict[str, Any]], str | None]:
    """A page of at most ``limit`` rows (the queries return one more) and the next page's cursor."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1][at], rows[-1]["id"])


def idempotency_key(req: falcon.Request) -> str | None:
    key = req.get_header("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not (key.isascii() and key.isprintable()):
        raise ValidationFailed(
            [FieldProblem("header.Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters")]
        )
    return key


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def traceparent(req: falcon.Request) -> str | None:
    """The caller's W3C trace context, carried to the worker; anything malformed is dropped."""
    value = req.get_header("traceparent")
    return value if value is not None and _TRACEPARENT.fullmatch(value.strip().lower()) else None


def accepted(resp: falcon.Response, run_id: UUID, status: str) -> None:
    """The 202 of a queued run (the seeds' body)."""
    resp.status = falcon.HTTP_202
    resp.location = f"/api/runs/{run_id}"
    resp.media = {
        "success": True,
        "queued": True,
        "jobId": str(run_id),
        "runId": str(run_id),
        "message": "Workflow queued for execution",
        "status": status,
    }
