"""The baselines of the API and end-to-end benchmarks: a bare Falcon app under gunicorn.

- ``POST /items``: one INSERT per request (the API benchmark's baseline);
- ``POST /hooks`` (when ``BENCH_REDIS_URL`` is set): one INSERT and one Dramatiq send of
  ``touch(id)`` to the ``bench`` queue of ``BENCH_NAMESPACE``, which ``bench/baseline_worker.py``
  executes (the end-to-end benchmark's baseline).

Served as ``gunicorn 'bench.baseline_api:create()'`` with the same worker settings as ``sluice api``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import dramatiq
import falcon
from dramatiq.brokers.redis import RedisBroker
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


class Hooks(Items):
    def __init__(self, pool: ConnectionPool[Any], broker: RedisBroker) -> None:
        super().__init__(pool)
        self._broker = broker

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        super().on_post(req, resp)
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name="bench", actor_name="touch", args=(resp.media["id"],), kwargs={}, options={}
        )
        self._broker.enqueue(message)


def create() -> falcon.App[falcon.Request, falcon.Response]:
    pool = ConnectionPool(
        os.environ["BENCH_DATABASE_URL"], min_size=1, max_size=10, kwargs={"autocommit": True}, open=True
    )
    app = falcon.App()
    app.add_route("/items", Items(pool))
    if os.environ.get("BENCH_REDIS_URL"):
        broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"], namespace=os.environ["BENCH_NAMESPACE"])
        broker.declare_queue("bench")
        app.add_route("/hooks", Hooks(pool, broker))
    return app
