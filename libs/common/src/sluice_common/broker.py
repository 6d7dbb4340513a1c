"""The Dramatiq broker and the run message contract, shared by producers and the worker.

Producers (api, scheduler) send ``execute_run`` messages by actor name, never importing worker
code. A message is a *wake-up*: the worker that receives it claims the best runnable run in
PostgreSQL (strict priority, delays, per-user cap), which may be another run than the one named
in the message. That is what makes priority global: Redis lists are FIFO and Dramatiq's actor
priority only orders what one process has already fetched. Spare wake-ups are harmless (they
find nothing to claim); the reconciler tops up missing ones.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    TimeLimit,
)

from sluice_common.settings import Settings

RUN_QUEUE = "runs"
RUN_ACTOR = "execute_run"

# Milliseconds Dramatiq waits for a crashed process's unacknowledged messages to be re-queued.
HEARTBEAT_TIMEOUT_MS = 15_000


def middleware(settings: Settings) -> list[dramatiq.Middleware]:
    """The explicit middleware list of every Sluice broker.

    Dramatiq's Retries only cover infrastructure failures around a run (PostgreSQL or Redis
    briefly unreachable); run attempts themselves are counted and backed off in PostgreSQL.
    The run time limit is enforced per run by the worker, so TimeLimit only guards the
    message handler as a whole (a generous ceiling above the longest run). There is no
    ShutdownNotifications: on SIGTERM a run finishes its current step and is handed back at the
    step boundary, instead of being interrupted mid-step.
    """
    return [
        AgeLimit(),
        TimeLimit(time_limit=(7 * 86400 + 600) * 1000, interval=1000),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=5, min_backoff=500, max_backoff=30_000),
        CurrentMessage(),
    ]


def make_broker(settings: Settings, redis_url: str | None) -> dramatiq.Broker:
    """A Redis broker namespaced by ``SLUICE_REDIS_PREFIX``, or an in-process one (standalone)."""
    broker: dramatiq.Broker
    if redis_url:
        broker = RedisBroker(  # type: ignore[no-untyped-call]
            url=redis_url,
            namespace=f"{settings.redis_prefix}:dramatiq",
            middleware=middleware(settings),
            heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
            # Re-queue the messages of dead workers often enough to matter within a minute.
            maintenance_chance=10_000,
        )
    else:
        broker = StubBroker(middleware=middleware(settings))
    broker.declare_queue(RUN_QUEUE)
    return broker


def send_run_message(
    broker: dramatiq.Broker, run_id: str, *, delay_ms: int | None = None, traceparent: str | None = None
) -> None:
    """Send one wake-up for ``run_id`` (optionally delayed), by actor name."""
    options: dict[str, object] = {}
    if traceparent:
        options["traceparent"] = traceparent
    message: dramatiq.Message[None] = dramatiq.Message(
        queue_name=RUN_QUEUE,
        actor_name=RUN_ACTOR,
        args=(run_id,),
        kwargs={},
        options=options,
    )
    broker.enqueue(message, delay=delay_ms if delay_ms and delay_ms > 0 else None)
