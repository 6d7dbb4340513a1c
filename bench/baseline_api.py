"""The API benchmark's baseline: a bare Falcon endpoint under gunicorn doing one INSERT per request.

Served as ``gunicorn 'bench.baseline_api:create()'`` with the same worker settings as ``sluice api``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import falcon
from psycopg_pool import ConnectionPool


class Items:
    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = pool

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = json.loads(req.bounded_stream.read() or b"{}")
        with self._pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO bench_items (data) VALUES (%s) RETURNING id", (json.dumps(body),)
            ).fetchone()
        assert row is not None
        resp.status = falcon.HTTP_202
        resp.media = {"id": row[0]}


def create() -> falcon.App[falcon.Request, falcon.Response]:
    pool = ConnectionPool(
        os.environ["BENCH_DATABASE_URL"], min_size=1, max_size=10, kwargs={"autocommit": True}, open=True
    )
    app = falcon.App()
    app.add_route("/items", Items(pool))
    return app
