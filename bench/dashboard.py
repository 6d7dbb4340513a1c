"""Benchmark of the dashboard's runs list and run page on a table of a million runs.

    uv run python bench/dashboard.py [--runs 1000000] [--requests 40]

Loads the runs with COPY (one user owns most of them, over five workflows, a month of queue
times, mostly succeeded, some failed and cancelled; another user owns the rest), then renders the
pages through the real app in this process (the session middleware, the queries, the templates;
no HTTP server in the way) and prints the median and p95 of each page. Target: under 100 ms at
the median for the runs list (with its filters and a deep page) and the run page. Uses
SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else the embedded servers, in a
database and Redis namespace of its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import falcon.testing
import psycopg
import redis
from psycopg.types.json import Jsonb

from sluice_api.app import Dependencies, create_app
from sluice_api.dashboard import sessions
from sluice_common import users
from sluice_common.broker import make_broker
from sluice_common.db import migrate, open_pool
from sluice_common.ratelimit import RedisRateLimiter
from sluice_common.settings import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_servers

TARGET_MS = 100.0
WORKFLOWS = 5
OWN_SHARE = 0.8  # of the runs, the measured user's
STEPS = [{"id": f"s{i}", "type": "transform", "config": {"value": i}} for i in range(5)]


def load(url: str, total: int) -> tuple[str, list[str], str]:
    """Users, workflows and ``total`` runs; returns (the user's token, their workflow ids, a run id)."""
    rng = random.Random(7)  # noqa: S311 - made-up data, not secrets
    with psycopg.connect(url, autocommit=True) as conn:
        issued = users.create_user(conn, "bench")
        token, owner = issued.token, issued.user.id
        other = users.create_user(conn, "other").user.id
        flows: list[tuple[str, object]] = []
        for i in range(WORKFLOWS + 1):
            who = owner if i < WORKFLOWS else other
            row = conn.execute(
                "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
                "VALUES (%s, %s, 'manual', %s, %s) RETURNING id",
                (who, f"flow {i}", Jsonb({"type": "manual"}), Jsonb(STEPS)),
            ).fetchone()
            assert row is not None
            flows.append((str(row[0]), who))
        now = datetime.now(UTC)
        month = 30 * 86400
        started = time.monotonic()
        columns = (
            "id, workflow_id, owner_id, workflow_version, trigger_type, status, priority, attempt, max_attempts, "
            "queued_at, started_at, finished_at, error"
        )
        with conn.cursor() as cur, cur.copy(f"COPY runs ({columns}) FROM STDIN") as copy:
            for n in range(total):
                mine = n < total * OWN_SHARE
                wf, who = flows[n % WORKFLOWS] if mine else flows[WORKFLOWS]
                roll = rng.random()
                status = "succeeded" if roll < 0.97 else "failed" if roll < 0.99 else "cancelled"
                queued = now - timedelta(seconds=rng.random() * month)
                begun = queued + timedelta(milliseconds=rng.randint(1, 2000))
                ended = begun + timedelta(milliseconds=rng.randint(5, 5000))
                trigger = ("manual", "cron", "webhook")[n % 3]
                copy.write_row(
                    (
                        uuid.uuid4(),
                        wf,
                        who,
                        1,
                        trigger,
                        status,
                        rng.randint(1, 10),
                        1,
                        3,
                        queued,
                        begun,
                        ended,
                        "boom" if status == "failed" else None,
                    )
                )
        print(f"loaded {total} runs with COPY in {time.monotonic() - started:.1f} s")
        conn.execute("ANALYZE runs")
        run = conn.execute(
            "SELECT id, started_at FROM runs WHERE owner_id = %s ORDER BY queued_at DESC LIMIT 1", (owner,)
        ).fetchone()
        assert run is not None
        with conn.cursor() as cur:
            for i, step in enumerate(STEPS):
                at = run[1] + timedelta(milliseconds=150 * i)
                cur.execute(
                    "INSERT INTO run_steps (run_id, step_id, position, status, attempt, output, started_at, "
                    "finished_at) VALUES (%s, %s, %s, 'succeeded', 1, %s, %s, %s)",
                    (run[0], step["id"], i, Jsonb({"value": i}), at, at + timedelta(milliseconds=120)),
                )
    return token, [f for f, who in flows if who == owner], str(run[0])


def measure(client: falcon.testing.TestClient, cookie: dict[str, str], path: str, requests: int) -> list[float]:
    took = []
    for _ in range(requests):
        start = time.perf_counter()
        answer = client.simulate_get(path, cookies=cookie)
        took.append((time.perf_counter() - start) * 1000)
        if answer.status_code != 200:
            raise SystemExit(f"{path}: {answer.status_code}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    with bench_servers("dash") as servers:
        url = servers.databases["dash"]
        migrate(url)
        token, flows, run_id = load(url, args.runs)
        settings = load_settings(
            {
                "DATABASE_URL": url,
                "REDIS_URL": servers.redis_url,
                "SLUICE_REDIS_PREFIX": servers.prefix,
                "SLUICE_API_RATE_LIMIT_PER_MINUTE": "0",  # this many requests would hit the token's limit
            }
        )
        pool = open_pool(settings, url, name="bench")
        client_redis = redis.Redis.from_url(servers.redis_url)
        broker = make_broker(settings, servers.redis_url)
        limiter = RedisRateLimiter(client_redis, settings.redis_prefix, settings.rate_limit_per_minute)
        try:
            app = create_app(Dependencies(settings, pool, client_redis, broker, limiter))
            client = falcon.testing.TestClient(app)
            session = sessions.open_session(pool, token, 1)
            cookie = {sessions.SESSION_COOKIE: session.id}
            first = client.simulate_get("/runs", cookies=cookie).text
            cursor = first.split("cursor=", 1)[1].split('"', 1)[0] if "cursor=" in first else ""
            # A deep page: the cursor of a run a week back.
            deep = client.simulate_get(
                "/runs?until=" + (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M"), cookies=cookie
            ).text
            deep_cursor = deep.split("cursor=", 1)[1].split('"', 1)[0]
            pages = {
                "runs list": "/runs",
                "runs, next page": f"/runs?cursor={cursor}",
                "runs, a week back": f"/runs?cursor={deep_cursor}",
                "runs, failed": "/runs?status=failed",
                "runs, cancelled webhook": "/runs?status=cancelled&trigger=webhook",
                "runs, one workflow failed": f"/runs?workflow={flows[0]}&status=failed",
                "runs, a day's range": "/runs?since="
                + (datetime.now(UTC) - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M")
                + "&until="
                + (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M"),
                "runs, none queued": "/runs?status=queued",
                "runs, no retry trigger": "/runs?trigger=retry",
                "runs, 2 filters, no match": f"/runs?workflow={flows[0]}&status=queued",
                "run page": f"/runs/{run_id}",
                "run page, live part": f"/runs/{run_id}/live",
                "workflows": "/",
                "queue": "/queue",
            }
            print(f"{args.runs} runs; {args.requests} requests a page, in process (app, queries, templates)")
            print(f"{'page':28} {'median ms':>10} {'p95 ms':>8}  target < {TARGET_MS:.0f} ms at the median")
            failed = []
            for name, path in pages.items():
                measure(client, cookie, path, 3)  # warm the caches as an operator's open page would
                took = sorted(measure(client, cookie, path, args.requests))
                median = statistics.median(took)
                p95 = took[int(len(took) * 0.95) - 1]
                verdict = "ok" if median < TARGET_MS else "SLOW"
                if median >= TARGET_MS:
                    failed.append(name)
                print(f"{name:28} {median:10.1f} {p95:8.1f}  {verdict}")
            if failed:
                raise SystemExit(f"over {TARGET_MS:.0f} ms at the median: {', '.join(failed)}")
        finally:
            broker.close()
            client_redis.close()
            pool.close()


if __name__ == "__main__":
    main()
