"""Wake-ups sent in batches (the API's WakeupSender) on real Redis, in Dramatiq's layout: its consumer reads them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from dramatiq.broker import MessageProxy

from sluice_common.broker import (
    DOORBELL_MAX,
    DOORBELL_WAIT_S,
    RUN_QUEUE,
    WAKEUP_OUTAGE,
    DoorbellRedisBroker,
    Wakeup,
    WakeupSender,
    make_broker,
    ready_queue_key,
)
from sluice_common.ratelimit import RedisRateLimiter
from sluice_common.settings import load_settings
from tests.conftest import Servers


def _drain(broker: DoorbellRedisBroker, queue: str, expected: int) -> list[MessageProxy]:
    consumer = broker.consume(queue, prefetch=100, timeout=100)
    got: list[MessageProxy] = []
    for _ in range(expected + 5):
        message = next(consumer)
        if message is not None:
            got.append(message)
    consumer.close()
    return got


@contextmanager
def _doorbell(servers: Servers, redis_prefix: str) -> Iterator[tuple[DoorbellRedisBroker, redis.Redis]]:
    """A broker with doorbells in a Redis namespace of its own, and a client of that Redis."""
    settings = load_settings({"SLUICE_REDIS_PREFIX": f"{redis_prefix}:{uuid.uuid4().hex[:8]}"})
    broker = make_broker(settings, servers.redis_url)
    assert isinstance(broker, DoorbellRedisBroker)
    client = redis.Redis.from_url(servers.redis_url)
    try:
        yield broker, client
    finally:
        broker.close()
        client.close()


def test_batched_wake_ups_reach_the_queue_and_ring_the_bell(servers: Servers, redis_prefix: str) -> None:
    with _doorbell(servers, redis_prefix) as (broker, client):
        sender = WakeupSender(broker)
        for i in range(50):
            sender.send(f"run-{i}", delay_ms=60_000 if i % 10 == 0 else None)
        sender.close()
        ns = broker.namespace
        assert client.hlen(f"{ns}:{RUN_QUEUE}.msgs") == 45
        assert client.hlen(f"{ns}:{RUN_QUEUE}.DQ.msgs") == 5
        assert client.llen(broker.doorbell_key(RUN_QUEUE)) == 45
        assert client.llen(broker.doorbell_key(f"{RUN_QUEUE}.DQ")) == 5
        # Dramatiq's own consumer fetches them, in order, with their run ids; delayed ones carry an eta.
        got = _drain(broker, RUN_QUEUE, 45)
        assert [m.args[0] for m in got] == [f"run-{i}" for i in range(50) if i % 10]
        assert all(m.actor_name == "execute_run" and m.options["redis_message_id"] for m in got)
        held = _drain(broker, f"{RUN_QUEUE}.DQ", 5)
        assert sorted(m.args[0] for m in held) == [f"run-{i}" for i in range(0, 50, 10)]
        assert all(m.options["eta"] > time.time() * 1000 + 50_000 for m in held)

        # Redis forgot its scripts (as after a restart): the script is loaded again, nothing is lost.
        client.script_flush()
        sender = WakeupSender(broker)
        for i in range(10):
            sender.send(f"again-{i}")
        sender.close()
        assert client.hlen(f"{ns}:{RUN_QUEUE}.msgs") == 55  # 45 fetched above (not acked) and 10 new

        # A burst leaves no more rings than the cap: after it, idle consumers sleep again at once
        # instead of spinning through one stale ring per message of the burst.
        sender = WakeupSender(broker)
        for i in range(3 * DOORBELL_MAX):
            sender.send(f"burst-{i}")
        sender.close()
        assert client.hlen(f"{ns}:{RUN_QUEUE}.msgs") == 55 + 3 * DOORBELL_MAX
        assert client.llen(broker.doorbell_key(RUN_QUEUE)) == DOORBELL_MAX


def test_a_start_slot_and_a_waiting_wake_up_are_taken_together(servers: Servers, redis_prefix: str) -> None:
    prefix = f"{redis_prefix}:{uuid.uuid4().hex[:8]}"
    settings = load_settings({"SLUICE_REDIS_PREFIX": prefix})
    broker = make_broker(settings, servers.redis_url)
    client = redis.Redis.from_url(servers.redis_url)
    queue = ready_queue_key(broker)
    assert queue == f"{broker.namespace}:{RUN_QUEUE}"
    limiter = RedisRateLimiter(client, prefix, 3, ready_queue=queue)
    try:
        # Nothing waits: no slot is taken.
        assert limiter.acquire_waiting() is False
        assert limiter.used() == 0
        sender = WakeupSender(broker)
        for i in range(4):
            sender.send(f"run-{i}")
        sender.close()
        assert [limiter.acquire_waiting() for _ in range(4)] == [True, True, True, False]
        # Three slots recorded, the three oldest wake-ups gone (list and body); the full window
        # left the fourth where it was.
        assert limiter.used() == 3
        assert client.llen(queue) == 1
        assert client.hlen(f"{queue}.msgs") == 1
        [left] = _drain(broker, RUN_QUEUE, 1)
        assert left.args[0] == "run-3"
        # Giving back the last slot (nothing was claimable with it) frees it for the next start.
        limiter.release()
        assert limiter.used() == 2
        # Redis forgot its scripts (as after a restart): the limiter loads its script again.
        client.script_flush()
        sender = WakeupSender(broker)
        sender.send("run-4")
        sender.close()
        assert limiter.acquire_waiting() is True
        assert limiter.used() == 3
        # A limiter without the queue's key never takes anything.
        assert RedisRateLimiter(client, prefix, 3).acquire_waiting() is False
    finally:
        broker.close()
        client.close()


def test_a_lone_wake_up_is_sent_by_its_caller_and_a_close_one_by_the_sender_thread(
    servers: Servers, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _doorbell(servers, redis_prefix) as (broker, client):
        senders: list[str] = []
        send_wakeups = broker.send_wakeups

        def recorded(wakeups: list[Wakeup]) -> None:
            senders.append(threading.current_thread().name)
            send_wakeups(wakeups)

        monkeypatch.setattr(broker, "send_wakeups", recorded)
        msgs = f"{broker.namespace}:{RUN_QUEUE}.msgs"
        sender = WakeupSender(broker)
        sender.send("lone")
        # In Redis when send() returns: no hand-over to wait for at light load.
        assert client.hlen(msgs) == 1
        monkeypatch.setattr(sender, "LINGER_S", 3600.0)
        sender.send("close")  # within LINGER_S of the previous one: load, so the thread sends it
        deadline = time.monotonic() + 5
        while client.hlen(msgs) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.hlen(msgs) == 2
        assert senders == [threading.current_thread().name, "sluice-wakeups"]
        # During an outage, callers never wait on Redis themselves.
        monkeypatch.setattr(sender, "LINGER_S", 0.0)
        monkeypatch.setattr(WAKEUP_OUTAGE, "_since", time.monotonic())
        sender.send("in an outage")
        sender.close()
        assert senders[-1] == "sluice-wakeups"
        assert client.hlen(msgs) == 3


def test_a_wake_up_handed_over_well_after_a_busy_batch_does_not_linger(
    servers: Servers, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender thread lingers before a batch only while wake-ups keep coming: one handed to it
    long after its last (big) batch was sent goes at once, not LINGER_S later."""
    with _doorbell(servers, redis_prefix) as (broker, client):
        entered, gate = threading.Event(), threading.Event()
        send_wakeups = broker.send_wakeups
        batches: list[int] = []

        def held(wakeups: list[Wakeup]) -> None:
            if threading.current_thread().name == "sluice-wakeups":
                entered.set()
                gate.wait(10)  # the thread's first batch waits, so that the next ones gather
                batches.append(len(wakeups))
            send_wakeups(wakeups)

        monkeypatch.setattr(broker, "send_wakeups", held)
        msgs = f"{broker.namespace}:{RUN_QUEUE}.msgs"
        sender = WakeupSender(broker)
        monkeypatch.setattr(sender, "LINGER_S", 1.0)

        def arrived(count: int, within: float) -> bool:
            deadline = time.monotonic() + within
            while client.hlen(msgs) < count and time.monotonic() < deadline:
                time.sleep(0.005)
            return bool(client.hlen(msgs) >= count)

        sender.send("lone")  # light load: its caller sends it
        sender.send("close")  # within LINGER_S of the previous one: handed to the thread
        assert entered.wait(5)
        for i in range(WakeupSender.BUSY_BATCH):
            sender.send(f"close-{i}")  # these gather while the thread sends the first
        gate.set()
        assert arrived(2 + WakeupSender.BUSY_BATCH, 5)
        assert batches == [1, WakeupSender.BUSY_BATCH]  # the second batch was big: load
        time.sleep(1.2)  # longer than LINGER_S: that load is over
        sender.send("light")  # its caller sends it
        sender.send("right after")  # within LINGER_S of the previous one: handed to the thread
        assert arrived(4 + WakeupSender.BUSY_BATCH, 0.5)
        assert batches == [1, WakeupSender.BUSY_BATCH, 1]
        sender.close()


def test_a_consumer_with_nothing_to_fetch_waits_on_its_doorbell_only(servers: Servers, redis_prefix: str) -> None:
    with _doorbell(servers, redis_prefix) as (broker, client):
        # A long poll timeout, as a worker's: Dramatiq's consumer would sleep a growing backoff up
        # to it after each empty fetch, on top of the doorbell.
        consumer = broker.consume(RUN_QUEUE, prefetch=10, timeout=5000)
        bell = broker.doorbell_key(RUN_QUEUE)
        client.rpush(bell, *[1] * 10)  # stale rings: each wait returns at once
        started = time.monotonic()
        assert [next(consumer) for _ in range(10)] == [None] * 10
        assert time.monotonic() - started < 1.0
        WakeupSender(broker).send("run-1")
        started = time.monotonic()
        message = next(consumer) or next(consumer)
        assert message is not None
        assert message.args[0] == "run-1"
        assert time.monotonic() - started < 0.4  # the bell, not the doorbell's timeout
        consumer.close()


def test_the_delay_queue_consumer_polls_briefly_only_while_it_holds_messages(
    servers: Servers, redis_prefix: str
) -> None:
    with _doorbell(servers, redis_prefix) as (broker, client):
        delay_queue = f"{RUN_QUEUE}.DQ"
        bell = broker.doorbell_key(delay_queue)
        consumer = broker.consume(delay_queue, prefetch=100, timeout=5000)
        started = time.monotonic()
        assert next(consumer) is None
        assert time.monotonic() - started >= DOORBELL_WAIT_S * 0.8  # holding nothing: idle
        WakeupSender(broker).send("later", delay_ms=60_000)
        held = next(consumer) or next(consumer)
        assert held is not None
        assert held.args[0] == "later"
        client.delete(bell)  # no ring left over: the next wait is a full one
        started = time.monotonic()
        assert next(consumer) is None
        assert time.monotonic() - started < DOORBELL_WAIT_S / 2  # back soon to release it on time
        # Handed back (a stopping worker): the bell rings for other processes' idle consumers.
        consumer.requeue([held])
        assert client.llen(bell) == 1
        other = broker.consume(delay_queue, prefetch=100, timeout=5000)
        again = next(other)
        assert again is not None
        assert again.args[0] == "later"
        consumer.close()
        other.close()
