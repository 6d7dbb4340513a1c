"""The webhook trigger: ``POST /api/hooks/{secret}`` queues a run with the body as its trigger data."""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import parse_qsl
from uuid import UUID

import falcon

from sluice_api import queries, schemas
from sluice_api.auth import too_many
from sluice_api.inputs import check_storable, media_type, parse_json, read_body
from sluice_api.openapi import IDEMPOTENCY_HEADER, Operations, errors, ref, response
from sluice_api.resources.base import Context, Resource, accepted, idempotency_key, traceparent
from sluice_common.errors import NotFoundError
from sluice_common.runs import NewRun, enqueue_run

# Webhooks whose workflow a process remembers (see HookResource); past this many it starts over.
KNOWN_HOOKS = 10_000


def _webhook_data(req: falcon.Request, limit: int) -> Any:
    data = read_body(req, limit)
    if not data.strip():
        return {}
    kind = media_type(req)
    if kind in ("", "application/json") or kind.endswith("+json"):
        return parse_json(data)
    if kind == "application/x-www-form-urlencoded":
        try:
            form: Any = dict(parse_qsl(data.decode(), keep_blank_values=True))
        except UnicodeDecodeError:
            raise falcon.HTTPBadRequest(title="Bad Request", description="the form is not UTF-8") from None
        check_storable(form)
        return form
    if kind.startswith("text/"):
        text = {"text": data.decode(errors="replace")}
        check_storable(text)
        return text
    raise falcon.HTTPUnsupportedMediaType(
        title="Unsupported Media Type",
        description=f"send JSON, a form or text, not {kind}",
    )


class HookResource(Resource):
    """``POST /api/hooks/{secret}``: the secret is the credential; its body becomes trigger data."""

    public = True
    operations: ClassVar[Operations] = {
        "post": {
            "operationId": "webhook",
            "summary": "Trigger a webhook workflow; the body (JSON, form or text) becomes its trigger data",
            "parameters": [IDEMPOTENCY_HEADER],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
            "responses": {
                "202": response(ref(schemas.RunAccepted), "Queued"),
                **errors(400, 404, 409, 413, 415, 422, 429, 503),
            },
        },
    }

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._limiter = ctx.limiter
        # Secret hash -> (workflow id, owner id) of hooks this process has served. Only a hint: the
        # run's insert checks the secret again, so an entry made stale by a rotation or a delete
        # is refused there (404, as before) and dropped.
        self._targets: dict[bytes, tuple[UUID, UUID]] = {}

    def on_post(self, req: falcon.Request, resp: falcon.Response, secret: str) -> None:
        digest = queries.webhook_hash(secret)
        target = self._targets.get(digest)
        if target is None:
            target = queries.webhook_target(self._deps.pool, digest)
            if len(self._targets) >= KNOWN_HOOKS:
                self._targets.clear()
            self._targets[digest] = target
        workflow_id, owner = target
        wait = self._limiter.hit(f"hook:{workflow_id}")
        if wait is not None:
            raise too_many(wait)
        data = _webhook_data(req, self._deps.settings.api_max_body_bytes)
        try:
            run = enqueue_run(
                self._deps.pool,
                self._deps.broker,
                self._deps.settings,
                NewRun(
                    workflow_id,
                    owner,
                    "webhook",
                    data,
                    idempotency_key=idempotency_key(req),
                    traceparent=traceparent(req),
                    webhook_secret_hash=digest,
                ),
                sender=self._deps.sender,
                inserts=self._deps.inserts,
            )
        except NotFoundError:
            self._targets.pop(digest, None)
            raise NotFoundError("no such webhook") from None
        accepted(resp, run.run_id, run.status)
