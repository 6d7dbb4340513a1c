"""Secrets: list their names, put and delete one; steps use them as ``{{ secrets.NAME }}``."""

from __future__ import annotations

from typing import Any, ClassVar

import falcon

from sluice_api import schemas
from sluice_api.auth import caller_of
from sluice_api.inputs import read_json, validate
from sluice_api.openapi import AUTH, Operations, errors, json_body, ref, response
from sluice_api.resources.base import Resource, dump
from sluice_common import secrets
from sluice_common.secrets import SECRET_NAME_PATTERN


class SecretsResource(Resource):
    """``GET /api/secrets``: names and times only; values never leave the database decrypted."""

    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "listSecrets",
            "summary": "Your secrets' names (values are never returned)",
            "responses": {"200": response(ref(schemas.SecretList), "Names and times"), **errors(*AUTH)},
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        items = secrets.list_secrets(self._deps.pool, caller_of(req).user_id)
        resp.media = dump(schemas.SecretList(items=[schemas.Secret.model_validate(vars(i)) for i in items]))


class SecretResource(Resource):
    """``PUT|DELETE /api/secrets/{name}``: steps use a secret as ``{{ secrets.NAME }}``."""

    # The route takes any name; common checks it (a 422), and the document says which are valid.
    path_params: ClassVar[dict[str, dict[str, Any]]] = {"name": {"type": "string", "pattern": SECRET_NAME_PATTERN}}
    operations: ClassVar[Operations] = {
        "put": {
            "operationId": "putSecret",
            "summary": "Create or replace a secret (stored encrypted; steps use it as {{ secrets.NAME }})",
            "requestBody": json_body(ref(schemas.SecretValue)),
            "responses": {
                "200": response(ref(schemas.Secret), "Stored"),
                **errors(400, *AUTH, 413, 415, 422),
            },
        },
        "delete": {
            "operationId": "deleteSecret",
            "responses": {"204": {"description": "Deleted"}, **errors(*AUTH, 404, 422)},
        },
    }

    def on_put(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        body = validate(schemas.SecretValue, read_json(req, self._deps.settings.api_max_body_bytes))
        info = secrets.put_secret(self._deps.pool, self._deps.settings, caller_of(req).user_id, name, body.value)
        resp.media = dump(schemas.Secret.model_validate(vars(info)))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        secrets.delete_secret(self._deps.pool, caller_of(req).user_id, name)
        resp.status = falcon.HTTP_204
