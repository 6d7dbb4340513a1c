"""Benchmark of the API's run endpoint against a bare Falcon insert endpoint, in the same run.

    uv run python bench/api.py [--seconds 20] [--rounds 5] [--clients 2] [--threads 8]

Both are served by gunicorn with the same settings (``SLUICE_API_WORKERS`` processes, gthread)
and driven by the same load generator (client processes x threads, keep-alive connections):

- baseline: ``POST /items`` doing one INSERT in autocommit;
- sluice: ``POST /api/workflows/{id}/run`` with a bearer token and trigger data: token check,
  request limit, the run row and its wake-up in Redis (no worker runs, so runs stay queued).

Both servers run side by side and take turns in short rounds, so background load on the machine
hits both alike; prints every round's ratio and the median round's requests per second and
latency p50/p99 (target ratio >= 0.70). Uses
SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else the embedded servers, in a
database and Redis namespace of its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from sluice_common.db import migrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchServers, bench_servers, bench_user_and_workflow
from pipeline import pct

ROOT = Path(__file__).resolve().parent.parent
WORKERS = "2"
THREADS = os.environ.get("SLUICE_API_THREADS", "4")  # gunicorn threads per worker, the same for both


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


def _client(
    port: int, path: str, headers: dict[str, str], threads: int, seconds: float, out: Any, pace: float = 0.0
) -> None:
    """``threads`` keep-alive connections sending run requests for ``seconds``: as fast as they are
    answered, or each one every ``pace`` seconds when it is set (an open loop: a fixed rate)."""
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    counts = {"ok": 0, "bad": 0}
    latencies: list[float] = []

    def loop(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        ok = bad = 0
        next_at = time.monotonic() + pace * n / threads  # spread the threads over the period
        while time.monotonic() < stop_at:
            if pace:
                # Late by more than a period (a stall): start again from now rather than burst.
                next_at = max(next_at + pace, time.monotonic() - pace)
                time.sleep(max(0.0, next_at - time.monotonic()))
            body = json.dumps({"triggerData": {"n": n, "t": time.time()}})
            start = time.perf_counter()
            conn.request("POST", path, body=body, headers={**headers, "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            mine.append((time.perf_counter() - start) * 1000)
            if 200 <= resp.status < 300:
                ok += 1
            else:
                bad += 1
        with lock:
            counts["ok"] += ok
            counts["bad"] += bad
            latencies.extend(mine)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((counts["ok"], counts["bad"], latencies))


def load(port: int, path: str, headers: dict[str, str], clients: int, threads: int, seconds: float) -> dict[str, float]:
    queue: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_client, args=(port, path, headers, threads, seconds, queue))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    ok = sum(r[0] for r in results)
    bad = sum(r[1] for r in results)
    lat = [x for r in results for x in r[2]]
    if bad:
        raise SystemExit(f"{bad} requests failed against {path}")
    return {"rps": ok / seconds, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "requests": ok}


def serve(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(
    servers: BenchServers, clean: dict[str, str], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float], list[float], int]:
    """Both servers side by side, loaded in alternating rounds; the median round and all ratios."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        base_url = servers.databases["base"]
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE bench_items (id bigserial PRIMARY KEY, data jsonb, at timestamptz DEFAULT now())"
            )
        base_port = free_port()
        gunicorn = ["-w", WORKERS, "-k", "gthread", "--threads", THREADS, "-b", f"127.0.0.1:{base_port}"]
        procs.append(
            serve(
                [sys.executable, "-m", "gunicorn", *gunicorn, "bench.baseline_api:create()"],
                clean | {"BENCH_DATABASE_URL": base_url},
            )
        )
        url = servers.databases["api"]
        migrate(url)
        token, workflow_id = bench_user_and_workflow(url)
        port = free_port()
        env = clean | {
            "DATABASE_URL": url,
            "REDIS_URL": servers.redis_url,
            "SLUICE_REDIS_PREFIX": servers.prefix,
            "SLUICE_API_BIND": f"127.0.0.1:{port}",
            "SLUICE_API_WORKERS": WORKERS,
            "SLUICE_API_THREADS": THREADS,
            "SLUICE_API_RATE_LIMIT_PER_MINUTE": "100000000",
            "SLUICE_LOG_LEVEL": "WARNING",
        }
        procs.append(serve([sys.executable, "-m", "sluice_api"], env))
        path = f"/api/workflows/{workflow_id}/run"
        headers = {"Authorization": f"Bearer {token}"}
        wait_ready(base_port, "/nothing", procs[0])
        wait_ready(port, "/api/health", procs[1])
        load(base_port, "/items", {}, 1, 2, 1.0)  # warm-up
        load(port, path, headers, 1, 2, 1.0)
        # Alternate short rounds so that both see the same background load; report the median.
        rounds: list[tuple[dict[str, float], dict[str, float]]] = []
        for _ in range(args.rounds):
            b = load(base_port, "/items", {}, args.clients, args.threads, args.seconds / args.rounds)
            o = load(port, path, headers, args.clients, args.threads, args.seconds / args.rounds)
            rounds.append((b, o))
        rounds.sort(key=lambda r: r[1]["rps"] / r[0]["rps"])
        with psycopg.connect(url) as conn:
            stored = conn.execute("SELECT count(*) FROM runs").fetchone()
        assert stored is not None
    finally:
        for proc in procs:
            stop(proc)
    base, ours = rounds[len(rounds) // 2]
    return base, ours, [r[1]["rps"] / r[0]["rps"] for r in rounds], int(stored[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per server, over all rounds")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "DATABASE_URL", "REDIS_URL"))}
    with bench_servers("base", "api") as servers:
        base, ours, ratios, stored = measure(servers, clean, args)

    print(
        f"\nAPI: {args.clients} client processes x {args.threads} threads for {args.seconds:.0f} s, "
        f"gunicorn {WORKERS} workers x {THREADS} threads; {stored} runs stored"
    )
    print(f"ratio per round (sorted): {', '.join(f'{r:.2f}' for r in ratios)}; the median round:")
    print(f"{'':28}{'baseline':>12}{'sluice':>12}{'ratio':>8}  target")
    print(f"{'requests/s':28}{base['rps']:12.0f}{ours['rps']:12.0f}{ours['rps'] / base['rps']:8.2f}  >= 0.70")
    print(f"{'latency p50 (ms)':28}{base['p50']:12.1f}{ours['p50']:12.1f}")
    print(f"{'latency p99 (ms)':28}{base['p99']:12.1f}{ours['p99']:12.1f}")


if __name__ == "__main__":
    main()
