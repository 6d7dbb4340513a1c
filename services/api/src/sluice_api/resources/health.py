"""The service's own endpoints: liveness, readiness and the OpenAPI document (all without a token)."""

from __future__ import annotations

from typing import ClassVar

import falcon

from sluice_api import schemas
from sluice_api.openapi import Operations, document, ref, response
from sluice_api.resources.base import Resource


class HealthResource(Resource):
    """Liveness: the process answers."""

    public = True
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "health",
            "responses": {"200": response(ref(schemas.Health), "The process answers")},
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource(Resource):
    """Readiness: PostgreSQL and Redis both answer, else 503."""

    public = True
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "ready",
            "responses": {
                "200": response(ref(schemas.Ready), "PostgreSQL and Redis answer"),
                "503": response(ref(schemas.Ready), "A backing service does not answer"),
            },
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks: dict[str, str] = {}
        try:
            with self._deps.pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        if self._deps.redis is None:
            checks["redis"] = "not used (standalone)"
        else:
            try:
                self._deps.redis.ping()
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = f"error: {type(exc).__name__}"
        ready = not any(v.startswith("error") for v in checks.values())
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"status": "ready" if ready else "unavailable", "checks": checks}


class OpenApiResource(Resource):
    """``GET /api/openapi.json``: the document of the app's own routes."""

    public = True
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "openapi",
            "responses": {"200": response({"type": "object"}, "This document")},
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = document(self._ctx.routes)
