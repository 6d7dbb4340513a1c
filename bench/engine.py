"""Benchmark of the workflow engine's per-step overhead: 3-step workflows next to 1-step ones.

    uv run python bench/engine.py [--runs 2000] [--processes 1]

Uses SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else the embedded servers, in a
database and Redis namespace of its own that are removed afterwards. Worker processes are started
first and left idle; each batch of runs is written in one statement and then woken, so the
workers drain it at full speed without waiting for the producer. Prints, per workflow kind:

- throughput (runs/s from the first start to the last finish);
- worker CPU per run (user + system time of the worker processes, divided by the runs);

and the per-step overhead: the extra worker CPU of the two extra steps, halved (target < 2 ms),
next to the same figure in thread time from wall-clock throughput (which also counts waiting for
PostgreSQL's checkpoint round trip, and on a small machine waiting for a CPU). The steps are no-op-ish transforms that
render a template over the run context, so the overhead is the engine's: rendering, one
checkpoint round trip to PostgreSQL, cancel and deadline checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_servers, worker_env
from pipeline import spawn, stop, wait_until

from sluice_common.broker import make_broker, send_run_message
from sluice_common.db import migrate, open_pool
from sluice_common.settings import load_settings

THREADS = 10
ONE_STEP = [{"id": "a", "type": "transform", "config": {"value": {"n": "{{ trigger.n }}", "run": "{{ run.id }}"}}}]
THREE_STEPS = [
    *ONE_STEP,
    {"id": "b", "type": "transform", "config": {"value": "{{ steps.a.n + 1 }}"}},
    {"id": "c", "type": "transform", "config": {"value": {"sum": "{{ steps.a.n + steps.b }}"}}},
]


def cpu_seconds(procs: list[Any]) -> float:
    total = 0.0
    for p in procs:
        times = psutil.Process(p.pid).cpu_times()
        total += times.user + times.system
    return total


def batch(pool: Any, broker: Any, procs: list[Any], user: Any, wf: Any, n: int, label: str) -> dict[str, float]:
    """Queue ``n`` runs at once, wake the idle workers, let them drain the batch, measure."""
    with pool.connection() as conn:
        # One statement writes the whole batch, so the producer never limits the workers.
        ids = conn.execute(
            "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, trigger_data, status, "
            "max_attempts) SELECT %s, %s, 1, 'manual', jsonb_build_object('n', g), 'queued', 1 "
            "FROM generate_series(1, %s) AS g RETURNING id",
            (wf, user, n),
        ).fetchall()
    cpu_before = cpu_seconds(procs)
    for row in ids:
        send_run_message(broker, str(row["id"]))
    with pool.connection() as conn:

        def done() -> bool:
            row = conn.execute(
                "SELECT count(*) AS c FROM runs WHERE workflow_id = %s AND status IN ('succeeded', 'failed')", (wf,)
            ).fetchone()
            return bool(row and row["c"] >= n)

        wait_until(done, 600, f"{label} runs")
        cpu_after = cpu_seconds(procs)
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'failed') AS failed, "
            "extract(epoch FROM max(finished_at) - min(started_at)) AS s FROM runs WHERE workflow_id = %s",
            (wf,),
        ).fetchone()
    assert row is not None
    if row["failed"]:
        raise SystemExit(f"{row['failed']} {label} runs failed")
    seconds = max(float(row["s"]), 1e-6)
    return {"throughput": n / seconds, "cpu_ms": (cpu_after - cpu_before) / n * 1000}


def bench(
    db_url: str, redis_url: str, prefix: str, n: int, processes: int
) -> tuple[dict[str, float], dict[str, float]]:
    env_vars = worker_env(db_url, redis_url, prefix, THREADS)
    settings = load_settings(env_vars)
    pool = open_pool(settings, db_url, name="bench", max_size=4)
    broker = make_broker(settings, redis_url)
    with pool.connection() as conn:
        user = conn.execute("INSERT INTO users (name) VALUES ('bench') RETURNING id").fetchone()
        assert user is not None
        wfs = {}
        for label, steps in (("1-step", ONE_STEP), ("3-step", THREE_STEPS)):
            row = conn.execute(
                "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
                "VALUES (%s, %s, 'manual', %s, %s) RETURNING id",
                (user["id"], label, Jsonb({"type": "manual"}), Jsonb(steps)),
            ).fetchone()
            assert row is not None
            wfs[label] = row["id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")} | env_vars
    procs = [spawn([sys.executable, "-m", "sluice_worker"], env) for _ in range(processes)]
    try:
        time.sleep(3)  # imports and connections done: the workers are idle
        # A short warm-up batch of each kind (template caches, connection pools), not counted.
        for label in wfs:
            with pool.connection() as conn:
                warm = conn.execute(
                    "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
                    "SELECT owner_id, name || ' warm-up', trigger_type, trigger, steps FROM workflows WHERE id = %s "
                    "RETURNING id",
                    (wfs[label],),
                ).fetchone()
            assert warm is not None
            batch(pool, broker, procs, user["id"], warm["id"], 100, label + " warm-up")
        one = batch(pool, broker, procs, user["id"], wfs["1-step"], n, "1-step")
        three = batch(pool, broker, procs, user["id"], wfs["3-step"], n, "3-step")
    finally:
        stop(procs)
        broker.close()
        pool.close()
    return one, three


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()

    with bench_servers("engine") as servers:
        url = servers.databases["engine"]
        migrate(url)
        one, three = bench(url, servers.redis_url, servers.prefix, args.runs, args.processes)

    slots = args.processes * THREADS
    wall_step = (slots / three["throughput"] - slots / one["throughput"]) / 2 * 1000
    cpu_step = (three["cpu_ms"] - one["cpu_ms"]) / 2
    print(f"\nworkflow engine: {args.runs} runs per kind, {args.processes} worker process(es) x {THREADS} threads")
    print(f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs)")
    print(f"{'':24}{'runs/s':>10}{'worker CPU ms/run':>20}")
    print(f"{'1-step workflows':24}{one['throughput']:10.0f}{one['cpu_ms']:20.2f}")
    print(f"{'3-step workflows':24}{three['throughput']:10.0f}{three['cpu_ms']:20.2f}")
    print(f"per-step overhead: {cpu_step:.2f} ms of worker CPU (target < 2 ms); {wall_step:.2f} ms of a worker thread")


if __name__ == "__main__":
    main()
