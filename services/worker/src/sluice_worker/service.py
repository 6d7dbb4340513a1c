"""Builds and runs the worker service: a Dramatiq worker whose ``execute_run`` actor claims runs.

``create_worker`` takes its dependencies (settings, pool, broker, rate limiter), registers the
actor on the given broker and sets up the log context of runs (:mod:`sluice_worker.logcontext`);
nothing is opened at import time. A housekeeping thread renews the leases of this process's runs,
recovers runs whose worker died (any worker may do it; the conditional UPDATE makes it safe to
race), and wakes runs whose awaited sub-workflow has ended.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass

import dramatiq
import httpx
import redis
from dramatiq import Worker

from sluice_common import tracing
from sluice_common.broker import RUN_ACTOR, RUN_QUEUE, make_broker, ready_queue_key
from sluice_common.db import Pool, open_pool
from sluice_common.logs import Outage
from sluice_common.observe import run_events
from sluice_common.process import freeze_startup_objects, service_main
from sluice_common.ratelimit import RateLimiter, RedisRateLimiter
from sluice_common.runs import Recovery
from sluice_common.settings import ServerUrls, Settings
from sluice_worker.executor import RunExecutor
from sluice_worker.logcontext import install_log_context
from sluice_worker.metrics import start_metrics
from sluice_worker.safehttp import make_client
from sluice_worker.tracing import start_tracing

log = logging.getLogger(__name__)

# Longest pause between polls while the queue has messages the process could not take yet
# (Dramatiq's default of 1 s would add up to a second to starts). An empty queue is not polled:
# consumers wait on the broker's doorbell (see sluice_common.broker).
POLL_MS = 5
THREAD_IDLE_S = 0.5


@dataclass
class WorkerApp:
    executor: RunExecutor
    worker: Worker
    housekeeping: threading.Thread
    stopping: threading.Event
    housekeeping_stop: threading.Event

    def start(self) -> None:
        self.worker.start()
        # Dramatiq's threads share the consumers' short poll timeout, but only use it to notice
        # a stop; a message wakes them at once. A longer one spares ~2,000 wake-ups a second.
        for thread in self.worker.workers:
            thread.timeout = THREAD_IDLE_S
        self.housekeeping.start()

    def stop(self, timeout_ms: int | None = None) -> None:
        """Let each run end its current step and be handed back, for up to ``timeout_ms``
        (``SLUICE_STOP_GRACE_SECONDS`` by default)."""
        self.stopping.set()  # runs stop at their next step boundary and are handed back
        if timeout_ms is None:
            timeout_ms = int(self.executor.settings.stop_grace_seconds * 1000)
        self.worker.stop(timeout=timeout_ms)
        left = self.executor.in_flight()
        if left:
            # Still in a step: their leases lapse once this process is gone, and they are recovered
            # (the attempt counts as lost with its worker) and run again.
            log.warning(
                "worker stopped with %d run(s) still in a step after %g s (SLUICE_STOP_GRACE_SECONDS): %s",
                len(left),
                timeout_ms / 1000,
                ", ".join(left),
            )
        # Leases are renewed until the last in-flight step has ended.
        self.housekeeping_stop.set()
        self.housekeeping.join(timeout=5)


def create_worker(
    settings: Settings,
    pool: Pool,
    broker: dramatiq.Broker,
    limiter: RateLimiter,
    *,
    http: httpx.Client | None = None,
    worker_id: str | None = None,
    threads: int | None = None,
) -> WorkerApp:
    stopping = threading.Event()
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    # One pooled client per worker process, shared by every run thread (see safehttp).
    client = http or make_client()
    executor = RunExecutor(settings, pool, broker, limiter, client, worker_id, stopping)
    # Every line logged while a run executes names it (the metrics observer is added by start_metrics).
    install_log_context(broker, executor.events)
    dramatiq.Actor(
        executor.handle,
        broker=broker,
        actor_name=RUN_ACTOR,
        queue_name=RUN_QUEUE,
        priority=0,
        options={"max_retries": 5},
    )
    concurrency = threads or settings.concurrency
    worker = Worker(broker, worker_threads=concurrency, worker_timeout=POLL_MS)
    # Prefetch no more wake-ups than there are threads, so a busy process does not sit on
    # messages an idle process could run.
    worker.queue_prefetch = 2 * concurrency

    housekeeping_stop = threading.Event()

    recovery = Recovery(pool, broker, settings.lease_seconds)
    outage = Outage(log, "lease housekeeping", "retrying until PostgreSQL answers")

    def housekeeping() -> None:
        interval = max(0.5, settings.lease_seconds / 3)
        while not housekeeping_stop.wait(interval):
            try:
                executor.renew_leases()
                recovery()
                executor.wake_waiting()
            except Exception as exc:
                recovery.hold()
                outage.failed(exc)
            else:
                outage.recovered()

    thread = threading.Thread(target=housekeeping, name="sluice-leases", daemon=True)
    return WorkerApp(executor, worker, thread, stopping, housekeeping_stop)


def run(settings: Settings, urls: ServerUrls, stopping: threading.Event) -> None:
    http = make_client()
    # Before the pool and the Redis clients exist: client spans (SLUICE_TRACE_CLIENTS) wrap them.
    start_tracing(settings, http, run_events)
    # One connection per run thread, plus housekeeping and spare.
    pool = open_pool(settings, urls.database_url, name="worker", max_size=settings.concurrency + 4)
    broker = make_broker(settings, urls.redis_url)
    client = redis.Redis.from_url(urls.redis_url)
    metrics = start_metrics(settings, broker)
    try:
        limiter = RedisRateLimiter(
            client, settings.redis_prefix, settings.rate_limit_per_minute, ready_queue=ready_queue_key(broker)
        )
        app = create_worker(settings, pool, broker, limiter, http=http)
        freeze_startup_objects()
        app.start()
        log.info("worker %s ready: %d threads", app.executor.worker_id, settings.concurrency)
        stopping.wait()
        log.info(
            "worker stopping after %d wake-up(s), %d run(s) started off the queue directly and %d wake-up(s) "
            "sent again because other claims held the runs; finishing or handing back in-flight runs",
            app.executor.wakeups,
            app.executor.chained,
            app.executor.kept,
        )
        app.stop()
    finally:
        if metrics is not None:
            metrics.shutdown()
        tracing.shutdown_tracing()
        http.close()
        broker.close()
        client.close()
        pool.close()


def main() -> None:
    service_main("worker", run)
