"""Wake-ups sent in batches (the API's WakeupSender) on real Redis, through Dramatiq's own script."""

from __future__ import annotations

import uuid

import redis

from sluice_common.broker import RUN_QUEUE, DoorbellRedisBroker, WakeupSender, make_broker
from sluice_common.settings import load_settings
from tests.conftest import Servers


def test_batched_wake_ups_reach_the_queue_and_ring_the_bell(servers: Servers, redis_prefix: str) -> None:
    settings = load_settings({"SLUICE_REDIS_PREFIX": f"{redis_prefix}:{uuid.uuid4().hex[:8]}"})
    broker = make_broker(settings, servers.redis_url)
    assert isinstance(broker, DoorbellRedisBroker)
    client = redis.Redis.from_url(servers.redis_url)
    try:
        sender = WakeupSender(broker)
        for i in range(50):
            sender.send(f"run-{i}", delay_ms=60_000 if i % 10 == 0 else None)
        sender.close()
        ns = broker.namespace
        assert client.hlen(f"{ns}:{RUN_QUEUE}.msgs") == 45
        assert client.hlen(f"{ns}:{RUN_QUEUE}.DQ.msgs") == 5
        assert client.llen(broker.doorbell_key(RUN_QUEUE)) == 45

        # Redis forgot its scripts (as after a restart): the batch falls back and loses nothing.
        client.script_flush()
        sender = WakeupSender(broker)
        for i in range(10):
            sender.send(f"again-{i}")
        sender.close()
        assert client.hlen(f"{ns}:{RUN_QUEUE}.msgs") == 55
    finally:
        broker.close()
        client.close()
