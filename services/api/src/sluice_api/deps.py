"""What the API is built from: passed in by ``get_app`` (gunicorn) or the standalone process."""

from __future__ import annotations

from dataclasses import dataclass

import dramatiq
import redis

from sluice_common.broker import WakeupSender
from sluice_common.db import Pool
from sluice_common.groupcommit import GroupCommit
from sluice_common.ratelimit import RateLimiter
from sluice_common.runs import EnqueuedRun, NewRun
from sluice_common.schedulerlink import SchedulerLink
from sluice_common.settings import Settings


@dataclass(frozen=True)
class Dependencies:
    settings: Settings
    pool: Pool
    redis: redis.Redis | None  # None in standalone mode
    broker: dramatiq.Broker  # where run wake-ups are sent
    limiter: RateLimiter  # the global run-start limit (read for the queue stats)
    scheduler: SchedulerLink | None = None
    # Sends wake-ups in batches off the request thread; None sends each one inline.
    sender: WakeupSender | None = None
    # Inserts the runs that requests ask for at once in one statement; None inserts each alone.
    inserts: GroupCommit[NewRun, EnqueuedRun] | None = None
