"""Which scheduler replica leads: a lease in Redis (queue mode) or always this one (standalone).

Only the leader fires cron slots and runs maintenance jobs. The lease is a Redis key set with
``SET NX PX``; the leader extends it with a compare-and-extend script every quarter of the lease
and deletes it on a clean stop, so a follower takes over at once after a stop and within one
lease (plus one poll) after a crash. A leader that cannot renew in time stops acting as leader
when its own copy of the deadline passes, before the key expires in Redis. Leadership is an
optimisation, not the guarantee: each fire is claimed in PostgreSQL, so two leaders for a moment
(a frozen process waking up) still fire each slot once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Protocol

import redis

from sluice_common.cron import leader_key, status_key

log = logging.getLogger(__name__)

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# A follower's acquire; a key that still names this replica (a tick that acquired it while
# release() ran) is taken back rather than left to block every replica until it lapses.
_ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""
# The status is written and cleared only by the lease's holder, checked inside Redis: a status
# write racing a clean stop then either lands before the release (which clears it) or is refused,
# so no stale status outlives the leader.
_PUBLISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[2])
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# The leader stops acting this long before its lease would lapse in Redis (clock drift, latency).
_SAFETY = 0.5


class Lease(Protocol):
    instance: str

    def is_leader(self) -> bool:
        """Whether this replica may act as leader right now."""

    def tick(self) -> bool:
        """Acquire or renew the lease; return whether this replica leads."""

    def interval(self) -> float:
        """Seconds until the next :meth:`tick`."""

    def claim_job(self, job: str, slot: int, ttl_seconds: float) -> bool:
        """Claim one slot of a maintenance job so it runs once even across a handover."""

    def publish_status(self, status: dict[str, object]) -> None:
        """Make the leader's status visible to the API."""

    def release(self) -> None:
        """Give up the lease (clean stop) so another replica takes over at once."""


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RedisLease:
    def __init__(self, client: redis.Redis, prefix: str, lease_seconds: float) -> None:
        self.instance = instance_id()
        self._client = client
        self._prefix = prefix
        self._key = leader_key(prefix)
        self._lease_ms = int(lease_seconds * 1000)
        self._lease = lease_seconds
        self._acquire = client.register_script(_ACQUIRE)
        self._extend = client.register_script(_EXTEND)
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)
        self._valid_until = 0.0  # monotonic deadline of our leadership
        # Bumped by release(): a tick that was under way when the lease was given up must not
        # restore the deadline it computed before.
        self._epoch = 0
        self._lock = threading.Lock()

    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    def tick(self) -> bool:
        started = time.monotonic()
        with self._lock:
            epoch = self._epoch
        try:
            if self.is_leader():
                held = bool(self._extend(keys=[self._key], args=[self.instance, self._lease_ms]))
                if not held:
                    log.warning("scheduler lost its leader lease")
            else:
                held = bool(self._acquire(keys=[self._key], args=[self.instance, self._lease_ms]))
                if held:
                    log.info("scheduler %s is now the leader", self.instance)
        except redis.RedisError:
            log.warning("cannot reach Redis for the leader lease", exc_info=True)
            return self.is_leader()
        with self._lock:
            released = epoch != self._epoch
            if not released:
                self._valid_until = started + self._lease - _SAFETY if held else 0.0
        if released:
            if held:
                # Taken or kept after release() gave the lease up: give it back, rather than keep
                # every replica out until it lapses.
                self._give_back()
            return False
        return held

    def interval(self) -> float:
        # Leaders renew four times per lease; followers poll every second, so a takeover after a
        # crash takes at most one lease plus one second.
        return self._lease / 4 if self.is_leader() else min(1.0, self._lease / 4)

    def claim_job(self, job: str, slot: int, ttl_seconds: float) -> bool:
        key = f"{self._prefix}:scheduler:job:{job}:{slot}"
        return bool(self._client.set(key, self.instance, nx=True, px=max(1000, int(ttl_seconds * 1000))))

    def publish_status(self, status: dict[str, object]) -> None:
        body = json.dumps({**status, "leader": self.instance})
        self._publish(keys=[self._key, status_key(self._prefix)], args=[self.instance, body, self._lease_ms])

    def release(self) -> None:
        with self._lock:
            self._valid_until = 0.0
            self._epoch += 1
        # Whether or not this replica thinks it leads: a follower's tick may have just taken the
        # key, and a leader's own deadline may have passed while the key is still its own. The
        # script deletes the key only while it names this replica.
        self._give_back()

    def _give_back(self) -> None:
        try:
            self._release(keys=[self._key, status_key(self._prefix)], args=[self.instance])
        except redis.RedisError:
            log.warning("could not release the leader lease; it lapses by itself", exc_info=True)


class LocalLease:
    """Standalone mode: the one process leads. Fires are still claimed in PostgreSQL."""

    def __init__(self) -> None:
        self.instance = instance_id()
        self._released = False

    def is_leader(self) -> bool:
        return not self._released

    def tick(self) -> bool:
        return self.is_leader()

    def interval(self) -> float:
        return 1.0

    def claim_job(self, job: str, slot: int, ttl_seconds: float) -> bool:
        return True

    def publish_status(self, status: dict[str, object]) -> None:
        pass

    def release(self) -> None:
        self._released = True
