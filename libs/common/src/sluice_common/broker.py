"""The Dramatiq broker and the run message contract, shared by producers and the worker.

Producers (api, scheduler) send ``execute_run`` messages by actor name, never importing worker
code. A message is a *wake-up*: the worker that receives it claims the best runnable run in
PostgreSQL (strict priority, delays, per-user cap), which may be another run than the one named
in the message. That is what makes priority global: Redis lists are FIFO and Dramatiq's actor
priority only orders what one process has already fetched. Spare wake-ups are harmless (they
find nothing to claim); the reconciler tops up missing ones.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import dramatiq
import redis
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import current_millis, dq_name
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    TimeLimit,
)

from sluice_common.logs import Outage
from sluice_common.settings import Settings

log = logging.getLogger(__name__)

RUN_QUEUE = "runs"
RUN_ACTOR = "execute_run"
Wakeup = tuple[str, int | None, str | None]  # run id, delay in ms (None: now), W3C traceparent

# Milliseconds Dramatiq waits for a crashed process's unacknowledged messages to be re-queued.
HEARTBEAT_TIMEOUT_MS = 15_000
# An idle consumer blocks this long on its doorbell before polling anyway (heartbeats, acks,
# requeues). The delay-queue consumer also releases held messages when their time comes, between
# waits, so while it holds any it waits only briefly: that bounds how late a delayed run or a
# retry can start. Holding none, it waits as long as the others: a new delayed message rings.
DOORBELL_WAIT_S = 0.5
DELAYED_DOORBELL_WAIT_S = 0.05
# How long a consumer whose process holds all the messages it may prefetch waits before it looks again.
FULL_WAIT_S = 0.05
# Rings kept per doorbell: enough to wake every idle consumer of a large fleet (one per worker
# process and queue) at once. A burst rings once per message, and after it the queue is drained
# by fetching, not by the bell: every ring beyond this cap would be a stale one that idle consumers
# spin through (a fetch, an LLEN and a BLPOP each) before they can sleep again.
DOORBELL_MAX = 128

# Dramatiq's Redis layout for an enqueued message (its ``dispatch`` script's "enqueue"): the body
# in the queue's ``.msgs`` hash, the id at the end of the queue's list; then each queue's doorbell
# rings once per message. ARGV: namespace, doorbell cap, then (message id, queue, body) triples.
_ENQUEUE_MANY = """
local ns = ARGV[1]
local rings = {}
for i = 3, #ARGV, 3 do
  local queue = ns .. ':' .. ARGV[i + 1]
  redis.call('HSET', queue .. '.msgs', ARGV[i], ARGV[i + 2])
  redis.call('RPUSH', queue, ARGV[i])
  rings[queue .. '.bell'] = (rings[queue .. '.bell'] or 0) + 1
end
for bell, count in pairs(rings) do
  for _ = 1, count do
    redis.call('RPUSH', bell, 1)
  end
  redis.call('LTRIM', bell, -tonumber(ARGV[2]), -1)
end
return #ARGV
"""


class _DoorbellConsumer(Consumer):
    """Dramatiq's Redis consumer, made to sleep in Redis instead of polling when its queue is empty.

    Dramatiq's consumer polls an empty queue every ``worker_timeout`` ms: a short timeout gives fast
    starts but costs a fifth of a core per idle worker; a long one adds up to that timeout to each
    start. Here the consumer polls fast only while its queue has messages; once the queue is empty
    it waits on a doorbell list (BLPOP) that every enqueue rings, so an idle worker costs nothing
    and still starts a new run at once.
    """

    def __init__(self, inner: Consumer, broker: DoorbellRedisBroker, queue_name: str) -> None:
        self._inner = inner
        self._client = broker.client
        self._queue_key = f"{broker.namespace}:{queue_name}"
        self._bell = broker.doorbell_key(queue_name)
        self._wait = DELAYED_DOORBELL_WAIT_S if queue_name.endswith(".DQ") else DOORBELL_WAIT_S

    def __iter__(self) -> _DoorbellConsumer:
        return self

    def __next__(self) -> MessageProxy | None:
        message = next(self._inner)
        if message is None:
            if self._full():
                # Every thread is busy and as many messages wait in the process as it may hold:
                # nothing to fetch until one is done, so the loop (which also sends the
                # acknowledgements) need not spin at the 5 ms poll meanwhile.
                time.sleep(FULL_WAIT_S)
            elif self._client.llen(self._queue_key) == 0:
                self._client.blpop([self._bell], timeout=self._wait if self._held() else DOORBELL_WAIT_S)
        return message

    def _full(self) -> bool:
        # Dramatiq's Redis consumer keeps these two as attributes; its base class has neither.
        inner: Any = self._inner
        return bool(inner.outstanding_message_count >= inner.prefetch)

    def _held(self) -> bool:
        # Fetched and not acknowledged yet: for the delay queue, the messages waiting for their eta.
        inner: Any = self._inner
        return bool(inner.outstanding_message_count > 0)

    def ack(self, message: MessageProxy) -> None:
        self._inner.ack(message)

    def nack(self, message: MessageProxy) -> None:
        self._inner.nack(message)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        messages = list(messages)
        self._inner.requeue(messages)
        if messages:
            # Handed back by a stopping worker: ring, so that idle consumers elsewhere (the delay
            # queue's, which hold no message, wait as long as the others) take them at once.
            pipe = self._client.pipeline(transaction=False)
            pipe.rpush(self._bell, *[1] * min(len(messages), DOORBELL_MAX))
            pipe.ltrim(self._bell, -DOORBELL_MAX, -1)
            pipe.execute()

    def close(self) -> None:
        self._inner.close()


class DoorbellRedisBroker(RedisBroker):
    """A RedisBroker whose enqueue rings a per-queue doorbell that idle consumers wait on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._enqueue_many = self.client.register_script(_ENQUEUE_MANY)

    def doorbell_key(self, queue_name: str) -> str:
        return f"{self.namespace}:{queue_name}.bell"

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        sent = super().enqueue(message, delay=delay)
        key = self.doorbell_key(sent.queue_name)  # the delay queue's own bell for delayed messages
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, 1)
        pipe.ltrim(key, -DOORBELL_MAX, -1)
        pipe.execute()
        return sent

    def send_wakeups(self, wakeups: list[Wakeup]) -> None:
        """Enqueue run wake-ups and ring their doorbells in one script call.

        Each goes where :meth:`RedisBroker.enqueue` would put its message (a fresh Redis message
        id, an ``eta`` and the delay queue when delayed; the id in the queue's list, the body in
        its ``.msgs`` hash, as Dramatiq's ``dispatch`` script does), without enqueue hooks, which
        none of Sluice's middleware uses. One script call per batch instead of one per message is
        what makes a busy producer's wake-ups cheap.
        """
        args: list[Any] = [self.namespace, DOORBELL_MAX]
        for run_id, delay_ms, traceparent in wakeups:
            redis_message_id = str(uuid.uuid4())
            eta = current_millis() + delay_ms if delay_ms and delay_ms > 0 else None
            args += (redis_message_id, *wakeup_body(run_id, redis_message_id, eta, traceparent))
        self._enqueue_many(args=args)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        # The wrapper does all the waiting (doorbell, FULL_WAIT_S): Dramatiq's consumer would also
        # sleep up to ``timeout`` after each empty fetch, and a wake-up sent in that sleep (as the
        # next one often is, right after a message was fetched) waited for it to end.
        return _DoorbellConsumer(super().consume(queue_name, prefetch=prefetch, timeout=0), self, queue_name)


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
        broker = DoorbellRedisBroker(
            # Timeouts, so that a Redis that hangs (rather than refusing) cannot block a sender or
            # a request thread for ever; consumers' blocking waits are far shorter than these.
            client=redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5),
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


def ready_queue_key(broker: dramatiq.Broker) -> str | None:
    """The Redis list of the run queue's ready wake-ups (Dramatiq's layout), or None in process."""
    return f"{broker.namespace}:{RUN_QUEUE}" if isinstance(broker, RedisBroker) else None


def wakeup_body(run_id: str, redis_message_id: str, eta: int | None, traceparent: str | None) -> tuple[str, bytes]:
    """A run wake-up's queue and body, as :meth:`dramatiq.Message.encode` writes it once the Redis
    broker has given it its Redis id (and its ``eta`` and the delay queue when delayed), built
    without the two Message objects per wake-up."""
    options: dict[str, Any] = {"traceparent": traceparent} if traceparent else {}
    options["redis_message_id"] = redis_message_id
    if eta is not None:
        options["eta"] = eta
    queue_name = dq_name(RUN_QUEUE) if eta is not None else RUN_QUEUE
    body = {
        "queue_name": queue_name,
        "actor_name": RUN_ACTOR,
        "args": [run_id],
        "kwargs": {},
        "options": options,
        "message_id": str(uuid.uuid4()),
        "message_timestamp": current_millis(),
    }
    return queue_name, json.dumps(body, separators=(",", ":")).encode()


def send_run_message(
    broker: dramatiq.Broker, run_id: str, *, delay_ms: int | None = None, traceparent: str | None = None
) -> None:
    """Send one wake-up for ``run_id`` (optionally delayed), by actor name."""
    message, delay = run_message(run_id, delay_ms=delay_ms, traceparent=traceparent)
    broker.enqueue(message, delay=delay)


def run_message(
    run_id: str, *, delay_ms: int | None = None, traceparent: str | None = None
) -> tuple[dramatiq.Message[None], int | None]:
    options: dict[str, object] = {}
    if traceparent:
        options["traceparent"] = traceparent
    message: dramatiq.Message[None] = dramatiq.Message(
        queue_name=RUN_QUEUE, actor_name=RUN_ACTOR, args=(run_id,), kwargs={}, options=options
    )
    return message, delay_ms if delay_ms and delay_ms > 0 else None


# Wake-ups of stored runs that could not be sent: logged once per outage, for the whole process.
WAKEUP_OUTAGE = Outage(log, "sending run wake-ups to Redis", "the runs are stored and the reconciler wakes them")


def wake(broker: dramatiq.Broker, run_id: str, *, delay_ms: int | None = None, traceparent: str | None = None) -> None:
    """Send the wake-up of a run already stored in PostgreSQL. A failure is not raised (the
    reconciler sends it once Redis is back) and is logged once per outage (:data:`WAKEUP_OUTAGE`)."""
    try:
        send_run_message(broker, run_id, delay_ms=delay_ms, traceparent=traceparent)
    except Exception as exc:
        WAKEUP_OUTAGE.failed(exc)
    else:
        WAKEUP_OUTAGE.recovered()


class WakeupSender:
    """Sends run wake-ups from a background thread, as many per Redis round trip as are waiting.

    For producers that accept many runs at once (the API): the run row is committed before its
    wake-up is handed over, so a wake-up lost with the process (or with Redis) only delays the
    run until the reconciler's next pass; it never loses it. Under load this turns three Redis
    round trips per accepted run into a share of one.

    At light load (a wake-up more than ``LINGER_S`` after the previous one, so it would go in a
    batch of its own anyway) the caller sends it itself: handed over, it would wait for the sender
    thread to wake up and then, while the caller goes on with its response, for the GIL, on the
    way to the run's start. During a Redis outage wake-ups always go through the thread, so that
    request threads do not wait on a Redis that fails.
    """

    _STOP = object()
    LINGER_S = 0.01
    BUSY_BATCH = 4  # a batch this big means wake-ups come faster than one round trip each

    def __init__(self, broker: dramatiq.Broker, *, max_batch: int = 500) -> None:
        self._broker = broker
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._last = 0.0  # monotonic time of the last wake-up given to send()
        self._in_hand = 0  # wake-ups handed to the thread and not sent yet
        self._direct = False  # a caller is sending its own
        self._thread = threading.Thread(target=self._loop, name="sluice-wakeups", daemon=True)
        self._thread.start()

    def send(self, run_id: str, *, delay_ms: int | None = None, traceparent: str | None = None) -> None:
        wakeup = (run_id, delay_ms, traceparent)
        now = time.monotonic()
        with self._lock:
            light = now - self._last >= self.LINGER_S
            self._last = now
            # Nothing handed over may still wait: a caller's wake-ups keep their order.
            direct = light and not self._direct and self._in_hand == 0 and not WAKEUP_OUTAGE.down
            if direct:
                self._direct = True
            else:
                self._in_hand += 1
        if not direct:
            self._queue.put(wakeup)
            return
        try:
            self._deliver([wakeup])
        finally:
            with self._lock:
                self._direct = False

    def _loop(self) -> None:
        busy = False
        sent_at = 0.0  # monotonic time the last batch was sent
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if busy and time.monotonic() - sent_at < self.LINGER_S:
                # Under load, let more gather: many wake-ups per round trip cost far less CPU than a
                # few, for a start at most LINGER_S later. Sleeping (rather than waiting on the
                # queue) spares a thread switch per wake-up. At light load (the last batch was
                # small, or this wake-up came well after it: the load that made it big is over) a
                # wake-up goes at once.
                time.sleep(self.LINGER_S)
            batch = [item]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is self._STOP:
                    stop = True
                    break
                batch.append(more)
            busy = len(batch) >= self.BUSY_BATCH
            self._deliver(batch)
            sent_at = time.monotonic()
            with self._lock:
                self._in_hand -= len(batch)
            if stop:
                return

    def _deliver(self, batch: list[Wakeup]) -> None:
        try:
            self._send(batch)
        except Exception as exc:
            WAKEUP_OUTAGE.failed(exc, len(batch))
        else:
            WAKEUP_OUTAGE.recovered()

    def _send(self, batch: list[Wakeup]) -> None:
        if isinstance(self._broker, DoorbellRedisBroker):
            self._broker.send_wakeups(batch)
            return
        for run_id, delay_ms, traceparent in batch:
            send_run_message(self._broker, run_id, delay_ms=delay_ms, traceparent=traceparent)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is waiting, then stop."""
        self._queue.put(self._STOP)
        self._thread.join(timeout)
