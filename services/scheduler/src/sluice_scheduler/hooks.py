"""The scheduler's events seam: who leads, what each cron slot came to, slots missed.

:class:`~sluice_scheduler.scheduler.CronScheduler` tells a :class:`SchedulerEvents` when this
replica starts or stops leading, when a slot is handled (its outcome and how late it was), and
when slots were missed while no scheduler ran. Observers (metrics now, tracing later) implement
:class:`SchedulerObserver`; one that raises is logged once and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class SchedulerObserver(Protocol):
    def leadership(self, leading: bool) -> None: ...

    def slot_handled(self, workflow_id: str, outcome: str, lateness_seconds: float) -> None: ...

    def slots_missed(self, workflow_id: str, count: int) -> None: ...


class SchedulerEvents:
    def __init__(self, *observers: SchedulerObserver) -> None:
        self._observers = tuple(observers)
        self._failed: set[tuple[int, str]] = set()

    def add(self, observer: SchedulerObserver) -> None:
        self._observers = (*self._observers, observer)

    def _each(self, name: str, call: Callable[[SchedulerObserver], None]) -> None:
        for observer in self._observers:
            try:
                call(observer)
            except Exception:
                if (id(observer), name) not in self._failed:
                    self._failed.add((id(observer), name))
                    log.exception("scheduler observer %r failed on %s; its errors are ignored", observer, name)

    def leadership(self, leading: bool) -> None:
        self._each("leadership", lambda o: o.leadership(leading))

    def slot_handled(self, workflow_id: str, outcome: str, lateness_seconds: float) -> None:
        self._each("slot_handled", lambda o: o.slot_handled(workflow_id, outcome, lateness_seconds))

    def slots_missed(self, workflow_id: str, count: int) -> None:
        self._each("slots_missed", lambda o: o.slots_missed(workflow_id, count))
