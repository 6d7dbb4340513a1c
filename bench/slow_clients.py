"""Benchmark of the API with slow clients: its buffering worker against plain gthread, in the same run.

    uv run python bench/slow_clients.py [--slow 1000] [--seconds 20] [--rounds 10] [--clients 2] [--threads 8]

Two servers of the same app side by side, gunicorn with the same settings (``SLUICE_API_WORKERS``
processes, ``SLUICE_API_THREADS`` threads): ``sluice``, as ``python -m sluice_api`` runs it (the
buffering worker of ``sluice_api.http_worker``), and ``gthread``, the app under gunicorn's plain
gthread worker (what the API ran before). It prints:

- closed-loop throughput of ``POST /api/workflows/{id}/run`` (as bench/api.py drives it), both
  servers loaded in alternating rounds, and the median round's ratio (target >= 0.90);
- latency p50/p99 of normal requests (``GET /api/health`` on a new connection, an authenticated
  ``GET /api/workflows`` and a run request on kept-alive ones) with ``--slow`` connections open
  (a third idle, a third sending a request head a byte at a time, a third a body; target p99 <
  100 ms), and the same throughput load with them open;
- for contrast, what plain gthread answers with the same slow connections open.

Uses SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else the embedded servers, in a
database and Redis namespace of its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sluice_common.db import migrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import THREADS, WORKERS, free_port, load, serve, stop, wait_ready
from common import bench_servers, bench_user_and_workflow
from pipeline import pct


class SlowClients:
    """``count`` connections that never finish a request: idle, trickling a head, trickling a body."""

    def __init__(self, port: int, path: str, token: str, count: int) -> None:
        self.socks: list[socket.socket] = []
        trickling: list[socket.socket] = []
        body_head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n{"
        ).encode()
        for i in range(count):
            if i % 20 == 0:
                time.sleep(0.02)  # paced, so that every gunicorn worker takes its share
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.socks.append(sock)
            if i % 3 == 1:
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            elif i % 3 == 2:
                sock.sendall(body_head)
            if i % 3:
                sock.setblocking(False)
                trickling.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, args=(trickling,), daemon=True)
        self._thread.start()

    def _trickle(self, socks: list[socket.socket]) -> None:
        while not self._stop.wait(0.2):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


def sample(port: int, path: str, token: str, seconds: float, timeout: float) -> tuple[list[float], int]:
    """Normal requests one after another for ``seconds``: their latencies (ms) and how many failed."""
    auth = {"Authorization": f"Bearer {token}"}
    listing = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    runs = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    latencies: list[float] = []
    failed = 0
    stop_at = time.monotonic() + seconds
    i = 0
    while time.monotonic() < stop_at and failed < 3:
        i += 1
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        run_kwargs = {
            "headers": {**auth, "Content-Type": "application/json"},
            "body": json.dumps({"triggerData": {"i": i}}),
        }
        for conn, method, target, kwargs in (
            (health, "GET", "/api/health", {}),
            (listing, "GET", "/api/workflows", {"headers": auth}),
            (runs, "POST", path, run_kwargs),
        ):
            start = time.perf_counter()
            try:
                conn.request(method, target, **kwargs)  # type: ignore[arg-type]
                resp = conn.getresponse()
                resp.read()
            except OSError:
                failed += 1
                conn.close()
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            if resp.status >= 300:
                failed += 1
        health.close()
    listing.close()
    runs.close()
    return latencies, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", type=int, default=1000, help="slow connections held open")
    parser.add_argument("--seconds", type=float, default=20.0, help="throughput load per server, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="latency sampling time")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * args.slow + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "DATABASE_URL", "REDIS_URL"))}
    procs: list[subprocess.Popen[bytes]] = []
    with bench_servers("api") as servers:
        try:
            url = servers.databases["api"]
            migrate(url)
            token, workflow_id = bench_user_and_workflow(url)
            path = f"/api/workflows/{workflow_id}/run"
            headers = {"Authorization": f"Bearer {token}"}
            ports = {"sluice": free_port(), "gthread": free_port()}
            env = clean | {
                "DATABASE_URL": url,
                "REDIS_URL": servers.redis_url,
                "SLUICE_REDIS_PREFIX": servers.prefix,
                "SLUICE_API_WORKERS": WORKERS,
                "SLUICE_API_THREADS": THREADS,
                "SLUICE_API_RATE_LIMIT_PER_MINUTE": "100000000",
                "SLUICE_LOG_LEVEL": "WARNING",
            }
            procs.append(
                serve([sys.executable, "-m", "sluice_api"], env | {"SLUICE_API_BIND": f"127.0.0.1:{ports['sluice']}"})
            )
            gunicorn = ["-w", WORKERS, "-k", "gthread", "--threads", THREADS, "-b", f"127.0.0.1:{ports['gthread']}"]
            procs.append(serve([sys.executable, "-m", "gunicorn", *gunicorn, "sluice_api.app:get_app()"], env))
            for name, proc in zip(ports, procs, strict=True):
                wait_ready(ports[name], "/api/health", proc)
                load(ports[name], path, headers, 1, 2, 1.0)  # warm-up

            # Throughput without slow clients, alternating rounds; the median round by ratio.
            rounds = []
            for _ in range(args.rounds):
                g = load(ports["gthread"], path, headers, args.clients, args.threads, args.seconds / args.rounds)
                s = load(ports["sluice"], path, headers, args.clients, args.threads, args.seconds / args.rounds)
                rounds.append((g, s))
            rounds.sort(key=lambda r: r[1]["rps"] / r[0]["rps"])
            ratios = [r[1]["rps"] / r[0]["rps"] for r in rounds]
            plain, ours = rounds[len(rounds) // 2]

            # With the slow connections open against the buffering worker.
            slow = SlowClients(ports["sluice"], path, token, args.slow)
            try:
                time.sleep(1.0)
                lat, failed = sample(ports["sluice"], path, token, args.sample_seconds, 5.0)
                busy = load(ports["sluice"], path, headers, args.clients, args.threads, args.seconds / args.rounds)
            finally:
                slow.close()
            # The same against plain gthread: few answers, if any (a short timeout bounds the wait).
            slow = SlowClients(ports["gthread"], path, token, args.slow)
            try:
                time.sleep(1.0)
                g_lat, g_failed = sample(ports["gthread"], path, token, 6.0, 2.0)
            finally:
                slow.close()
        finally:
            for proc in procs:
                stop(proc)

    def row(label: str, plain_value: str, our_value: str, rest: str = "") -> None:
        print(f"{label:40}{plain_value:>14}{our_value:>14}{rest}")

    print(
        f"\nAPI with slow clients: gunicorn {WORKERS} workers x {THREADS} threads; throughput "
        f"{args.clients} client processes x {args.threads} threads, {args.seconds:.0f} s per server"
    )
    print(f"throughput ratio sluice/gthread per round (sorted): {', '.join(f'{r:.2f}' for r in ratios)}")
    row("", "gthread", "sluice", "   ratio  target")
    ratio = ours["rps"] / plain["rps"]
    row("run requests/s, no slow clients", f"{plain['rps']:.0f}", f"{ours['rps']:.0f}", f"{ratio:8.2f}  >= 0.90")
    row(
        "latency p50 / p99 (ms), no slow clients",
        f"{plain['p50']:.1f} / {plain['p99']:.1f}",
        f"{ours['p50']:.1f} / {ours['p99']:.1f}",
    )
    print(f"\nwith {args.slow} slow connections open (a third idle, a third trickling a head, a third a body):")
    row("normal requests (health, list, run)", str(len(g_lat)), str(len(lat)))
    row("  failed (timeout 2 s / 5 s)", str(g_failed), str(failed))
    row("  latency p50 (ms)", f"{pct(g_lat, 0.5):.1f}", f"{pct(lat, 0.5):.1f}")
    row("  latency p99 (ms)", f"{pct(g_lat, 0.99):.1f}", f"{pct(lat, 0.99):.1f}", "          < 100")
    row("  run requests/s (closed loop)", "", f"{busy['rps']:.0f}")


if __name__ == "__main__":
    main()
