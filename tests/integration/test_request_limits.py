"""The API's per-token request limit on real Redis, shared by several API processes."""

from __future__ import annotations

import time
import uuid

import redis

from sluice_api.auth import LocalRequestLimiter, RedisRequestLimiter
from tests.conftest import Servers


def _burst(limiters: list[RedisRequestLimiter | LocalRequestLimiter], key: str, n: int) -> tuple[int, list[float]]:
    admitted, waits = 0, []
    for i in range(n):
        wait = limiters[i % len(limiters)].hit(key)
        if wait is None:
            admitted += 1
        else:
            waits.append(wait)
    return admitted, waits


def test_processes_share_one_limit_and_never_exceed_it(servers: Servers, redis_prefix: str) -> None:
    client = redis.Redis.from_url(servers.redis_url)
    try:
        for _ in range(3):  # a burst that straddles a minute boundary is tried again
            window = int(time.time() // 60)
            key = uuid.uuid4().hex
            processes = [RedisRequestLimiter(client, redis_prefix, 100) for _ in range(3)]
            admitted, waits = _burst(processes, key, 200)
            if int(time.time() // 60) == window:
                break
        # Each process may leave at most one unused slice (100 // 20 = 5) of the window.
        assert 100 - 3 * 5 <= admitted <= 100
        assert len(waits) == 200 - admitted
        assert all(0 < w <= 60 for w in waits)
        # Another token has its own allowance.
        assert processes[0].hit(uuid.uuid4().hex) is None
    finally:
        client.close()


def test_small_limits_are_exact() -> None:
    limiter = LocalRequestLimiter(5)
    admitted, waits = _burst([limiter], "k", 7)
    if admitted != 5:  # the minute turned over mid-burst
        admitted, waits = _burst([limiter], "k2", 7)
    assert (admitted, len(waits)) == (5, 2)
    assert LocalRequestLimiter(0).hit("k") is None
