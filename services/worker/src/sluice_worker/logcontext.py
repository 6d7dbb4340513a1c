"""The worker's log context: :class:`~sluice_common.logs.LogContext` (an observer of the run events)
keeps the context of the run a thread executes; :class:`ClearLogContext` (a Dramatiq middleware)
empties it around every message, so nothing one message bound reaches the next on the same thread.
:func:`install_log_context` sets both up for a worker."""

from __future__ import annotations

from typing import Any

import dramatiq

from sluice_common.logs import clear, observe_log_context
from sluice_common.observe import RunEvents


class ClearLogContext(dramatiq.Middleware):
    """Empties the log context of the worker thread before and after each message (also a skipped
    one): Dramatiq reuses its threads, and a context variable set on one lives on in the thread."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        clear()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        clear()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        clear()


def install_log_context(broker: dramatiq.Broker, events: RunEvents) -> None:
    """Keep the log context of runs told to ``events`` and clear it between ``broker``'s messages
    (each once, however often it is called). Always on: binding costs a small dict per run and step."""
    observe_log_context(events)
    if not any(isinstance(m, ClearLogContext) for m in broker.middleware):
        broker.add_middleware(ClearLogContext())
