"""Benchmark of the run statements as the runs table grows, against the same statements at 10k runs.

    uv run python bench/scale.py [--sizes 10000,100000,1000000] [--ten-million] [--reps 300]

Grows one runs table with COPY (tests/scaledata.py: 30 days of finished runs, their attempts, steps
and cron fires) to each size in turn, and at each size measures, ``--reps`` times each:

- claim: the worker's claim statement (``runstate.CLAIM``) with a backlog of ready runs;
- finish: the worker's finishing statement (``runstate.FINISH_ENDED``) of a claimed run;
- stats: the queue stats of ``GET /api/workflows/queue/stats`` (``get_queue_stats``);
- list: ``GET /api/runs``'s first page of the busy owner (``queries.list_runs``);
- filtered: a list filter that matches almost nothing (``?workflowId=<a workflow>&status=cancelled``);
- delete: the statement that cancels a deleted workflow's runs (``CANCEL_WORKFLOW_RUNS``, on the
  busy workflow, rolled back);
- prune: one batch of 1,000 runs of the retention job (``prune_history``), per batch.

Prints each figure's median and p99 in milliseconds, and the ratio of each median to the one at
the first size (target: flat within 20 %, a ratio of at most 1.2). ``--ten-million`` adds the
10M step (the load alone takes long on a small machine). Uses SLUICE_TEST_DATABASE_URL /
SLUICE_TEST_REDIS_URL when set, else the embedded servers, in a database of its own, removed
afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from sluice_api import queries
from sluice_common import runstate
from sluice_common.db import Pool, migrate, open_pool
from sluice_common.ratelimit import LocalRateLimiter
from sluice_common.runs import get_queue_stats, insert_run
from sluice_common.settings import Settings, load_settings
from sluice_scheduler.maintenance import prune_history

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_servers
from pipeline import pct

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.scaledata import HISTORY_DAYS, Fleet, add_history, make_fleet  # noqa: E402

FIGURES = ("claim", "finish", "stats", "list", "filtered", "delete", "prune")


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def measure(pool: Pool, settings: Settings, fleet: Fleet, size: int, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in FIGURES}
    wf, owner = fleet.workflows[2]
    with pool.connection() as conn:
        for _ in range(reps):
            insert_run(conn, settings, workflow_id=wf, owner_id=owner, trigger_type="manual")
    claim = {"worker": "bench", "lease": 60.0, "user_cap": 100_000, "exclusive": False}
    limiter = LocalRateLimiter(settings.rate_limit_per_minute)
    busy_wf, busy_owner = fleet.busy
    quiet_wf, _ = fleet.quiet
    with pool.connection() as conn:
        for _ in range(reps):
            rows: list[Any] = []
            out["claim"].append(timed(lambda: rows.append(conn.execute(runstate.CLAIM, claim).fetchone())))
            row = rows[0]
            assert row is not None
            finish = {
                "id": row["id"],
                "claim": row["claim_id"],
                "attempt": row["attempt"],
                "status": "succeeded",
                "attempt_status": "succeeded",
                "error": None,
                "owner": row["owner_id"],
                "user_cap": 100_000,
                "step": "a",
                "pos": 0,
                "output": None,
                "started": datetime.now(UTC),
            }
            out["finish"].append(timed(lambda: conn.execute(runstate.FINISH_ENDED, finish).fetchone()))
    for _ in range(reps):
        out["stats"].append(timed(lambda: get_queue_stats(pool, settings, limiter, redis=False)))
        out["list"].append(
            timed(
                lambda: queries.list_runs(
                    pool, busy_owner, limit=50, after=None, workflow_id=None, status=None, since=None, until=None
                )
            )
        )
        out["filtered"].append(
            timed(
                lambda: queries.list_runs(
                    pool,
                    busy_owner,
                    limit=50,
                    after=None,
                    workflow_id=quiet_wf,  # type: ignore[arg-type]
                    status="cancelled",
                    since=None,
                    until=None,
                )
            )
        )
    with pool.connection() as conn:
        for _ in range(max(5, reps // 20)):
            with conn.transaction(force_rollback=True):
                out["delete"].append(
                    timed(lambda: conn.execute(runstate.CANCEL_WORKFLOW_RUNS, {"wf": busy_wf}).fetchall())
                )
    # About 3,000 of the oldest runs are past a retention this long.
    retention = HISTORY_DAYS * (1 - 3000 / size)
    with pool.connection() as conn:
        before = conn.execute("SELECT count(*) AS n FROM runs").fetchone()
    start = time.perf_counter()
    prune_history(pool, retention)
    elapsed = (time.perf_counter() - start) * 1000
    with pool.connection() as conn:
        after = conn.execute("SELECT count(*) AS n FROM runs").fetchone()
    assert before is not None and after is not None
    out["prune"].append(elapsed / max(1, (before["n"] - after["n"]) / 1000))
    return out


def report(results: dict[int, dict[str, list[float]]]) -> None:
    sizes = sorted(results)
    base = results[sizes[0]]
    print("\nmilliseconds, median / p99 (ratio of the median to the one at the first size)")
    print(f"{'runs':>10} " + " ".join(f"{name:>22}" for name in FIGURES))
    for size in sizes:
        cells = []
        for name in FIGURES:
            values = results[size][name]
            med = statistics.median(values)
            ratio = med / max(statistics.median(base[name]), 1e-9)
            cells.append(f"{med:7.2f}/{pct(values, 0.99):7.2f} x{ratio:4.2f}")
        print(f"{size:>10} " + " ".join(f"{c:>22}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="finished runs at each step")
    parser.add_argument("--ten-million", action="store_true", help="add the 10,000,000 step")
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] + ([10_000_000] if args.ten_million else [])
    with bench_servers("scale") as srv:
        url = srv.databases["scale"]
        migrate(url)
        settings = load_settings({"DATABASE_URL": url, "SLUICE_LOG_LEVEL": "WARNING"})
        pool = open_pool(settings, url)
        results: dict[int, dict[str, list[float]]] = {}
        try:
            with psycopg.connect(url) as conn:
                fleet = make_fleet(conn)
                loaded = 0
                for size in sizes:
                    start = time.monotonic()
                    add_history(conn, fleet, size - loaded, seed=size)
                    loaded = size
                    print(f"{size:>10} runs loaded in {time.monotonic() - start:.0f} s", flush=True)
                    results[size] = measure(pool, settings, fleet, size, args.reps)
                    # The prune took some of the oldest runs: top up to the size at the next step.
                    with conn.cursor() as cur:
                        row = cur.execute("SELECT count(*) FROM runs").fetchone()
                    assert row is not None
                    loaded = int(row[0])
        finally:
            pool.close()
        report(results)


if __name__ == "__main__":
    main()
