"""Benchmark of the run pipeline against a bare Dramatiq baseline, measured in the same run.

    uv run python bench/pipeline.py [--runs 4000] [--processes 2] [--rate 100] [--seconds 10] [--rounds 3]
                                    [--metrics] [--tracing]

Uses SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else the embedded servers, in a
database and Redis namespace of its own that are removed afterwards. Prints:

- sustained throughput: N one-step runs through producer, Redis, worker processes and
  PostgreSQL, next to the baseline actor doing one UPDATE per message (target ratio >= 0.6),
  both counted between the 10th and 90th percentile of completions (see ``sustained``), in
  alternating rounds (every round's ratio, and the median one);
- enqueue-to-start latency p50/p99 with runs sent at a steady rate (target p99 < 25 ms at
  100 runs/s), next to the baseline's enqueue-to-execution latency;
- worker RSS at concurrency 10 (target < 150 MB), and the CPU an idle worker process uses;
- with ``--metrics``, each round also runs the pipeline with the workers' metrics on (each
  scraped every second, as Prometheus would), and the throughput with metrics is compared with
  the one without (target ratio >= 0.97: metrics cost at most 3 %);
- with ``--tracing``, each round also runs it with the workers exporting every run's spans to a
  real OTLP/HTTP receiver in this process (target ratio >= 0.85: tracing costs at most 15 %).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import dramatiq
import psutil
import psycopg
from dramatiq.brokers.redis import RedisBroker
from psycopg.types.json import Jsonb

from sluice_common.broker import make_broker
from sluice_common.db import migrate, open_pool
from sluice_common.runs import NewRun, enqueue_run
from sluice_common.settings import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_servers, worker_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.otlp import OtlpReceiver, receive  # noqa: E402

THREADS = 10


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sustained(finished: list[Any]) -> float:
    """Completions per second between the 10th and the 90th percentile of completion times.

    Both sides are measured the same way: the first and last tenth are left out, so that neither
    the worker processes' start (imports, connections, one process ready before the other) nor
    the tail (the last runs finishing on fewer threads) counts; what is left is the steady rate.
    """
    times = sorted(float(t) for t in finished)
    low, high = times[len(times) // 10], times[(len(times) * 9) // 10]
    return (len(times) * 9 // 10 - len(times) // 10) / max(high - low, 1e-6)


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """User and system CPU the processes have used so far."""
    total = 0.0
    for proc in procs:
        times = psutil.Process(proc.pid).cpu_times()
        total += times.user + times.system
    return total


def idle_cpu(procs: list[subprocess.Popen[bytes]], seconds: float = 3.0) -> float:
    """CPU used by idle worker processes, in percent of one core (the most busy one)."""
    handles = [psutil.Process(p.pid) for p in procs]
    before = [sum(h.cpu_times()[:2]) for h in handles]
    time.sleep(seconds)
    return max((sum(h.cpu_times()[:2]) - b) / seconds * 100 for h, b in zip(handles, before, strict=True))


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def baseline(
    db_url: str, redis_url: str, ns: str, n: int, processes: int, rate: float, seconds: float
) -> dict[str, float]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_items (id int PRIMARY KEY, sent_at timestamptz, done_at timestamptz)")
        conn.execute("INSERT INTO bench_items (id) SELECT generate_series(1, %s)", (n + int(rate * seconds) + 10,))
    broker = RedisBroker(url=redis_url, namespace=ns)
    broker.declare_queue("bench")

    def send(item: int) -> None:
        broker.enqueue(dramatiq.Message(queue_name="bench", actor_name="touch", args=(item,), kwargs={}, options={}))

    # Throughput: fill the queue, then let the workers drain it.
    for i in range(1, n + 1):
        send(i)
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": db_url,
        "BENCH_REDIS_URL": redis_url,
        "BENCH_NAMESPACE": ns,
        "BENCH_THREADS": str(THREADS),
    }
    procs = [spawn([sys.executable, str(ROOT / "bench" / "baseline_worker.py")], env) for _ in range(processes)]
    with psycopg.connect(db_url, autocommit=True) as conn:

        def done() -> bool:
            row = conn.execute("SELECT count(done_at) FROM bench_items WHERE id <= %s", (n,)).fetchone()
            return bool(row and row[0] >= n)

        wait_until(done, 300, "baseline throughput")
        throughput = sustained(
            [r[0] for r in conn.execute("SELECT extract(epoch FROM done_at) FROM bench_items WHERE id <= %s", (n,))]
        )
        # Latency at a steady rate: time from send to the UPDATE (not in throughput-only rounds).
        ids = list(range(n + 1, n + int(rate * seconds) + 1))
        start = time.monotonic()
        for k, item in enumerate(ids):
            target = start + k / rate
            time.sleep(max(0.0, target - time.monotonic()))
            conn.execute("UPDATE bench_items SET sent_at = clock_timestamp() WHERE id = %s", (item,))
            send(item)

        def all_done() -> bool:
            r = conn.execute(
                "SELECT count(done_at) FROM bench_items WHERE id > %s AND sent_at IS NOT NULL", (n,)
            ).fetchone()
            return bool(r and r[0] >= len(ids))

        if ids:
            wait_until(all_done, 120, "baseline latency")
        lat = [
            float(r[0]) * 1000
            for r in conn.execute(
                "SELECT extract(epoch FROM done_at - sent_at) FROM bench_items WHERE id > %s AND sent_at IS NOT NULL",
                (n,),
            ).fetchall()
        ]
    rss = max(psutil.Process(p.pid).memory_info().rss for p in procs) / 2**20
    idle = idle_cpu(procs) if ids else float("nan")
    stop(procs)
    broker.close()
    return {
        "throughput": throughput,
        "cpu_ms": float("nan"),  # not measured for the baseline
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "rss": rss,
        "idle": idle,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_every_second(ports: list[int], stopping: threading.Event) -> None:
    """Read each worker's /metrics once a second, as a Prometheus server would."""
    while not stopping.wait(1.0):
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    resp.read()
            except OSError:
                pass  # not listening yet


def sluice(
    db_url: str,
    redis_url: str,
    prefix: str,
    n: int,
    processes: int,
    rate: float,
    seconds: float,
    *,
    metrics: bool = False,
    receiver: OtlpReceiver | None = None,
) -> dict[str, float]:
    env_vars = worker_env(db_url, redis_url, prefix, THREADS)
    settings = load_settings(env_vars)
    pool = open_pool(settings, db_url, name="bench", max_size=4)
    broker = make_broker(settings, redis_url)
    with pool.connection() as conn:
        user = conn.execute("INSERT INTO users (name) VALUES ('bench') RETURNING id").fetchone()
        assert user is not None
        wf = conn.execute(
            "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
            "VALUES (%s, 'bench', 'manual', %s, %s) RETURNING id",
            (user["id"], Jsonb({"type": "manual"}), Jsonb([{"id": "a", "type": "transform", "config": {"value": 1}}])),
        ).fetchone()
        assert wf is not None

    def enqueue() -> None:
        enqueue_run(pool, broker, settings, NewRun(wf["id"], user["id"]))

    for _ in range(n):
        enqueue()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "OTEL_"))} | env_vars
    if receiver is not None:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    ports = [free_port() for _ in range(processes)] if metrics else []
    scraping = threading.Event()
    if metrics:
        procs = [spawn([sys.executable, "-m", "sluice_worker"], env | {"SLUICE_METRICS_PORT": str(p)}) for p in ports]
        threading.Thread(target=scrape_every_second, args=(ports, scraping), daemon=True).start()
    else:
        procs = [spawn([sys.executable, "-m", "sluice_worker"], env) for _ in range(processes)]
    with pool.connection() as conn:

        def succeeded() -> int:
            row = conn.execute("SELECT count(*) AS c FROM runs WHERE status = 'succeeded'").fetchone()
            return int(row["c"]) if row else 0

        # The workers' CPU per run, from their first finished run (start-up excluded) to the last:
        # unlike throughput it hardly moves with other load on the machine.
        wait_until(lambda: succeeded() > 0, 600, "sluice's first run")
        first, cpu_first = succeeded(), cpu_seconds(procs)
        wait_until(lambda: succeeded() >= n, 600, "sluice throughput")
        cpu_ms = 1000 * (cpu_seconds(procs) - cpu_first) / max(1, succeeded() - first)
        throughput = sustained(
            [r["t"] for r in conn.execute("SELECT extract(epoch FROM finished_at) AS t FROM runs").fetchall()]
        )
        conn.execute("UPDATE runs SET trigger_type = 'retry'")  # mark the throughput batch
        conn.commit()
    rss = max(psutil.Process(p.pid).memory_info().rss for p in procs) / 2**20
    count = int(rate * seconds)
    start = time.monotonic()
    for k in range(count):
        time.sleep(max(0.0, start + k / rate - time.monotonic()))
        enqueue()
    with pool.connection() as conn:

        def all_done() -> bool:
            r = conn.execute(
                "SELECT count(*) AS c FROM runs WHERE trigger_type = 'manual' AND status = 'succeeded'"
            ).fetchone()
            return bool(r and r["c"] >= count)

        if count:
            wait_until(all_done, 120, "sluice latency")
        lat = [
            float(r["ms"])
            for r in conn.execute(
                "SELECT extract(epoch FROM started_at - queued_at) * 1000 AS ms FROM runs WHERE trigger_type = 'manual'"
            ).fetchall()
        ]
    rss = max(rss, *(psutil.Process(p.pid).memory_info().rss / 2**20 for p in procs))
    idle = idle_cpu(procs) if count else float("nan")
    scraping.set()
    stop(procs)
    broker.close()
    pool.close()
    return {
        "throughput": throughput,
        "cpu_ms": cpu_ms,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "rss": rss,
        "idle": idle,
    }


def report_variant(
    results: list[tuple[dict[str, float], dict[str, float]]], variant: list[dict[str, float]], title: str, target: float
) -> None:
    """A variant's rounds against the plain pipeline's: throughput (target ratio >= ``target``) and
    the workers' CPU per run (<= ``1 / target``, as the pipeline is CPU-bound). Neither is steady
    on a small shared machine: a slow round also spends more CPU per run polling."""
    print(f"\n{title}, against the same pipeline without:")
    rates = [v["throughput"] / o["throughput"] for (_, o), v in zip(results, variant, strict=True)]
    cpus = [v["cpu_ms"] / o["cpu_ms"] for (_, o), v in zip(results, variant, strict=True)]
    for i, ((_, o), v) in enumerate(zip(results, variant, strict=True)):
        print(
            f"  round {i + 1}: without {o['throughput']:.0f}, with {v['throughput']:.0f} runs/s: {rates[i]:.3f}; "
            f"worker CPU per run {o['cpu_ms']:.3f} and {v['cpu_ms']:.3f} ms: {cpus[i]:.3f}"
        )
    middle = len(rates) // 2
    print(f"{'throughput ratio, median':28}{sorted(rates)[middle]:12.3f}{'':20}  >= {target:.2f}")
    print(f"{'CPU per run ratio, median':28}{sorted(cpus)[middle]:12.3f}{'':20}  <= {1 / target:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metrics", action="store_true", help="also run with the workers' metrics on and compare")
    parser.add_argument("--tracing", action="store_true", help="also run with tracing to a local receiver and compare")
    args = parser.parse_args()

    rounds = max(1, args.rounds)
    sides = ("base", "sluice", *(("metrics",) if args.metrics else ()), *(("tracing",) if args.tracing else ()))
    names = [f"{side}{i}" for i in range(rounds) for side in sides]
    results: list[tuple[dict[str, float], dict[str, float]]] = []
    spans = 0
    with bench_servers(*names) as servers, receive() as receiver:
        # The same pipeline again with one thing on, in every round.
        variants: list[tuple[str, dict[str, Any]]] = [
            *((("metrics", {"metrics": True}),) if args.metrics else ()),
            *((("tracing", {"receiver": receiver}),) if args.tracing else ()),
        ]
        measured: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
        # Alternating rounds, so that background load on the machine hits both sides alike; the
        # last one also measures latency, memory and idle CPU.
        for i in range(rounds):
            seconds = args.seconds if i == rounds - 1 else 0.0
            base = baseline(
                servers.databases[f"base{i}"],
                servers.redis_url,
                f"{servers.prefix}_base{i}",
                args.runs,
                args.processes,
                args.rate,
                seconds,
            )
            url = servers.databases[f"sluice{i}"]
            migrate(url)
            prefix = f"{servers.prefix}_sluice{i}"
            ours = sluice(url, servers.redis_url, prefix, args.runs, args.processes, args.rate, seconds)
            results.append((base, ours))
            for name, options in variants:
                url = servers.databases[f"{name}{i}"]
                migrate(url)
                prefix = f"{servers.prefix}_{name}{i}"
                measured[name].append(
                    sluice(url, servers.redis_url, prefix, args.runs, args.processes, args.rate, 0.0, **options)
                )
        spans = len(receiver.received())

    print(f"\nrun pipeline: {args.runs} one-step runs, {args.processes} worker processes x {THREADS} threads")
    ratios = [o["throughput"] / b["throughput"] for b, o in results]
    for i, (b, o) in enumerate(results):
        print(f"  round {i + 1}: baseline {b['throughput']:.0f}, sluice {o['throughput']:.0f} runs/s: {ratios[i]:.2f}")
    median = sorted(range(rounds), key=lambda k: ratios[k])[rounds // 2]
    mid_base, mid_ours = results[median][0]["throughput"], results[median][1]["throughput"]
    base, ours = results[-1]
    print(f"{'':28}{'baseline':>12}{'sluice':>12}{'ratio':>8}  target")
    print(f"{'throughput, median round':28}{mid_base:12.0f}{mid_ours:12.0f}{ratios[median]:8.2f}  >= 0.60")
    print(f"latency at {args.rate:.0f}/s p50 (ms){'':6}{base['p50']:12.1f}{ours['p50']:12.1f}")
    print(f"latency at {args.rate:.0f}/s p99 (ms){'':6}{base['p99']:12.1f}{ours['p99']:12.1f}{'':8}  < 25")
    print(f"{'worker RSS (MB)':28}{base['rss']:12.0f}{ours['rss']:12.0f}{'':8}  < 150")
    print(f"{'idle worker CPU (% core)':28}{base['idle']:12.1f}{ours['idle']:12.1f}")
    if measured.get("metrics"):
        report_variant(results, measured["metrics"], "metrics on (each worker scraped every second)", 0.97)
    if measured.get("tracing"):
        title = f"tracing on (every run's spans exported over OTLP/HTTP; {spans} spans received)"
        report_variant(results, measured["tracing"], title, 0.85)


if __name__ == "__main__":
    main()
