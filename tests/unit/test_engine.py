"""The engine's step loop with an in-memory checkpoint store and real step types."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

import httpx

from sluice_worker.engine import RunContext, execute


class MemoryStore:
    def __init__(self, done: dict[str, Any] | None = None) -> None:
        self.done = dict(done or {})
        self.log: list[tuple[str, str]] = []
        self.interrupt: Literal["cancelled", "shutdown"] | None = None
        self.parked_steps: dict[str, Any] = {}

    def completed(self) -> dict[str, Any]:
        return self.done

    def waiting(self) -> dict[str, Any]:
        return self.parked_steps

    def parked(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        self.parked_steps[step_id] = output
        self.log.append(("parked", step_id))

    def succeeded(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        self.done[step_id] = output
        self.log.append(("ok", step_id))

    def failed(self, step_id: str, position: int, error: str, started_at: datetime) -> None:
        self.log.append(("failed", step_id))

    def interruption(self) -> Literal["cancelled", "shutdown"] | None:
        return self.interrupt


def ctx(steps: list[dict[str, Any]], seconds: float = 10) -> RunContext:
    return RunContext("r", "w", 1, "manual", {}, steps, time.monotonic() + seconds)


STEPS = [
    {"id": "a", "type": "transform", "config": {"value": 1}},
    {"id": "b", "type": "transform", "config": {"value": [2]}},
]


def test_runs_steps_in_order_and_records_outputs() -> None:
    store = MemoryStore()
    with httpx.Client() as client:
        assert execute(ctx(STEPS), store, client).status == "succeeded"
    assert store.done == {"a": 1, "b": [2]}
    assert store.log == [("ok", "a"), ("ok", "b")]


def test_resumes_after_the_last_checkpoint() -> None:
    store = MemoryStore(done={"a": 1})
    with httpx.Client() as client:
        assert execute(ctx(STEPS), store, client).status == "succeeded"
    assert store.log == [("ok", "b")]


def test_fail_step_is_final_and_stops_the_run() -> None:
    steps = [{"id": "guard", "type": "fail", "config": {"message": "missing input"}}, *STEPS]
    store = MemoryStore()
    with httpx.Client() as client:
        outcome = execute(ctx(steps), store, client)
    assert (outcome.status, outcome.final) == ("failed", True)
    assert outcome.error is not None
    assert "missing input" in outcome.error
    assert store.log == [("failed", "guard")]


def test_cancel_and_shutdown_stop_at_a_step_boundary() -> None:
    for interrupt, status in (("cancelled", "cancelled"), ("shutdown", "handed_back")):
        store = MemoryStore()
        store.interrupt = interrupt  # type: ignore[assignment]
        with httpx.Client() as client:
            assert execute(ctx(STEPS), store, client).status == status
        assert store.log == []


def test_deadline_passed_fails_before_the_next_step() -> None:
    store = MemoryStore()
    with httpx.Client() as client:
        outcome = execute(ctx(STEPS, seconds=-1), store, client)
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert "time limit" in outcome.error
    assert not outcome.final
