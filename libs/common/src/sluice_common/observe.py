"""The run-events seam: what happens to runs, told to whoever observes it (metrics, traces, log context).

The producer (``enqueue_run``), the cancelling calls and the worker's executor call a
:class:`RunEvents` at the moments that matter: a run is created, an execution starts (the
claim), a step starts, a step ends, an execution ends, a run is cancelled without a worker, a
wake-up is held back by the rate limit. Within one execution the worker tells these on the
thread that runs it, in order, and always tells the end (``crashed`` when the execution broke
off), so an observer may keep per-thread state (a current span, a log context)
from ``run_started`` to ``run_ended``. Observers implement :class:`RunObserver` (subclass
:class:`BaseRunObserver` to pick only some events). Business code never knows what an observer
does, and an observer that raises never breaks a run: its error is logged once and ignored.

:data:`run_events` is the process's registry; a service's entry point adds its observers to it.
Nothing is observed until one does, so tests and processes that do not turn metrics on pay one
empty loop per event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunCreated:
    run_id: str
    workflow_id: str
    trigger_type: str


@dataclass(frozen=True)
class RunStarted:
    """An execution (attempt) of a run began: the worker claimed it."""

    run_id: str
    workflow_id: str
    trigger_type: str
    attempt: int
    queue_wait_seconds: float | None  # from becoming ready to being claimed (None: unknown)
    traceparent: str | None = None  # the run's W3C trace context, the same for all its attempts


@dataclass(frozen=True)
class StepStarted:
    run_id: str
    workflow_id: str
    step_id: str
    step_type: str
    attempt: int
    position: int


@dataclass(frozen=True)
class StepEnded:
    run_id: str
    workflow_id: str
    step_id: str
    step_type: str
    status: str  # succeeded, failed, parked
    duration_seconds: float
    attempt: int = 0
    error: str | None = None  # why a failed step failed (secrets masked)


@dataclass(frozen=True)
class RunEnded:
    """An execution ended. ``outcome``: succeeded, failed, cancelled (the run is over), retried (a
    failed attempt with another to come), parked (a delay or sub-workflow), handed_back (shutdown),
    lost (another execution took the run over), crashed (the execution broke off before its end was
    recorded: its lease lapses and recovery takes the run over)."""

    run_id: str
    workflow_id: str
    trigger_type: str
    attempt: int
    outcome: str
    duration_seconds: float


@dataclass(frozen=True)
class RunCancelled:
    """A run was cancelled before or between its executions (through the API, or with its parent
    or its workflow): it ended without a worker, so no ``RunEnded`` tells it."""

    run_id: str
    workflow_id: str
    trigger_type: str


class RunObserver(Protocol):
    def run_created(self, event: RunCreated) -> None: ...

    def run_started(self, event: RunStarted) -> None: ...

    def step_started(self, event: StepStarted) -> None: ...

    def step_ended(self, event: StepEnded) -> None: ...

    def run_ended(self, event: RunEnded) -> None: ...

    def run_cancelled(self, event: RunCancelled) -> None: ...

    def rate_limited(self, wait_ms: int) -> None: ...


class BaseRunObserver:
    """Ignores every event; subclass it and override what you observe."""

    def run_created(self, event: RunCreated) -> None:
        return None

    def run_started(self, event: RunStarted) -> None:
        return None

    def step_started(self, event: StepStarted) -> None:
        return None

    def step_ended(self, event: StepEnded) -> None:
        return None

    def run_ended(self, event: RunEnded) -> None:
        return None

    def run_cancelled(self, event: RunCancelled) -> None:
        return None

    def rate_limited(self, wait_ms: int) -> None:
        return None


class RunEvents:
    """The observers of one process (or one test), notified in the order they were added; the ends
    of a step and of an execution in the reverse order, so that scopes unwind as they nest (the
    log line of a failed step is written while its span is still the current one)."""

    def __init__(self) -> None:
        self._observers: tuple[RunObserver, ...] = ()
        self._lock = threading.Lock()
        self._failed: set[tuple[int, str]] = set()

    def add(self, observer: RunObserver) -> None:
        with self._lock:
            self._observers = (*self._observers, observer)

    def remove(self, observer: RunObserver) -> None:
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    @property
    def observers(self) -> tuple[RunObserver, ...]:
        return self._observers

    def _each(self, name: str, call: Callable[[RunObserver], None], *, unwinding: bool = False) -> None:
        observers = self._observers  # a tuple swapped whole: no lock on the hot path
        for observer in reversed(observers) if unwinding else observers:
            try:
                call(observer)
            except Exception:
                key = (id(observer), name)
                if key not in self._failed:  # once per observer and event: no log flood per run
                    self._failed.add(key)
                    log.exception("run observer %r failed on %s; its errors are ignored", observer, name)

    def created(self, event: RunCreated) -> None:
        self._each("run_created", lambda o: o.run_created(event))

    def started(self, event: RunStarted) -> None:
        self._each("run_started", lambda o: o.run_started(event))

    def step_started(self, event: StepStarted) -> None:
        self._each("step_started", lambda o: o.step_started(event))

    def step_ended(self, event: StepEnded) -> None:
        self._each("step_ended", lambda o: o.step_ended(event), unwinding=True)

    def ended(self, event: RunEnded) -> None:
        self._each("run_ended", lambda o: o.run_ended(event), unwinding=True)

    def cancelled(self, event: RunCancelled) -> None:
        self._each("run_cancelled", lambda o: o.run_cancelled(event))

    def rate_limited(self, wait_ms: int) -> None:
        self._each("rate_limited", lambda o: o.rate_limited(wait_ms))


# The process's registry: services add their observers at start-up (see sluice_common.metrics).
run_events = RunEvents()
