"""The global run-start rate limit: ``N`` starts in any sliding 60-second window.

With Redis the window lives in one sorted set shared by every worker, updated by a Lua script so
that check-and-record is atomic. Standalone mode uses the same algorithm in process. The limit
can be changed at run time (``sluice config rate-limit N``): it is read from Redis on each check,
falling back to ``SLUICE_RATE_LIMIT_PER_MINUTE``.

``acquire`` never sleeps: it answers how many milliseconds to wait, so a held-back run is simply
woken again at that time (no attempt used, no busy loop).

Each worker thread calls the scripts over a Redis connection of its own (see
:meth:`RedisRateLimiter._call_own`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from typing import Any, Protocol

import redis
from redis.commands.core import Script

WINDOW_MS = 60_000

# KEYS[1] window zset, KEYS[2] limit override; ARGV: now_ms, default limit, window_ms, member.
# Leaves `now`, `limit`, `window` and `used` (the starts in the window) for what follows.
_WINDOW = """
local now = tonumber(ARGV[1])
local limit = tonumber(redis.call('GET', KEYS[2]) or ARGV[2])
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
"""

_RECORD = """
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
"""

_ACQUIRE = (
    _WINDOW
    + """
if used < limit then
"""
    + _RECORD
    + """
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], used - limit, used - limit, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""
)

# KEYS[3] the ready wake-ups' list (Dramatiq's queue), KEYS[4] their bodies (its ``.msgs`` hash).
# Takes a start slot and the oldest ready wake-up together, or neither; returns 1 or 0.
_ACQUIRE_WAITING = (
    """
if redis.call('LLEN', KEYS[3]) == 0 then
  return 0
end
"""
    + _WINDOW
    + """
if used >= limit then
  return 0
end
"""
    + _RECORD
    + """
local id = redis.call('LPOP', KEYS[3])
redis.call('HDEL', KEYS[4], id)
return 1
"""
)


class RateLimiter(Protocol):
    def acquire(self) -> int:
        """Record one start and return 0, or return the milliseconds to wait (nothing recorded)."""

    def release(self) -> None:
        """Give back the start recorded by this thread's last successful ``acquire``.

        A wake-up takes its slot before claiming (so the claim is one statement) and gives it
        back at once when there was nothing to claim.
        """

    def acquire_waiting(self) -> bool:
        """Record one start and take one ready wake-up off the broker's queue, or do neither.

        For a worker thread that has just finished a run: while wake-ups wait in the queue, it
        claims the next run itself instead of returning to the broker for the next message, and
        the wake-up it takes is the one that run would have used. ``False`` when no wake-up waits,
        the window is full, or the broker keeps no queue that can be read this way.
        """

    def limit(self) -> int: ...

    def set_limit(self, per_minute: int) -> None: ...

    def used(self) -> int: ...


class RedisRateLimiter:
    def __init__(self, client: redis.Redis, prefix: str, default_limit: int, *, ready_queue: str | None = None) -> None:
        """``ready_queue``: the Redis key of the run queue's list, for :meth:`acquire_waiting`."""
        self._client = client
        self._window_key = f"{prefix}:ratelimit:starts"
        self._limit_key = f"{prefix}:ratelimit:per_minute"
        self._default = default_limit
        self._script = client.register_script(_ACQUIRE)
        self._waiting_script = client.register_script(_ACQUIRE_WAITING)
        self._ready_keys = [ready_queue, f"{ready_queue}.msgs"] if ready_queue else None
        self._local = threading.local()

    def acquire(self) -> int:
        member = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        keys = [self._window_key, self._limit_key]
        wait = int(self._call_own(self._script, keys, [now_ms, self._default, WINDOW_MS, member]))
        if wait == 0:
            self._local.member = member
        return wait

    def acquire_waiting(self) -> bool:
        if self._ready_keys is None:
            return False
        member = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        keys = [self._window_key, self._limit_key, *self._ready_keys]
        taken = bool(self._call_own(self._waiting_script, keys, [now_ms, self._default, WINDOW_MS, member]))
        if taken:
            self._local.member = member
        return taken

    def _call_own(self, script: Script, keys: list[str], args: list[object]) -> Any:
        """Run ``script`` on this thread's own connection.

        Called once or twice per run by every worker thread (``acquire`` per wake-up,
        ``acquire_waiting`` per run under a backlog): through the client, each call also takes a
        connection from the shared pool (a lock, a readiness poll) and gives it back, which cost
        as much CPU as the call itself. A connection per thread skips that; it is
        re-opened after an error, and a script Redis has forgotten is loaded again.
        """
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._client.connection_pool.make_connection()
        try:
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                self._client.script_load(script.script)
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            raise

    def release(self) -> None:
        member = getattr(self._local, "member", None)
        if member is not None:
            self._client.zrem(self._window_key, member)
            self._local.member = None

    def limit(self) -> int:
        value = self._client.get(self._limit_key)
        return int(value) if value is not None else self._default

    def set_limit(self, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError("the rate limit must be at least 1 run per minute")
        self._client.set(self._limit_key, per_minute)

    def used(self) -> int:
        now_ms = int(time.time() * 1000)
        return int(self._client.zcount(self._window_key, now_ms - WINDOW_MS, "+inf"))


class LocalRateLimiter:
    """The same sliding window for one process (standalone mode)."""

    def __init__(self, default_limit: int) -> None:
        self._limit = default_limit
        self._starts: deque[float] = deque()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _trim(self, now: float) -> None:
        while self._starts and self._starts[0] <= now - WINDOW_MS / 1000:
            self._starts.popleft()

    def acquire(self) -> int:
        with self._lock:
            now = time.time()
            self._trim(now)
            if len(self._starts) < self._limit:
                self._starts.append(now)
                self._local.stamp = now
                return 0
            oldest = self._starts[len(self._starts) - self._limit]
            return max(1, int((oldest + WINDOW_MS / 1000 - now) * 1000))

    def acquire_waiting(self) -> bool:
        # The in-process broker's queue is not shared with other processes: its worker threads
        # take every message themselves, at no cost worth saving.
        return False

    def release(self) -> None:
        stamp = getattr(self._local, "stamp", None)
        with self._lock:
            if stamp is not None and stamp in self._starts:
                self._starts.remove(stamp)
        self._local.stamp = None

    def limit(self) -> int:
        return self._limit

    def set_limit(self, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError("the rate limit must be at least 1 run per minute")
        self._limit = per_minute

    def used(self) -> int:
        with self._lock:
            self._trim(time.time())
            return len(self._starts)
