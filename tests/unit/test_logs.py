"""Structured logs: the JSON and text lines, the log context and who keeps it (the run-events observer)."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from sluice_common.logs import (
    JsonFormatter,
    LogContext,
    bind,
    clear,
    configure_logging,
    current_context,
    log_context,
    make_formatter,
    observe_log_context,
    text_suffix,
    unbind,
)
from sluice_common.observe import RunEnded, RunEvents, RunStarted, StepEnded, StepStarted, run_events

LOG = logging.getLogger("sluice.test")


@pytest.fixture(autouse=True)
def empty_context() -> Iterator[None]:
    clear()
    yield
    clear()


def record(message: str = "hello %s", *args: object, level: int = logging.INFO, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    if not args and message == "hello %s":
        args = ("world",)
    return LOG.makeRecord(LOG.name, level, __file__, 1, message, args, exc_info)


def json_line(rec: logging.LogRecord, service: str = "worker") -> dict[str, Any]:
    line = JsonFormatter(service).format(rec)
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


# JSON ------------------------------------------------------------------------------------------


def test_a_json_line_has_the_base_fields() -> None:
    before = datetime.now(UTC)
    line = json_line(record())
    assert line == {
        "time": line["time"],
        "level": "INFO",
        "service": "worker",
        "logger": "sluice.test",
        "message": "hello world",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    at = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= at <= datetime.now(UTC)


def test_a_json_line_carries_the_exception_text() -> None:
    line = json_line(record("failed", level=logging.ERROR, exc=True))
    assert line["level"] == "ERROR"
    assert line["message"] == "failed"
    assert line["exc_info"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom" in line["exc_info"]


def test_a_multi_line_message_stays_one_json_line() -> None:
    line = json_line(record("a\nb\u2028c %s", "é"))
    assert line["message"] == "a\nb\u2028c é"


def test_a_json_line_carries_the_context_fields_that_are_set() -> None:
    with log_context(run_id="r1", workflow_id="w1", attempt=2):
        bind(step_id="fetch")
        line = json_line(record())
    assert {k: line[k] for k in ("run_id", "workflow_id", "attempt", "step_id")} == {
        "run_id": "r1",
        "workflow_id": "w1",
        "attempt": 2,
        "step_id": "fetch",
    }
    assert "request_id" not in line
    assert "trace_id" not in line
    assert "run_id" not in json_line(record())


def test_a_json_line_carries_the_current_spans_ids() -> None:
    tracer = TracerProvider().get_tracer("t")  # a provider of its own, not the global one
    with tracer.start_as_current_span("work") as span:
        line = json_line(record())
        ctx = span.get_span_context()
    assert line["trace_id"] == f"{ctx.trace_id:032x}"
    assert line["span_id"] == f"{ctx.span_id:016x}"
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", line["span_id"])
    assert "trace_id" not in json_line(record())  # no span, no ids


def test_configure_logging_writes_json_lines_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    try:
        configure_logging("INFO", "api", "json")
        with log_context(request_id="abc"):
            LOG.info("one")
            LOG.debug("below the level")
            try:
                raise ValueError("bad")
            except ValueError:
                LOG.exception("two")
    finally:
        root.handlers[:], root.level = saved
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert [(line["message"], line["service"], line["request_id"]) for line in lines] == [
        ("one", "api", "abc"),
        ("two", "api", "abc"),
    ]
    assert "ValueError: bad" in lines[1]["exc_info"]


def test_nothing_is_formatted_below_the_level() -> None:
    class Counting(JsonFormatter):
        calls = 0

        def format(self, record: logging.LogRecord) -> str:
            Counting.calls += 1
            return super().format(record)

    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(Counting("worker"))
    log = logging.getLogger("sluice.test.quiet")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    with log_context(run_id="r1"):
        log.info("not written")
        log.warning("written")
    log.removeHandler(handler)
    assert Counting.calls == 1


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        make_formatter("api", "xml")  # type: ignore[arg-type]


# Text ------------------------------------------------------------------------------------------


def test_the_text_suffix_shows_the_run_compactly() -> None:
    assert text_suffix({}) == ""
    run: dict[str, str | int] = {"run_id": "r1", "workflow_id": "w1", "attempt": 1, "step_id": "a"}
    assert text_suffix(run) == "[run=r1 attempt=1 step=a]"
    assert text_suffix({"workflow_id": "w1"}) == "[workflow=w1]"  # a cron fire before its run exists
    assert text_suffix({"workflow_id": "w1", "run_id": "r1"}) == "[run=r1]"
    assert text_suffix({"request_id": "q1"}) == "[request=q1]"


def test_a_text_line_ends_with_the_context_before_any_traceback() -> None:
    formatter = make_formatter("worker", "text")
    assert formatter.format(record()).endswith("INFO worker sluice.test: hello world")
    with log_context(run_id="r1", attempt=3, step_id="s"):
        text = formatter.format(record("failed", level=logging.ERROR, exc=True))
    first, *rest = text.splitlines()
    assert first.endswith("ERROR worker sluice.test: failed [run=r1 attempt=3 step=s]")
    assert rest[0].startswith("Traceback")


# The context -----------------------------------------------------------------------------------


def test_log_context_puts_the_previous_context_back() -> None:
    bind(request_id="q")
    with log_context(workflow_id="w"):
        bind(run_id="r")
        assert current_context() == {"request_id": "q", "workflow_id": "w", "run_id": "r"}
        with log_context(workflow_id=None):  # None drops a field inside the block
            assert current_context() == {"request_id": "q", "run_id": "r"}
    assert current_context() == {"request_id": "q"}
    unbind("request_id", "absent")
    assert current_context() == {}


def test_reserved_names_are_refused() -> None:
    with pytest.raises(ValueError, match="message"):
        bind(message="x")
    with pytest.raises(ValueError, match="trace_id"), log_context(trace_id="x"):
        pass


def test_each_thread_has_its_own_context() -> None:
    bind(run_id="main")
    seen: list[dict[str, str | int]] = []
    thread = threading.Thread(target=lambda: seen.append(current_context()))
    thread.start()
    thread.join()
    assert seen == [{}]


def test_the_observer_keeps_the_context_of_the_run_and_its_steps() -> None:
    events = RunEvents()
    observer = observe_log_context(events)
    assert isinstance(observer, LogContext)
    assert observe_log_context(events) is observer
    assert events.observers == (observer,)  # added once

    events.started(RunStarted("r1", "w1", "manual", 2, None))
    assert current_context() == {"run_id": "r1", "workflow_id": "w1", "attempt": 2}
    events.step_started(StepStarted("r1", "w1", "a", "transform", 2, 0))
    assert current_context()["step_id"] == "a"
    events.step_ended(StepEnded("r1", "w1", "a", "transform", "succeeded", 0.1, 2))
    assert "step_id" not in current_context()
    events.step_started(StepStarted("r1", "w1", "b", "http", 2, 1))
    events.step_ended(StepEnded("r1", "w1", "b", "http", "failed", 0.1, 2, error="HTTP 503"))
    events.step_started(StepStarted("r1", "w1", "c", "http", 2, 2))
    # The execution broke off mid-step: the end is still told, and empties the context.
    events.ended(RunEnded("r1", "w1", "manual", 2, "crashed", 0.2))
    assert current_context() == {}


def test_failed_steps_and_notable_ends_are_logged_in_their_context() -> None:
    lines: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))  # formatted as it is logged, as a stream is

    keep = Keep(logging.INFO)
    keep.setFormatter(JsonFormatter("worker"))
    logger = logging.getLogger("sluice.runs")
    saved = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    events = RunEvents()
    observe_log_context(events)
    try:
        events.started(RunStarted("r1", "w1", "manual", 1, None))
        events.step_started(StepStarted("r1", "w1", "b", "http", 1, 0))
        events.step_ended(StepEnded("r1", "w1", "b", "http", "failed", 0.1, 1, error="HTTP 503"))
        events.ended(RunEnded("r1", "w1", "manual", 1, "retried", 0.2))
        events.started(RunStarted("r2", "w1", "manual", 1, None))
        events.ended(RunEnded("r2", "w1", "manual", 1, "succeeded", 0.2))  # DEBUG: not at INFO
    finally:
        logger.removeHandler(keep)
        logger.setLevel(saved)
    assert [(line["message"], line.get("step_id"), line["run_id"]) for line in lines] == [
        ("step b (http) failed: HTTP 503", "b", "r1"),
        ("execution ended: retried after 0.200 s", None, "r1"),
    ]


def test_the_process_registry_gets_the_observer_once() -> None:
    before = run_events.observers
    observer = observe_log_context()
    try:
        observe_log_context()
        assert sum(o is observer for o in run_events.observers) == 1
    finally:
        if observer not in before:
            run_events.remove(observer)


def test_gunicorns_own_lines_take_the_process_format() -> None:
    from gunicorn.config import Config

    from sluice_api.__main__ import ProcessLogger

    error_log = logging.getLogger("gunicorn.error")
    saved = error_log.handlers[:], error_log.propagate, error_log.level
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("api"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        cfg = Config()
        cfg.set("logger_class", ProcessLogger)
        gunicorn_log = cfg.logger_class(cfg)
        gunicorn_log.info("Booting worker with pid: %s", 42)
    finally:
        root.removeHandler(handler)
        error_log.handlers[:], error_log.propagate, error_log.level = saved
    [line] = [json.loads(text) for text in out.getvalue().splitlines()]
    assert (line["logger"], line["service"]) == ("gunicorn.error", "api")
    assert line["message"] == "Booting worker with pid: 42"
