"""The worker's log context does not outlive a message: two messages on one reused Dramatiq thread."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from sluice_common.logs import JsonFormatter, bind, current_context
from sluice_common.observe import RunEvents
from sluice_worker.logcontext import ClearLogContext, install_log_context

LOG = logging.getLogger("sluice.test.worker")


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("worker"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    yield out
    LOG.removeHandler(handler)
    LOG.setLevel(logging.NOTSET)


def run_two_messages(broker: StubBroker) -> None:
    """The first message binds a run and breaks off (no run end to clear it); the second logs."""

    def handle(name: str) -> None:
        if name == "first":
            bind(run_id="r-first", workflow_id="w-first", step_id="s")
            LOG.info("first")
            raise RuntimeError("broke off")
        LOG.info("second")

    actor = dramatiq.Actor(
        handle, broker=broker, actor_name="handle", queue_name="runs", priority=0, options={"max_retries": 0}
    )
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=10)  # one thread: the same for both
    worker.start()
    try:
        actor.send("first")
        broker.join("runs", fail_fast=False)
        actor.send("second")
        broker.join("runs", fail_fast=False)
        worker.join()
    finally:
        worker.stop()


def logged(out: io.StringIO) -> dict[str, dict[str, Any]]:
    return {line["message"]: line for line in map(json.loads, out.getvalue().splitlines())}


def test_nothing_of_one_message_reaches_the_next_on_the_same_thread(lines: io.StringIO) -> None:
    broker = StubBroker()
    install_log_context(broker, RunEvents())
    run_two_messages(broker)
    got = logged(lines)
    assert got["first"]["run_id"] == "r-first"
    assert got["first"]["step_id"] == "s"
    assert "run_id" not in got["second"]
    assert "workflow_id" not in got["second"]
    assert "step_id" not in got["second"]


def test_without_the_middleware_the_context_would_leak(lines: io.StringIO) -> None:
    # The case the middleware is for: a context variable set on a worker thread lives on in it.
    broker = StubBroker()
    run_two_messages(broker)
    assert logged(lines)["second"]["run_id"] == "r-first"


def test_the_middleware_clears_around_every_message_and_skip() -> None:
    middleware, broker = ClearLogContext(), StubBroker()
    hooks: list[Callable[[], None]] = [
        lambda: middleware.before_process_message(broker, None),
        lambda: middleware.after_process_message(broker, None, exception=RuntimeError()),
        lambda: middleware.after_skip_message(broker, None),
    ]
    for hook in hooks:
        bind(run_id="r")
        hook()
        assert current_context() == {}


def test_installing_twice_adds_each_part_once() -> None:
    broker, events = StubBroker(), RunEvents()
    install_log_context(broker, events)
    install_log_context(broker, events)
    assert sum(isinstance(m, ClearLogContext) for m in broker.middleware) == 1
    assert len(events.observers) == 1
