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
the first size (target: flat within 20 %, a ratio of at most 1.2). Then the write cost of the
finished counts under contention: ``--threads`` connections finishing runs at once, runs per
second with the counting trigger on and, as the baseline, off. ``--ten-million`` adds the
10M step (the load alone takes long on a small machine). Uses SLUICE_TEST_DATABASE_URL /
SLUICE_TEST_REDIS_URL when set, else the embedded servers, in a database of its own, removed
afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from sluice_api import queries
from sluice_common import runstate
from sluice_common.db import Pool, migrate, open_pool
from sluice_common.ratelimit import LocalRateLimiter
from sluice_common.runs import NewRun, get_queue_stats, insert_run
from sluice_common.settings import Settings, load_settings
from sluice_scheduler.maintenance import prune_history

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_servers, finish_params
from pipeline import pct

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.scaledata import HISTORY_DAYS, Fleet, add_history, make_fleet  # noqa: E402

FIGURES = ("claim", "finish", "stats", "list", "filtered", "delete", "prune")


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = action()
    return (time.perf_counter() - start) * 1000, result


def ms(action: Callable[[], Any]) -> float:
    return timed(action)[0]


def measure(pool: Pool, settings: Settings, fleet: Fleet, size: int, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in FIGURES}
    wf, owner = fleet.workflows[2]
    with pool.connection() as conn:
        for _ in range(reps):
            insert_run(conn, settings, NewRun(wf, owner))
    claim = {"worker": "bench", "lease": 60.0, "user_cap": 100_000, "exclusive": False, "count": 1}
    limiter = LocalRateLimiter(settings.rate_limit_per_minute)
    busy_wf, busy_owner = fleet.busy
    quiet_wf, _ = fleet.quiet
    with pool.connection() as conn:
        for _ in range(reps):
            took, row = timed(lambda: conn.execute(runstate.CLAIM, claim).fetchone())
            out["claim"].append(took)
            assert row is not None
            finish = finish_params(row)
            out["finish"].append(ms(lambda f=finish: conn.execute(runstate.FINISH_ENDED, f).fetchone()))
    for _ in range(reps):
        out["stats"].append(ms(lambda: get_queue_stats(pool, settings, limiter, redis=False)))
        out["list"].append(
            ms(
                lambda: queries.list_runs(
                    pool, busy_owner, limit=50, after=None, workflow_id=None, status=None, since=None, until=None
                )
            )
        )
        out["filtered"].append(
            ms(
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
                    ms(lambda: conn.execute(runstate.CANCEL_WORKFLOW_RUNS, {"wf": busy_wf}).fetchall())
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
    assert before is not None
    assert after is not None
    out["prune"].append(elapsed / max(1, (before["n"] - after["n"]) / 1000))
    return out


def finishes_per_second(pool: Pool, settings: Settings, fleet: Fleet, *, threads: int, each: int) -> float:
    """Runs finished per second by ``threads`` connections finishing claimed runs at once."""
    wf, owner = fleet.workflows[3]
    claim = {"worker": "bench", "lease": 60.0, "user_cap": 100_000, "exclusive": False, "count": 1}
    claimed = []
    with pool.connection() as conn:
        for _ in range(threads * each):
            insert_run(conn, settings, NewRun(wf, owner))
            claimed.append(conn.execute(runstate.CLAIM, claim).fetchone())

    def finish(rows: list[Any]) -> None:
        with pool.connection() as conn:
            for row in rows:
                conn.execute(runstate.FINISH_ENDED, finish_params(row)).fetchone()

    workers = [threading.Thread(target=finish, args=(claimed[i::threads],)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(claimed) / (time.perf_counter() - start)


def finish_contention(pool: Pool, settings: Settings, fleet: Fleet, rounds: int, threads: int) -> None:
    """Concurrent finishes with the per-minute finished counts kept (every finish of a minute
    updates the same counter row) and, as the baseline in the same run, with their trigger off."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for counting in (True, False):
            with pool.connection() as conn:
                conn.execute(f"ALTER TABLE runs {'ENABLE' if counting else 'DISABLE'} TRIGGER runs_count_finished")
            rates[counting].append(finishes_per_second(pool, settings, fleet, threads=threads, each=100))
    with pool.connection() as conn:
        conn.execute("ALTER TABLE runs ENABLE TRIGGER runs_count_finished")
    with_counts, without = statistics.median(rates[True]), statistics.median(rates[False])
    print(
        f"\n{threads} connections finishing at once: {with_counts:.0f} runs/s with the finished counts, "
        f"{without:.0f} without (ratio {with_counts / without:.2f}; rounds: "
        + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(rates[True], rates[False], strict=True))
        + ")"
    )


def line(size: int, figures: dict[str, list[float]], base: dict[str, list[float]]) -> str:
    """One size's line: each figure's median / p99 and the median's ratio to the first size's."""
    cells = []
    for name in FIGURES:
        values = figures[name]
        med = statistics.median(values)
        ratio = med / max(statistics.median(base[name]), 1e-9)
        cells.append(f"{med:7.2f}/{pct(values, 0.99):7.2f} x{ratio:4.2f}")
    return f"{size:>10} " + " ".join(f"{c:>22}" for c in cells)


def header() -> str:
    return (
        "milliseconds, median / p99 (ratio of the median to the one at the first size)\n"
        + f"{'runs':>10} "
        + " ".join(f"{name:>22}" for name in FIGURES)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="finished runs at each step")
    parser.add_argument("--ten-million", action="store_true", help="add the 10,000,000 step")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8, help="connections finishing at once (contention)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the contention figure")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] + ([10_000_000] if args.ten_million else [])
    with bench_servers("scale") as srv:
        url = srv.databases["scale"]
        migrate(url)
        settings = load_settings({"DATABASE_URL": url, "SLUICE_LOG_LEVEL": "WARNING"})
        pool = open_pool(settings, url, max_size=args.threads + 2)
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
                    if size == sizes[0]:
                        print(header(), flush=True)
                    results[size] = measure(pool, settings, fleet, size, args.reps)
                    # Each line as soon as it is measured: the last steps take long.
                    print(line(size, results[size], results[sizes[0]]), flush=True)
                    if size == sizes[0]:  # the write cost under contention does not depend on the size
                        finish_contention(pool, settings, fleet, args.rounds, args.threads)
                    # The prune took some of the oldest runs: top up to the size at the next step.
                    with conn.cursor() as cur:
                        row = cur.execute("SELECT count(*) FROM runs").fetchone()
                    assert row is not None
                    loaded = int(row[0])
        finally:
            pool.close()
        print("\n" + header())
        for size, figures in sorted(results.items()):
            print(line(size, figures, results[sizes[0]]))


if __name__ == "__main__":
    main()
