"""Bearer-token authentication and the per-token request limit.

Resources are private unless they set ``public = True``. A token's verdict (valid or not) is
remembered for a couple of seconds per process, so that a burst of requests, good or bad, costs
one lookup, not one per request; a revoked token therefore stops working within
``TOKEN_CACHE_SECONDS``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import falcon
import redis

from sluice_common.db import Pool
from sluice_common.errors import AuthError
from sluice_common.logs import Outage
from sluice_common.users import TOKEN_PREFIX, authenticate, hash_token

log = logging.getLogger(__name__)
_LIMIT_OUTAGE = Outage(log, "checking request limits in Redis", "requests pass unchecked until it answers")

TOKEN_CACHE_SECONDS = 2.0
_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Caller:
    user_id: UUID
    name: str
    key: str  # what the request limit counts by (a token hash prefix)


class RequestLimiter(Protocol):
    def hit(self, key: str) -> float | None:
        """Count one request under ``key``; return seconds to wait when over the limit, else None."""


class RedisRequestLimiter:
    """Fixed one-minute windows counted in Redis, shared by every API process.

    Each process takes requests from Redis in slices (a twentieth of the limit, at least one)
    and hands them out locally, so a busy token costs one Redis round trip per slice rather than
    per request. A slice a process does not use up is lost with its window, so a token spread
    over many processes may get up to one slice per process fewer requests than the limit, never
    more.
    """

    def __init__(self, client: redis.Redis, prefix: str, per_minute: int) -> None:
        self._client = client
        self._prefix = f"{prefix}:api:rl"
        self._limit = per_minute
        self._slice = max(1, per_minute // 20)
        self._left: dict[str, tuple[int, int]] = {}  # key -> (window, requests left in our slice)
        self._lock = threading.Lock()

    def hit(self, key: str) -> float | None:
        if self._limit <= 0:
            return None
        now = time.time()
        window = int(now // 60)
        with self._lock:
            held = self._left.get(key)
            if held is not None and held[0] == window:
                if held[1] > 0:
                    self._left[key] = (window, held[1] - 1)
                    return None
                if held[1] < 0:  # Redis said the window is used up
                    return (window + 1) * 60 - now
        name = f"{self._prefix}:{key}:{window}"
        pipe = self._client.pipeline(transaction=False)
        pipe.incrby(name, self._slice)
        pipe.expire(name, 61)
        try:
            total = int(pipe.execute()[0])
        except redis.RedisError as exc:
            # The limit protects the service; it must not take it down with Redis: let it pass.
            _LIMIT_OUTAGE.failed(exc)
            return None
        _LIMIT_OUTAGE.recovered()
        granted = min(self._slice, self._slice - (total - self._limit))
        with self._lock:
            if len(self._left) > _CACHE_SIZE:
                self._left = {k: v for k, v in self._left.items() if v[0] == window}
            if granted <= 0:
                self._left[key] = (window, -1)
                return (window + 1) * 60 - now
            # Another thread may have taken a slice meanwhile: keep what is left of both.
            held = self._left.get(key)
            left = held[1] if held is not None and held[0] == window and held[1] > 0 else 0
            self._left[key] = (window, left + granted - 1)
        return None


class LocalRequestLimiter:
    """The same windows kept in this process (standalone mode has one API process)."""

    def __init__(self, per_minute: int) -> None:
        self._limit = per_minute
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> float | None:
        if self._limit <= 0:
            return None
        now = time.time()
        window = int(now // 60)
        with self._lock:
            if len(self._counts) > _CACHE_SIZE:
                self._counts = {k: v for k, v in self._counts.items() if k[1] == window}
            count = self._counts.get((key, window), 0) + 1
            self._counts[(key, window)] = count
        if count <= self._limit:
            return None
        return (window + 1) * 60 - now


def too_many(retry_after: float) -> falcon.HTTPError:
    seconds = max(1, math.ceil(retry_after))
    return falcon.HTTPTooManyRequests(
        title="Too Many Requests",
        description=f"request limit reached; retry in {seconds} s",
        retry_after=seconds,
    )


class AuthMiddleware:
    def __init__(self, pool: Pool, limiter: RequestLimiter) -> None:
        self._pool = pool
        self._limiter = limiter
        self._cache: OrderedDict[bytes, tuple[float, Caller | None]] = OrderedDict()
        self._lock = threading.Lock()

    def _lookup(self, token: str) -> Caller:
        digest = hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            if hit[1] is None:  # refused a moment ago: no database query for the same bad token
                raise AuthError("unknown or revoked token")
            return hit[1]
        try:
            with self._pool.connection() as conn:
                user = authenticate(conn, token)
        except AuthError:
            self._remember(digest, now, None)
            raise
        caller = Caller(UUID(str(user.id)), user.name, digest[:12].hex())
        self._remember(digest, now, caller)
        return caller

    def _remember(self, digest: bytes, now: float, caller: Caller | None) -> None:
        with self._lock:
            self._cache[digest] = (now + TOKEN_CACHE_SECONDS, caller)
            self._cache.move_to_end(digest)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any, params: Any) -> None:
        if resource is None or getattr(resource, "public", False):
            return
        header = req.get_header("Authorization")
        if not header:
            raise AuthError("send Authorization: Bearer <token>")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("use the Bearer scheme: Authorization: Bearer <token>")
        if not token.startswith(TOKEN_PREFIX):
            raise AuthError("malformed token")
        caller = self._lookup(token)
        wait = self._limiter.hit(caller.key)
        if wait is not None:
            raise too_many(wait)
        req.context.caller = caller


def caller_of(req: falcon.Request) -> Caller:
    caller: Caller = req.context.caller
    return caller
