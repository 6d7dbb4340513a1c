"""How trigger changes reach the scheduler: Redis pub/sub in queue mode, a queue in standalone mode.

The scheduler's loop sleeps *in* :meth:`Signals.wait` until its next fire is due, so a change
notice wakes it at once and a due fire wakes it on time, with no polling in between.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from typing import Protocol

import redis

from sluice_common.cron import REFRESH_ALL, changes_channel

log = logging.getLogger(__name__)


class Signals(Protocol):
    def wait(self, timeout: float) -> list[str]:
        """Block up to ``timeout`` seconds for change notices (workflow ids, or ``*`` for all)."""

    def close(self) -> None: ...


class RedisSignals:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._channel = changes_channel(prefix)
        self._pubsub: redis.client.PubSub | None = None

    def _subscribed(self) -> redis.client.PubSub:
        if self._pubsub is None:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            pubsub.subscribe(self._channel)
            self._pubsub = pubsub
        return self._pubsub

    def wait(self, timeout: float) -> list[str]:
        try:
            pubsub = self._subscribed()
            notices = []
            message = pubsub.get_message(timeout=max(0.0, timeout))
            while message is not None:
                if message.get("type") == "message":
                    data = message["data"]
                    notices.append(data.decode() if isinstance(data, bytes) else str(data))
                message = pubsub.get_message(timeout=0)
            return notices
        except redis.RedisError:
            log.warning("lost the trigger-change channel; reconnecting", exc_info=True)
            self.close()
            time.sleep(min(timeout, 1.0))
            # Notices sent meanwhile are lost: ask for a full reload to catch up.
            return [REFRESH_ALL]

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                self._pubsub.close()
            self._pubsub = None


class LocalSignals:
    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()

    def put(self, notice: str) -> None:
        self._queue.put(notice)

    def wait(self, timeout: float) -> list[str]:
        try:
            notices = [self._queue.get(timeout=max(0.0, timeout)) if timeout > 0 else self._queue.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                notices.append(self._queue.get_nowait())
            except queue.Empty:
                return notices

    def close(self) -> None:
        pass
