"""End-to-end benchmark: webhook requests through gunicorn, Redis, a worker and PostgreSQL, next to a
bare baseline on the same servers, in the same run.

    uv run python bench/e2e.py [--seconds 10] [--rounds 3] [--latency-seconds 20] [--idle-seconds 10]

Two stacks run side by side for the whole benchmark and take turns in alternating rounds, so
background load on the machine hits both alike:

- baseline: a bare Falcon endpoint under gunicorn (``bench/baseline_api.py``, ``POST /hooks``)
  doing one INSERT and one Dramatiq send, and a bare Dramatiq actor (``bench/baseline_worker.py``)
  doing one UPDATE;
- sluice: ``sluice_api`` (``POST /api/hooks/{secret}`` of a webhook workflow with one transform
  step), one ``sluice_worker`` process and the scheduler (its reconciler and sweeps are part of
  the idle stack).

Both: gunicorn with the same workers and threads, worker concurrency 10, 8 client connections
(2 client processes x 4 keep-alive connections). Prints:

- runs per second, from the first request of a round to its last run finished, while the
  clients send as fast as they are answered (every round's ratio and the median round's;
  target ratio >= 0.8);
- request -> finished p50/p99 (from the client sending the request to the run's finish on the
  database's clock) at a steady 5/s and 100/s (target p99 <= 15 ms at 5/s), and enqueue -> start
  p99 at 100/s (the run row's insert to its claim; target <= 25 ms), and at both rates each
  run's time split into request -> row inserted -> started -> finished, and how often the
  machine itself held a thread off for more than 2 ms meanwhile (a bare process beside the
  phase, sleeping 1 ms at a time: its wake-ups that came late);
- CPU milliseconds per run of each process group, from /proc (utime + stime of the processes
  and of their reaped children): api (gunicorn master and workers), worker, scheduler,
  PostgreSQL (the backends connected to the side's own database, by pg_stat_activity; and the
  whole cluster's processes, which include everything else using the server), Redis (the whole
  server, shared with anything else using it); over all rounds (their CPU over their runs);
- idle: a worker process's CPU over ``--idle-seconds`` (target <= 2 % of a core) and the idle
  stack's memory, RSS and PSS (target <= 400 MB).

Uses SLUICE_TEST_DATABASE_URL / SLUICE_TEST_REDIS_URL when set, else the embedded servers, in
databases and a Redis namespace of its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from psycopg.types.json import Jsonb

from sluice_api.queries import hash_secret, new_webhook_secret
from sluice_common import users
from sluice_common.db import migrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import free_port, serve, stop, wait_ready
from common import bench_servers, worker_env
from pipeline import pct

WORKERS = "2"  # gunicorn workers, the same for both
THREADS = "4"  # gunicorn threads per worker
CONCURRENCY = 10  # worker threads
CLIENTS, CONNECTIONS = 2, 4  # client processes x keep-alive connections each: 8 connections
TICK = os.sysconf("SC_CLK_TCK")
# Backends report their statistics (pg_stat_database) at most a second after they go idle.
STATS_FLUSH_S = 1.5
# Per run, epochs of: the request sent (client's clock), the row inserted, the run started and finished.
Timings = list[tuple[float, float, float, float]]
SENT, INSERTED, STARTED, FINISHED = range(4)


# CPU and memory from /proc ----------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int]:
    """(own utime + stime, reaped children's cutime + cstime) of a process, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    # After the name: state is field 3, utime 14, stime 15, cutime 16, cstime 17 (1-based).
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pids: list[int]) -> dict[int, int]:
    """Ticks per process of the trees under ``pids``: the roots count their reaped children too
    (a gunicorn worker or a PostgreSQL backend that exited), the live descendants only their own."""
    ticks: dict[int, int] = {}
    for root in pids:
        for pid in _tree(root):
            own, children = _stat(pid)
            ticks[pid] = own + children
    return ticks


def cpu_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds used between two samples (a process gone in between counts up to its last sample)."""
    return sum(after.get(pid, before.get(pid, 0)) - before.get(pid, 0) for pid in after.keys() | before.keys()) / TICK


def memory(pids: list[int]) -> tuple[float, float]:
    """(RSS, PSS) of the processes in MB; PSS shares the pages forked processes have in common."""
    rss = pss = 0.0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss / 2**20, pss / 2**20


@dataclass
class Stack:
    """One side: its processes, its database and how a run of it is sent and observed."""

    name: str
    db_url: str
    port: int
    path: str
    groups: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)
    # The phase's runs: finished count; (request -> finished ms, enqueue -> start ms) per run.
    # A phase's runs are counted from a mark taken before it starts (phases follow one another),
    # through an index: polling with a scan of every run would load the machine under test.
    mark_sql: str = ""
    count_sql: str = ""
    latency_sql: str = ""
    marks: dict[str, Any] = field(default_factory=dict)
    conn: psycopg.Connection[Any] | None = None
    backends: set[int] = field(default_factory=set)

    def db(self) -> psycopg.Connection[Any]:
        if self.conn is None:
            self.conn = psycopg.connect(self.db_url, autocommit=True)
        return self.conn

    def pg_backends(self) -> list[int]:
        """The PostgreSQL backends connected to this side's database, except this bench's own."""
        rows = (
            self.db()
            .execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            .fetchall()
        )
        self.backends |= {int(r[0]) for r in rows}
        return sorted(self.backends)

    def commits(self) -> int:
        """Transactions committed in this side's database so far (as its backends last reported them)."""
        row = (
            self.db().execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
        )
        assert row is not None
        return int(row[0])

    def begin(self, phase: str) -> None:
        row = self.db().execute(self.mark_sql).fetchone()
        assert row is not None
        self.marks[phase] = row[0]

    def finished(self, phase: str) -> int:
        row = self.db().execute(self.count_sql, (self.marks[phase],)).fetchone()
        return int(row[0]) if row else 0

    def timings(self, phase: str) -> Timings:
        rows = self.db().execute(self.latency_sql, (phase,)).fetchall()
        return [(float(a), float(b), float(c), float(d)) for a, b, c, d in rows]


def spans(timings: Timings, start: int, end: int) -> list[float]:
    """Milliseconds from one of the four moments to a later one, per run."""
    return [1000 * (t[end] - t[start]) for t in timings]


# Load -------------------------------------------------------------------------------------------


def _client(port: int, path: str, phase: str, threads: int, seconds: float, pace: float, out: Any) -> None:
    """``threads`` keep-alive connections sending webhook requests for ``seconds``: as fast as they are
    answered, or each one every ``pace`` seconds (an open loop at a fixed rate). The body carries
    the phase and the sending time, which the run keeps as its trigger data."""
    stop_at = time.monotonic() + seconds
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def loop(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        ok = bad = 0
        next_at = time.monotonic() + pace * n / threads  # spread the connections over the period
        while time.monotonic() < stop_at:
            if pace:
                next_at = max(next_at + pace, time.monotonic() - pace)  # after a stall: no burst
                time.sleep(max(0.0, next_at - time.monotonic()))
            body = json.dumps({"p": phase, "t": time.time()})
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if 200 <= resp.status < 300:
                ok += 1
            else:
                bad += 1
        with lock:
            results.append((ok, bad))

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((sum(r[0] for r in results), sum(r[1] for r in results)))


def load(stack: Stack, phase: str, seconds: float, rate: float = 0.0) -> int:
    """Send the phase's requests (closed loop, or ``rate`` per second in all) and return how many were accepted."""
    connections = CLIENTS * CONNECTIONS
    pace = connections / rate if rate else 0.0
    stack.begin(phase)
    queue: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_client, args=(stack.port, stack.path, phase, CONNECTIONS, seconds, pace, queue))
        for _ in range(CLIENTS)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    bad = sum(r[1] for r in results)
    if bad:
        raise SystemExit(f"{bad} requests failed against {stack.name}")
    return sum(r[0] for r in results)


def wait_finished(stack: Stack, phase: str, sent: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while stack.finished(phase) < sent:
        if time.monotonic() > deadline:
            raise SystemExit(f"{stack.name}: {stack.finished(phase)} of {sent} runs finished")
        for procs in stack.groups.values():
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"{stack.name}: a process exited with {p.returncode}")
        time.sleep(0.05)


# The stacks ------------------------------------------------------------------------------------


def start_baseline(url: str, redis_url: str, namespace: str, clean: dict[str, str]) -> Stack:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_items (id bigserial PRIMARY KEY, data jsonb, "
            "at timestamptz DEFAULT clock_timestamp(), done_at timestamptz)"
        )
    port = free_port()
    env = clean | {
        "BENCH_DATABASE_URL": url,
        "BENCH_REDIS_URL": redis_url,
        "BENCH_NAMESPACE": namespace,
        "BENCH_THREADS": str(CONCURRENCY),
    }
    gunicorn = ["-w", WORKERS, "-k", "gthread", "--threads", THREADS, "-b", f"127.0.0.1:{port}"]
    stack = Stack("baseline", url, port, "/hooks")
    stack.groups["api"] = [serve([sys.executable, "-m", "gunicorn", *gunicorn, "bench.baseline_api:create()"], env)]
    stack.groups["worker"] = [serve([sys.executable, str(Path(__file__).parent / "baseline_worker.py")], env)]
    stack.mark_sql = "SELECT coalesce(max(id), 0) FROM bench_items"
    stack.count_sql = "SELECT count(done_at) FROM bench_items WHERE id > %s"
    stack.latency_sql = (
        "SELECT (data ->> 't')::float8, extract(epoch FROM at), extract(epoch FROM done_at), "
        "extract(epoch FROM done_at) FROM bench_items WHERE data ->> 'p' = %s"
    )
    wait_ready(port, "/nothing", stack.groups["api"][0])
    return stack


def start_sluice(url: str, redis_url: str, prefix: str, clean: dict[str, str]) -> Stack:
    migrate(url)
    secret = new_webhook_secret()
    with psycopg.connect(url, autocommit=True) as conn:
        owner = users.create_user(conn, "bench").user.id
        conn.execute(
            "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps, webhook_secret_hash) "
            "VALUES (%s, 'bench', 'webhook', %s, %s, %s)",
            (
                owner,
                Jsonb({"type": "webhook"}),
                Jsonb([{"id": "a", "type": "transform", "config": {"value": 1}}]),
                hash_secret(secret),
            ),
        )
    port = free_port()
    env = (
        clean
        | worker_env(url, redis_url, prefix, CONCURRENCY)
        | {
            "SLUICE_API_BIND": f"127.0.0.1:{port}",
            "SLUICE_API_WORKERS": WORKERS,
            "SLUICE_API_THREADS": THREADS,
            "SLUICE_API_RATE_LIMIT_PER_MINUTE": "100000000",
        }
    )
    stack = Stack("sluice", url, port, f"/api/hooks/{secret}")
    stack.groups["api"] = [serve([sys.executable, "-m", "sluice_api"], env)]
    stack.groups["worker"] = [serve([sys.executable, "-m", "sluice_worker"], env)]
    stack.groups["scheduler"] = [serve([sys.executable, "-m", "sluice_scheduler"], env)]
    stack.mark_sql = "SELECT now()"
    stack.count_sql = "SELECT count(*) FROM runs WHERE status = 'succeeded' AND finished_at >= %s"
    stack.latency_sql = (
        "SELECT (trigger_data ->> 't')::float8, extract(epoch FROM queued_at), extract(epoch FROM started_at), "
        "extract(epoch FROM finished_at) FROM runs WHERE trigger_data ->> 'p' = %s"
    )
    wait_ready(port, "/api/health", stack.groups["api"][0])
    return stack


@dataclass
class Servers:
    """The PostgreSQL and Redis servers' processes, for the CPU they spend."""

    postmaster: int
    redis: int

    @classmethod
    def find(cls, stack: Stack, redis_url: str) -> Servers:
        backend = stack.db().execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        postmaster = psutil.Process(int(backend[0])).ppid()
        client = redis.Redis.from_url(redis_url)
        pid = int(client.info("server")["process_id"])
        client.close()
        return cls(postmaster, pid)


def sample(stacks: list[Stack], servers: Servers) -> dict[str, dict[int, int]]:
    """CPU ticks per process of every group of every stack, and of the servers."""
    out: dict[str, dict[int, int]] = {}
    for stack in stacks:
        for group, procs in stack.groups.items():
            out[f"{stack.name}:{group}"] = tree_cpu([p.pid for p in procs])
        out[f"{stack.name}:postgres"] = {pid: sum(_stat(pid)) for pid in stack.pg_backends()}
    out["cluster"] = tree_cpu([servers.postmaster])
    out["redis"] = tree_cpu([servers.redis])
    return out


def phase_cpu(
    stack: Stack, before: dict[str, dict[int, int]], after: dict[str, dict[int, int]], runs: int
) -> dict[str, float]:
    """CPU milliseconds per run of each group of ``stack`` between two samples."""
    groups = [*stack.groups, "postgres"]
    cpu = {g: 1000 * cpu_delta(before[f"{stack.name}:{g}"], after[f"{stack.name}:{g}"]) / runs for g in groups}
    cpu["postgres cluster"] = 1000 * cpu_delta(before["cluster"], after["cluster"]) / runs
    cpu["redis"] = 1000 * cpu_delta(before["redis"], after["redis"]) / runs
    return cpu


# Measurement ------------------------------------------------------------------------------------


@dataclass
class Round:
    rate: float  # runs per second
    sent: int
    cpu: dict[str, float]


def throughput_round(stack: Stack, stacks: list[Stack], servers: Servers, phase: str, seconds: float) -> Round:
    before = sample(stacks, servers)
    sent = load(stack, phase, seconds)
    wait_finished(stack, phase, sent)
    after = sample(stacks, servers)
    timings = stack.timings(phase)
    first, last = min(t[SENT] for t in timings), max(t[FINISHED] for t in timings)
    return Round(sent / (last - first), sent, phase_cpu(stack, before, after, sent))


# A thread that sleeps 1 ms and wakes up more than this much later was held off a CPU meanwhile.
STALL_S = 0.002


def _stalls(stop: Any, out: Any) -> None:
    """Sleep 1 ms at a time until ``stop`` is set; put the lateness (s) of each late wake-up."""
    late: list[float] = []
    while not stop.is_set():
        began = time.monotonic()
        time.sleep(0.001)
        over = time.monotonic() - began - 0.001
        if over > STALL_S:
            late.append(over)
    out.put(late)


@dataclass
class Phase:
    """A latency phase's runs and the machine's stalls (seconds each) while it lasted."""

    timings: Timings
    stalls: list[float]


def latency_phase(stack: Stack, phase: str, rate: float, seconds: float) -> Phase:
    """Runs at a steady ``rate``, with a bare process beside them that counts how often the machine
    held a thread off for more than STALL_S: a run that meets such a stall in any of its hops is
    late by it, whatever Sluice does, and at 5/s a p99 is the second slowest of 100 runs."""
    stop, out = multiprocessing.Event(), multiprocessing.Queue()
    probe = multiprocessing.Process(target=_stalls, args=(stop, out), daemon=True)
    probe.start()
    try:
        sent = load(stack, phase, seconds, rate)
        wait_finished(stack, phase, sent)
    finally:
        stop.set()
    stalls: list[float] = out.get(timeout=30)
    probe.join()
    return Phase(stack.timings(phase), stalls)


def idle(stacks: list[Stack], seconds: float) -> dict[str, dict[str, float]]:
    """Each stack's worker CPU (% of a core) over ``seconds`` with nothing to do, and its memory."""
    time.sleep(2)  # the last runs' aftermath (acknowledgements, lease renewals) settles
    before = {s.name: tree_cpu([p.pid for p in s.groups["worker"]]) for s in stacks}
    time.sleep(seconds)
    out: dict[str, dict[str, float]] = {}
    for s in stacks:
        after = tree_cpu([p.pid for p in s.groups["worker"]])
        figures = {"worker_cpu": 100 * cpu_delta(before[s.name], after) / seconds}
        for group, procs in s.groups.items():
            pids = [pid for p in procs for pid in _tree(p.pid)]
            figures[f"{group}_rss"], figures[f"{group}_pss"] = memory(pids)
        figures["postgres_rss"], figures["postgres_pss"] = memory(s.pg_backends())
        out[s.name] = figures
    return out


def all_rounds(rounds: list[Round]) -> dict[str, float]:
    """CPU milliseconds per run of each group over all the rounds of one side."""
    runs = sum(r.sent for r in rounds)
    return {g: sum(r.cpu[g] * r.sent for r in rounds) / runs for g in rounds[0].cpu}


def median_round(rounds: list[tuple[Round, Round]]) -> tuple[Round, Round, list[float]]:
    ratios = [o.rate / b.rate for b, o in rounds]
    middle = sorted(range(len(rounds)), key=lambda k: ratios[k])[len(rounds) // 2]
    return rounds[middle][0], rounds[middle][1], ratios


def report(
    args: argparse.Namespace,
    rounds: list[tuple[Round, Round]],
    latency: dict[tuple[str, float], Phase],
    rest: dict[str, dict[str, float]],
    commits: dict[str, int],
    embedded: bool,
) -> None:
    base, ours, ratios = median_round(rounds)
    print(
        f"\nend to end: webhook -> gunicorn ({WORKERS} workers x {THREADS} threads) -> Redis -> worker "
        f"(1 process x {CONCURRENCY} threads) -> PostgreSQL; {CLIENTS * CONNECTIONS} client connections"
        f"{' (embedded servers)' if embedded else ''}"
    )
    for i, (b, o) in enumerate(rounds):
        print(f"  round {i + 1}: baseline {b.rate:.0f}, sluice {o.rate:.0f} runs/s: {ratios[i]:.2f}")
    print(f"{'':34}{'baseline':>10}{'sluice':>10}{'ratio':>8}  target")
    print(f"{'runs/s, median round':34}{base.rate:10.0f}{ours.rate:10.0f}{ours.rate / base.rate:8.2f}  >= 0.80")
    for rate in (5.0, 100.0):
        b_phase, o_phase = latency[("baseline", rate)], latency[("sluice", rate)]
        b_times, o_times = b_phase.timings, o_phase.timings
        b_fin, o_fin = spans(b_times, SENT, FINISHED), spans(o_times, SENT, FINISHED)
        b_start, o_start = spans(b_times, INSERTED, STARTED), spans(o_times, INSERTED, STARTED)
        target = "  <= 15" if rate == 5.0 else ""
        print(f"{f'request -> finished p50 at {rate:.0f}/s (ms)':34}{pct(b_fin, 0.5):10.1f}{pct(o_fin, 0.5):10.1f}")
        print(
            f"{f'request -> finished p99 at {rate:.0f}/s (ms)':34}{pct(b_fin, 0.99):10.1f}{pct(o_fin, 0.99):10.1f}"
            f"{'':8}{target}"
        )
        if rate == 100.0:
            print(
                f"{f'enqueue -> start p99 at {rate:.0f}/s (ms)':34}{pct(b_start, 0.99):10.1f}"
                f"{pct(o_start, 0.99):10.1f}{'':8}  <= 25"
            )
        for what, start, end in (
            ("request -> row inserted", SENT, INSERTED),
            ("row inserted -> started", INSERTED, STARTED),
            ("started -> finished", STARTED, FINISHED),
        ):
            b_span, o_span = spans(b_times, start, end), spans(o_times, start, end)
            print(
                f"{f'  {what} p50/p99':34}{pct(b_span, 0.5):5.1f}/{pct(b_span, 0.99):<5.1f}"
                f"{pct(o_span, 0.5):5.1f}/{pct(o_span, 0.99):.1f}"
            )
        b_late, o_late = (max(p.stalls, default=0.0) * 1000 for p in (b_phase, o_phase))
        print(
            f"{'  machine stalls > 2 ms: n/max ms':34}{len(b_phase.stalls):5d}/{b_late:<5.1f}"
            f"{len(o_phase.stalls):5d}/{o_late:.1f}"
        )
    # Over all rounds (their CPU over their runs): one round's figure moves with the machine's other load.
    b_cpu, o_cpu = all_rounds([b for b, _ in rounds]), all_rounds([o for _, o in rounds])
    print("CPU ms per run, all rounds (/proc utime+stime, reaped children included):")
    for group in ("api", "worker", "scheduler", "postgres", "postgres cluster", "redis"):
        label = {
            "postgres": "PostgreSQL, the side's backends",
            "postgres cluster": "PostgreSQL, whole cluster",
            "redis": "Redis, whole server",
        }.get(group, group)
        cells = [b_cpu.get(group), o_cpu.get(group)]
        print(f"  {label:32}" + "".join(f"{'':10}" if c is None else f"{c:10.3f}" for c in cells))
    own = ("api", "worker", "scheduler", "postgres")
    b_sum = sum(b_cpu.get(g, 0.0) for g in own)
    o_sum = sum(o_cpu.get(g, 0.0) for g in own)
    print(f"  {'sum (services + own backends)':32}{b_sum:10.3f}{o_sum:10.3f}{o_sum / b_sum:8.2f}")
    # Each side's database, over the throughput rounds; the sluice side's includes what its idle
    # scheduler and lease housekeeping commit meanwhile (a few per second).
    b_runs, o_runs = sum(b.sent for b, _ in rounds), sum(o.sent for _, o in rounds)
    print(
        f"  {'commits per run (pg_stat_database)':32}{commits['baseline'] / b_runs:10.2f}"
        f"{commits['sluice'] / o_runs:10.2f}"
    )
    b_idle, o_idle = rest["baseline"], rest["sluice"]
    print(f"idle, over {args.idle_seconds:.0f} s:")
    print(f"  {'worker CPU (% of a core)':32}{b_idle['worker_cpu']:10.2f}{o_idle['worker_cpu']:10.2f}{'':8}  <= 2")
    for group in ("api", "worker", "scheduler", "postgres"):
        if f"{group}_rss" in o_idle:
            b_rss = f"{b_idle[f'{group}_rss']:10.0f}" if f"{group}_rss" in b_idle else f"{'':10}"
            ours_mem = f"{o_idle[f'{group}_rss']:10.0f} / {o_idle[f'{group}_pss']:.0f}"
            print(f"  {f'{group} RSS / PSS (MB)':32}{b_rss}{ours_mem}")
    groups = ("api", "worker", "scheduler")
    o_rss = sum(o_idle[f"{g}_rss"] for g in groups)
    o_pss = sum(o_idle[f"{g}_pss"] for g in groups)
    print(f"  {'stack RSS / PSS (MB), services':32}{'':10}{o_rss:10.0f} / {o_pss:.0f}{'':3}  <= 400")
    print(
        f"  {'... with its PostgreSQL backends':32}{'':10}{o_rss + o_idle['postgres_rss']:10.0f} / "
        f"{o_pss + o_idle['postgres_pss']:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="closed-loop load per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="per side and rate")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "DATABASE_URL", "REDIS_URL", "OTEL_"))}
    embedded = not (os.environ.get("SLUICE_TEST_DATABASE_URL") and os.environ.get("SLUICE_TEST_REDIS_URL"))
    stacks: list[Stack] = []
    with bench_servers("base", "e2e") as servers:
        try:
            base = start_baseline(servers.databases["base"], servers.redis_url, f"{servers.prefix}_base", clean)
            stacks.append(base)
            ours = start_sluice(servers.databases["e2e"], servers.redis_url, f"{servers.prefix}_e2e", clean)
            stacks.append(ours)
            found = Servers.find(ours, servers.redis_url)
            for stack in stacks:  # warm-up: imports, connections, plans
                wait_finished(stack, "warm", load(stack, "warm", 2.0))
            rounds = []
            time.sleep(STATS_FLUSH_S)
            commits = {stack.name: stack.commits() for stack in stacks}
            for i in range(args.rounds):
                b = throughput_round(base, stacks, found, f"t{i}", args.seconds)
                o = throughput_round(ours, stacks, found, f"t{i}", args.seconds)
                rounds.append((b, o))
            time.sleep(STATS_FLUSH_S)
            for stack in stacks:
                commits[stack.name] = stack.commits() - commits[stack.name]
            latency = {}
            for rate in (5.0, 100.0):
                for stack in stacks:
                    latency[(stack.name, rate)] = latency_phase(stack, f"r{rate:.0f}", rate, args.latency_seconds)
            rest = idle(stacks, args.idle_seconds)
        finally:
            for stack in stacks:
                for procs in stack.groups.values():
                    for proc in procs:
                        stop(proc)
                if stack.conn is not None:
                    stack.conn.close()
    report(args, rounds, latency, rest, commits, embedded)


if __name__ == "__main__":
    main()
