"""What the API's Prometheus metrics cost: server CPU per run request, metrics on against off, in one run.

    uv run python bench/api_metrics.py [--starts 4] [--rounds 8] [--seconds 3] [--clients 2]
                                       [--threads 8] [--scrape 1] [--rate R] [--alternate]

Two API servers side by side, both ``python -m sluice_api`` (gunicorn, ``SLUICE_API_WORKERS``
processes x ``SLUICE_API_THREADS`` threads, the same settings):

- ``on``: as shipped (``SLUICE_API_METRICS=true``): the HTTP middleware, the runs-created counter,
  gunicorn's workers in Prometheus multiprocess mode (a ``PROMETHEUS_MULTIPROC_DIR`` of its own),
  and ``/metrics`` scraped every ``--scrape`` seconds while it is loaded (Prometheus' part);
- ``off``: ``SLUICE_API_METRICS=false`` (no middleware, no counter, no ``/metrics``).

Each round loads both with run requests (``POST /api/workflows/{id}/run``, as bench/api.py drives
them), each from client processes of its own, at the same time, so that whatever else the machine
runs hits both alike (``--alternate``: one after the other, the first alternating). A round reads
the CPU time (user + system) of each server's processes, the gunicorn master and its workers,
before and after, and divides it by the requests that server answered: CPU is what metrics spend,
and it moves far less with the machine's other load than throughput does. The clients send at a
fixed rate, the same for both, 60 % of what the two reach in the first warm-up loaded as fast as
they answer (``--rate``: another rate; 0: as fast as answered, noisier: a server that gets less
of the machine answers fewer requests and spends more CPU on each). Two server processes can
differ by a percent or two for as long as they live, so the rounds are spread over ``--starts``
pairs started afresh, the two databases swapped between sides at each start.

Prints every round, then each side's CPU ms per request (all rounds' CPU over all their requests),
the ratio on/off (target <= 1.03: metrics cost at most 3 %) with a 95 % bootstrap interval (over
the starts and their rounds), throughput for context, and what one scrape costs on its own. At the
end of each start the ``on`` server's ``sluice_http_requests_total`` must count every run request
it answered (none lost, none late: a scrape has every worker flush first).

Uses SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else the embedded servers, in
databases and a Redis namespace of its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from sluice_common.db import migrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import THREADS, WORKERS, _client, free_port, serve, stop, wait_ready
from common import BenchServers, bench_servers, bench_user_and_workflow

SIDES = ("off", "on")
DATABASES = ("a", "b")  # each start swaps which side has which
# The default pace, as a share of what both servers reach loaded together as fast as they answer:
# below saturation, so that both answer the same rate (the CPU a request costs moves with the rate).
AUTO_RATE = 0.6
RUN_ROUTE = "/api/workflows/{workflow_id:uuid}/run"


class Server:
    def __init__(self, side: str, proc: subprocess.Popen[bytes], port: int, path: str, headers: dict[str, str]) -> None:
        self.side = side
        self.scraped = side == "on"
        self.proc = proc
        self.port = port
        self.path = path
        self.headers = headers
        self.requests = 0  # run requests answered, warm-up included

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.proc.pid)
        return [master, *master.children(recursive=True)]

    def cpu_seconds(self) -> tuple[float, frozenset[int]]:
        """User + system CPU of the master and its workers, and their pids (a restart would skew it)."""
        total = 0.0
        pids = set()
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = p.cpu_times()
                total += times.user + times.system
                pids.add(p.pid)
        return total, frozenset(pids)

    def get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()


class Scraper:
    """GET ``/metrics`` every ``interval`` seconds while running (Prometheus' part of the cost)."""

    def __init__(self, server: Server, interval: float) -> None:
        self._server = server
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.failures: list[str] = []

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            status, _ = self._server.get("/metrics")
            if status != 200:
                self.failures.append(f"/metrics answered {status}")

    def start(self) -> None:
        if self._interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.failures:
            raise SystemExit(self.failures[0])


def counted_run_requests(server: Server) -> float:
    """``sluice_http_requests_total`` of the run route, 2xx, summed over the workers' files."""
    status, text = server.get("/metrics")
    assert status == 200, status
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sluice_http_requests_total{") and f'route="{RUN_ROUTE}"' in line and 'status="2' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


Database = tuple[str, str, str]  # URL, API token, workflow id


def prepare_databases(servers: BenchServers) -> list[Database]:
    """The two databases, migrated, each with the bench user and workflow."""
    made = []
    for name in DATABASES:
        url = servers.databases[name]
        migrate(url)
        made.append((url, *bench_user_and_workflow(url)))
    return made


def start_servers(
    servers: BenchServers, clean: dict[str, str], databases: list[Database], swap: bool
) -> tuple[dict[str, Server], list[subprocess.Popen[bytes]]]:
    """A fresh ``off`` and ``on`` server, on the first and second database (``swap``: the other way)."""
    started: dict[str, Server] = {}
    procs: list[subprocess.Popen[bytes]] = []
    for k, side in enumerate(SIDES):
        url, token, workflow_id = databases[k ^ swap]
        port = free_port()
        env = clean | {
            "DATABASE_URL": url,
            "REDIS_URL": servers.redis_url,
            "SLUICE_REDIS_PREFIX": f"{servers.prefix}_{side}",
            "SLUICE_API_BIND": f"127.0.0.1:{port}",
            "SLUICE_API_WORKERS": WORKERS,
            "SLUICE_API_THREADS": THREADS,
            "SLUICE_API_RATE_LIMIT_PER_MINUTE": "100000000",
            "SLUICE_LOG_LEVEL": "WARNING",
            "SLUICE_API_METRICS": "true" if side == "on" else "false",
        }
        proc = serve([sys.executable, "-m", "sluice_api"], env)
        procs.append(proc)
        path = f"/api/workflows/{workflow_id}/run"
        started[side] = Server(side, proc, port, path, {"Authorization": f"Bearer {token}"})
    for server in started.values():
        wait_ready(server.port, "/api/health", server.proc)
    return started, procs


def load_together(servers: list[Server], clients: int, threads: int, seconds: float, rate: float) -> list[int]:
    """Load every server at once, each with its own ``clients`` processes (``rate`` requests per
    second each, or as fast as answered when 0); the requests each answered."""
    queues: list[Any] = [multiprocessing.Queue() for _ in servers]
    pace = clients * threads / rate if rate else 0.0
    procs = [
        multiprocessing.Process(target=_client, args=(s.port, s.path, s.headers, threads, seconds, q, pace))
        for s, q in zip(servers, queues, strict=True)
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    answered = []
    for q in queues:
        results = [q.get() for _ in range(clients)]
        if any(r[1] for r in results):
            raise SystemExit(f"{sum(r[1] for r in results)} requests failed")
        answered.append(sum(r[0] for r in results))
    for p in procs:
        p.join()
    return answered


def measured(servers: list[Server], args: argparse.Namespace, scrape: float) -> list[dict[str, float]]:
    """Load ``servers`` at once (one server: alone); the CPU seconds and requests of each."""
    before = [s.cpu_seconds() for s in servers]
    scrapers = [Scraper(s, scrape if s.scraped else 0) for s in servers]
    for scraper in scrapers:
        scraper.start()
    try:
        answered = load_together(servers, args.clients, args.threads, args.seconds, args.rate)
    finally:
        for scraper in scrapers:
            scraper.stop()
    after = [s.cpu_seconds() for s in servers]
    figures = []
    for s, (cpu_before, pids_before), (cpu_after, pids_after), n in zip(servers, before, after, answered, strict=True):
        if pids_after != pids_before:
            raise SystemExit("a gunicorn worker restarted during a round: its CPU time is lost")
        s.requests += n
        figures.append({"cpu": cpu_after - cpu_before, "requests": n, "rps": n / args.seconds})
    return figures


def one_round(off: Server, on: Server, args: argparse.Namespace, i: int) -> tuple[dict[str, float], dict[str, float]]:
    if args.together:
        a, b = measured([off, on], args, args.scrape)
        return a, b
    # One after the other, the first of a round alternating: off-on, on-off, ...
    first, second = (off, on) if i % 2 == 0 else (on, off)
    done = {first.side: measured([first], args, args.scrape)[0], second.side: measured([second], args, args.scrape)[0]}
    return done["off"], done["on"]


def scrape_cost(on: Server, off: Server, scrapes: int = 10) -> float:
    """Server CPU seconds of one scrape of ``on`` (spaced past the queue gauges' 1 s cache), less
    what ``off`` spends idle over the same time."""
    on_before, off_before = on.cpu_seconds()[0], off.cpu_seconds()[0]
    for _ in range(scrapes):
        time.sleep(1.1)
        status, _ = on.get("/metrics")
        assert status == 200, status
    on_spent, off_spent = on.cpu_seconds()[0] - on_before, off.cpu_seconds()[0] - off_before
    return (on_spent - off_spent) / scrapes


Pair = tuple[dict[str, float], dict[str, float]]  # one round: off's figures, on's


def ratio_of_totals(pairs: list[Pair]) -> float:
    off_cpu = sum(p[0]["cpu"] for p in pairs) / sum(p[0]["requests"] for p in pairs)
    on_cpu = sum(p[1]["cpu"] for p in pairs) / sum(p[1]["requests"] for p in pairs)
    return on_cpu / off_cpu


def bootstrap(starts: list[list[Pair]], n: int = 4000) -> tuple[float, float]:
    """95 % interval of the ratio of totals, resampling the starts, then the rounds of each: a pair
    of server processes can differ by a percent or two for as long as they live, which only other
    starts show."""
    rng = random.Random(1)  # noqa: S311 - a bench's resampling, not a secret
    ratios = sorted(
        ratio_of_totals(
            [pair for start in rng.choices(starts, k=len(starts)) for pair in rng.choices(start, k=len(start))]
        )
        for _ in range(n)
    )
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=4, help="server pairs started afresh, one after the other")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per start; each loads both servers")
    parser.add_argument("--seconds", type=float, default=3.0, help="load time per server per round")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--scrape", type=float, default=1.0, help="seconds between scrapes of 'on' (0: none)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="requests/s per server (0: as fast as answered; default: 60 %% of what the first warm-up reaches)",
    )
    parser.add_argument(
        "--alternate",
        dest="together",
        action="store_false",
        help="load the two servers one after the other in each round (default: both at once)",
    )
    args = parser.parse_args()

    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLUICE_", "DATABASE_URL", "REDIS_URL")) and k.upper() != "PROMETHEUS_MULTIPROC_DIR"
    }
    starts: list[list[Pair]] = []
    auto = args.rate is None
    warm_rps = 0.0
    counted = scrape = 0.0
    with bench_servers(*DATABASES) as servers:
        databases = prepare_databases(servers)
        for k in range(args.starts):
            started, procs = start_servers(servers, clean, databases, swap=k % 2 == 1)
            try:
                if started["off"].get("/metrics")[0] != 404:
                    raise SystemExit("the 'off' server serves /metrics")
                # Connections, caches, the metrics' files; then, once, how fast both go as fast as they can.
                closed_loop = argparse.Namespace(**{**vars(args), "seconds": 2.0, "rate": 0})
                measured(list(started.values()), closed_loop, 0)
                if args.rate is None:
                    closed_loop.seconds = 3.0
                    warm_rps = min(w["rps"] for w in measured(list(started.values()), closed_loop, 0))
                    args.rate = max(10.0, round(AUTO_RATE * warm_rps, -1))
                pairs: list[Pair] = []
                for i in range(args.rounds):
                    off, on = one_round(started["off"], started["on"], args, i)
                    pairs.append((off, on))
                    print(
                        f"start {k + 1} round {i + 1:2}: CPU ms/request off {off['cpu'] / off['requests'] * 1000:.3f} "
                        f"on {on['cpu'] / on['requests'] * 1000:.3f} ratio "
                        f"{(on['cpu'] / on['requests']) / (off['cpu'] / off['requests']):.3f}; "
                        f"requests/s off {off['rps']:.0f} on {on['rps']:.0f}",
                        flush=True,
                    )
                starts.append(pairs)
                # A scrape has every worker flush first: it counts every request answered.
                answered = counted_run_requests(started["on"])
                if answered != started["on"].requests:
                    raise SystemExit(f"/metrics counts {answered:.0f} run requests, {started['on'].requests} answered")
                counted += answered
                if k == args.starts - 1:
                    scrape = scrape_cost(started["on"], started["off"])
            finally:
                for proc in procs:
                    stop(proc)

    everything = [pair for pairs in starts for pair in pairs]
    cpu = {
        side: sum(p[k]["cpu"] for p in everything) / sum(p[k]["requests"] for p in everything) * 1000
        for k, side in enumerate(SIDES)
    }
    rps = {side: statistics.median(p[k]["rps"] for p in everything) for k, side in enumerate(SIDES)}
    ratios = sorted((p[1]["cpu"] / p[1]["requests"]) / (p[0]["cpu"] / p[0]["requests"]) for p in everything)
    low, high = bootstrap(starts)
    scraped = f"/metrics scraped every {args.scrape:g} s" if args.scrape > 0 else "/metrics not scraped"
    how = "both loaded at once" if args.together else "loaded in turn"
    pace = f"{args.rate:g} requests/s each" if args.rate else "as fast as answered"
    if auto:
        pace += f" ({AUTO_RATE:.0%} of the first warm-up's {warm_rps:.0f})"
    print(
        f"\nAPI metrics: {args.starts} starts x {args.rounds} rounds of {args.seconds:g} s, off and on {how}, {pace}, "
        f"{args.clients} client processes x {args.threads} threads each, gunicorn {WORKERS} workers x {THREADS} "
        f"threads; on: {scraped}; {counted:.0f} run requests counted by /metrics, as answered"
    )
    print(f"ratio per start: {', '.join(f'{ratio_of_totals(pairs):.3f}' for pairs in starts)}")
    print(f"ratio per round (sorted): {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"{'':32}{'off':>10}{'on':>10}{'ratio':>8}  target")
    print(
        f"{'server CPU ms per run request':32}{cpu['off']:10.3f}{cpu['on']:10.3f}{cpu['on'] / cpu['off']:8.3f}"
        f"  <= 1.03 (95 % interval {low:.3f}-{high:.3f})"
    )
    print(f"{'requests/s (median round)':32}{rps['off']:10.0f}{rps['on']:10.0f}{rps['on'] / rps['off']:8.3f}")
    print(
        f"one scrape of /metrics (idle server): {scrape * 1000:.1f} ms of server CPU, "
        f"{scrape * 1000 / (rps['on'] * 15):.4f} ms per request at {rps['on']:.0f} requests/s and one scrape in 15 s"
    )


if __name__ == "__main__":
    main()
