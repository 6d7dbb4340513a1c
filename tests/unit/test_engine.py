"""The engine's step loop and each step type, with an in-memory checkpoint store.

HTTP steps against a real server are in tests/integration/test_engine_http.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel

from sluice_common.errors import ValidationFailed
from sluice_common.steps import StepCall, StepPlugin
from sluice_common.workflow import step_plugins, step_types, validate_workflow
from sluice_worker.engine import ChildState, Outcome, RunContext, Runtime, execute


class MemoryStore:
    def __init__(self, done: dict[str, Any] | None = None) -> None:
        self.done = dict(done or {})
        self.log: list[tuple[str, str]] = []
        self.started: list[str] = []
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

    def starting(self, step_id: str, position: int) -> None:
        self.started.append(step_id)

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
    assert store.started == ["a", "b"]


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


# Step types ---------------------------------------------------------------------------------


def run_steps(
    steps: list[dict[str, Any]],
    store: MemoryStore | None = None,
    *,
    trigger: Any = None,
    runtime: Runtime | None = None,
    secrets: dict[str, str] | None = None,
    variables: dict[str, Any] | None = None,
) -> tuple[Outcome, MemoryStore]:
    store = store or MemoryStore()
    context = RunContext(
        "run-1",
        "wf-1",
        1,
        "manual",
        trigger if trigger is not None else {},
        steps,
        time.monotonic() + 10,
        variables=variables or {},
        owner_id="owner-1",
        secrets=(lambda: dict(secrets)) if secrets is not None else None,
    )
    with httpx.Client() as client:
        outcome = execute(context, store, runtime or Runtime(client))
    return outcome, store


def test_transform_builds_values_from_the_run_context() -> None:
    steps = [
        {
            "id": "a",
            "type": "transform",
            "config": {"value": {"n": "{{ trigger.n }}", "list": [1, "{{ trigger.n * 2 }}"]}},
        },
        {
            "id": "b",
            "type": "transform",
            "config": {
                "value": {
                    "sum": "{{ steps.a.list | sum }}",
                    "text": "run {{ run.id }} attempt {{ run.attempt }} of {{ run.workflowId }}",
                    "greeting": "{{ vars.greeting ~ ', ' ~ trigger.name }}",
                    "whole": "{{ steps.a }}",
                }
            },
        },
        {"id": "c", "type": "transform", "config": {"value": "{{ steps.b.sum > 5 }}"}},
    ]
    outcome, store = run_steps(steps, trigger={"n": 3, "name": "Ada"}, variables={"greeting": "Hello"})
    assert outcome.status == "succeeded", outcome.error
    assert store.done["a"] == {"n": 3, "list": [1, 6]}  # a lone {{ expr }} keeps its type
    assert store.done["b"] == {
        "sum": 7,
        "text": "run run-1 attempt 1 of wf-1",
        "greeting": "Hello, Ada",
        "whole": {"n": 3, "list": [1, 6]},
    }
    assert store.done["c"] is True


def test_an_expression_error_names_the_step_and_the_field() -> None:
    steps = [{"id": "shape", "type": "transform", "config": {"value": {"x": ["{{ steps.nope.body }}"]}}}]
    outcome, store = run_steps(steps)
    assert (outcome.status, outcome.final) == ("failed", True)
    assert outcome.error == "step 'shape': config.value.x[0]: 'dict object' has no attribute 'nope'"
    assert store.log == [("failed", "shape")]


def condition_steps(if_: str, then: str | None, else_: str | None) -> list[dict[str, Any]]:
    config: dict[str, Any] = {"if": if_}
    if then:
        config["then"] = then
    if else_:
        config["else"] = else_
    return [
        {"id": "check", "type": "condition", "config": config},
        {"id": "small", "type": "transform", "config": {"value": "small"}},
        {"id": "big", "type": "transform", "config": {"value": "big"}},
    ]


def test_condition_continues_at_then_or_else() -> None:
    outcome, store = run_steps(condition_steps("trigger.n > 10", "big", None), trigger={"n": 50})
    assert outcome.status == "succeeded"
    assert store.log == [("ok", "check"), ("ok", "big")]
    assert store.done["check"] == {"result": True, "next": "big"}
    # No `else`: a false condition goes on with the next step.
    outcome, store = run_steps(condition_steps("trigger.n > 10", "big", None), trigger={"n": 1})
    assert store.log == [("ok", "check"), ("ok", "small"), ("ok", "big")]


def test_condition_stop_ends_the_run_with_a_recorded_reason() -> None:
    steps = condition_steps("{{ trigger.ok }}", None, "stop")
    steps[0]["config"]["reason"] = "nothing to do for {{ trigger.who }}"
    outcome, store = run_steps(steps, trigger={"ok": False, "who": "Bo"})
    assert outcome.status == "succeeded"
    assert store.log == [("ok", "check")]
    assert store.done["check"] == {"result": False, "next": "stop", "reason": "nothing to do for Bo"}


def test_resuming_replays_the_recorded_path_of_a_condition() -> None:
    # The condition chose `big` when it ran; on resume its recorded choice is followed, so
    # `small` is not run even though the trigger would now say otherwise.
    store = MemoryStore(done={"check": {"result": True, "next": "big"}})
    outcome, store = run_steps(condition_steps("trigger.n > 10", "big", None), store, trigger={"n": 1})
    assert outcome.status == "succeeded"
    assert store.log == [("ok", "big")]


def test_a_bad_condition_fails_with_the_field() -> None:
    outcome, _ = run_steps(condition_steps("trigger.n.__class__", None, None), trigger={"n": 1})
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith("step 'check': config.if: not allowed")


def test_delay_parks_the_run_and_completes_when_resumed_after_its_time() -> None:
    steps = [
        {"id": "wait", "type": "delay", "config": {"seconds": 0.3}},
        {"id": "after", "type": "transform", "config": {"value": 1}},
    ]
    before = datetime.now(UTC)
    outcome, store = run_steps(steps)
    assert outcome.status == "parked"
    assert outcome.resume_at is not None
    assert outcome.resume_at >= before + timedelta(seconds=0.3)
    assert store.log == [("parked", "wait")]
    # Woken early (a spare wake-up): it parks again for the time left, no new deadline.
    outcome2, store = run_steps(steps, store)
    assert (outcome2.status, outcome2.resume_at) == ("parked", outcome.resume_at)
    time.sleep(0.35)
    outcome3, store = run_steps(steps, store)
    assert outcome3.status == "succeeded"
    assert store.done["wait"] == {"waitedUntil": outcome.resume_at.isoformat()}
    assert store.log[-2:] == [("ok", "wait"), ("ok", "after")]


def test_delay_until_a_past_time_does_not_wait() -> None:
    outcome, store = run_steps(
        [{"id": "w", "type": "delay", "config": {"until": "{{ trigger.at }}"}}], trigger={"at": "2001-01-01T00:00:00Z"}
    )
    assert outcome.status == "succeeded"
    assert store.done["w"] == {"waitedUntil": "2001-01-01T00:00:00+00:00"}


class MemorySubRuns:
    """Child runs held in memory: the engine's side of the workflow step, without the database."""

    def __init__(self) -> None:
        self.started: list[tuple[str, Any]] = []
        self.states: dict[str, ChildState] = {}

    def start(self, ctx: RunContext, step_id: str, workflow_id: str, trigger_data: Any) -> str:
        run_id = f"child-{len(self.started) + 1}"
        self.started.append((workflow_id, trigger_data))
        self.states[run_id] = ChildState(run_id, "queued")
        return run_id

    def state(self, run_id: str) -> ChildState:
        return self.states[run_id]


WF_ID = "0b0c3a3e-1a2b-4c5d-8e9f-0a1b2c3d4e5f"


def test_workflow_step_waits_without_a_thread_and_uses_the_child_result() -> None:
    subruns = MemorySubRuns()
    steps = [
        {"id": "sub", "type": "workflow", "config": {"workflowId": WF_ID, "triggerData": {"n": "{{ trigger.n }}"}}},
        {"id": "use", "type": "transform", "config": {"value": "{{ steps.sub.output.doubled }}"}},
    ]
    with httpx.Client() as client:
        runtime = Runtime(client, subruns=subruns)
        outcome, store = run_steps(steps, trigger={"n": 4}, runtime=runtime)
        assert (outcome.status, outcome.waiting_for) == ("parked", "child-1")
        assert subruns.started == [(WF_ID, {"n": 4})]
        subruns.states["child-1"] = ChildState("child-1", "succeeded", None, {"doubled": 8})
        outcome, store = run_steps(steps, store, trigger={"n": 4}, runtime=runtime)
    assert outcome.status == "succeeded"
    assert store.done["sub"] == {"runId": "child-1", "status": "succeeded", "output": {"doubled": 8}}
    assert store.done["use"] == 8
    assert len(subruns.started) == 1


def test_a_failed_child_fails_the_workflow_step() -> None:
    subruns = MemorySubRuns()
    steps = [{"id": "sub", "type": "workflow", "config": {"workflowId": WF_ID}}]
    with httpx.Client() as client:
        runtime = Runtime(client, subruns=subruns)
        _, store = run_steps(steps, runtime=runtime)
        subruns.states["child-1"] = ChildState("child-1", "failed", "step 'x': boom")
        outcome, store = run_steps(steps, store, runtime=runtime)
    assert outcome.status == "failed"
    assert outcome.error == "step 'sub': sub-workflow run child-1 failed: step 'x': boom"


def test_fire_and_forget_workflow_step() -> None:
    subruns = MemorySubRuns()
    steps = [{"id": "sub", "type": "workflow", "config": {"workflowId": WF_ID, "wait": False}}]
    with httpx.Client() as client:
        outcome, store = run_steps(steps, runtime=Runtime(client, subruns=subruns))
    assert outcome.status == "succeeded"
    assert store.done["sub"] == {"runId": "child-1", "status": "started"}


def test_fail_step_message_is_a_template() -> None:
    outcome, _ = run_steps(
        [{"id": "g", "type": "fail", "config": {"message": "missing {{ trigger.field }}"}}], trigger={"field": "email"}
    )
    assert (outcome.status, outcome.final, outcome.error) == ("failed", True, "step 'g': missing email")


def test_large_outputs_are_truncated_with_a_marker() -> None:
    steps = [
        {"id": "big", "type": "transform", "config": {"value": "{{ 'x' * 50000 }}"}},
        {"id": "after", "type": "transform", "config": {"value": "{{ steps.big.truncated }}"}},
    ]
    with httpx.Client() as client:
        outcome, store = run_steps(steps, runtime=Runtime(client, output_max_bytes=4096))
    assert outcome.status == "succeeded"
    assert store.done["big"]["truncated"] is True
    assert store.done["big"]["bytes"] == 50002
    assert len(store.done["big"]["preview"]) == 1024
    assert store.done["after"] is True


def test_secrets_resolve_in_templates_and_are_masked_in_outputs_and_errors() -> None:
    steps = [
        {"id": "a", "type": "transform", "config": {"value": {"auth": "Bearer {{ secrets.API_KEY }}", "n": 1}}},
        {"id": "b", "type": "fail", "config": {"message": "key was {{ secrets.API_KEY }}"}},
    ]
    outcome, store = run_steps(steps, secrets={"API_KEY": "sk-live-123"})
    assert store.done["a"] == {"auth": "Bearer ***", "n": 1}
    assert outcome.error == "step 'b': key was ***"
    outcome, _ = run_steps([{"id": "c", "type": "transform", "config": {"value": "{{ secrets.MISSING }}"}}], secrets={})
    assert outcome.error == "step 'c': config.value: no secret named 'MISSING'"


def test_unknown_step_type_fails_clearly() -> None:
    outcome, _ = run_steps([{"id": "x", "type": "teleport", "config": {}}])
    assert outcome.final
    assert outcome.error == "step 'x': unknown step type 'teleport' (is its package installed?)"


# Custom step types through the `sluice.steps` entry points ----------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "sluice-step-hash"


@pytest.fixture
def hash_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example plugin, installed the way a package is: its source and an entry point."""
    dist = tmp_path / "sluice_step_hash-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sluice-step-hash\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[sluice.steps]\nhash = sluice_step_hash:PLUGIN\n")
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path))
    step_plugins.cache_clear()
    yield
    step_plugins.cache_clear()


@pytest.mark.usefixtures("hash_plugin")
def test_a_plugin_step_is_validated_at_creation_and_runs_in_the_worker() -> None:
    good = {
        "name": "p",
        "trigger": {"type": "manual"},
        "steps": [{"id": "h", "type": "hash", "config": {"text": "{{ trigger.t }}", "timeoutSeconds": 5}}],
    }
    assert "hash" in step_types()
    validate_workflow(good)
    bad = {**good, "steps": [{"id": "h", "type": "hash", "config": {"text": "x", "algorithm": "md5"}}]}
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(bad)
    assert [p.path for p in info.value.problems] == ["$.steps[0].config.algorithm"]
    outcome, store = run_steps(good["steps"], trigger={"t": "abc"})
    assert outcome.status == "succeeded", outcome.error
    assert store.done["h"] == {
        "algorithm": "sha256",
        "hex": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
    outcome, _ = run_steps([{"id": "h", "type": "hash", "config": {"text": "a", "key": ""}}])
    assert (outcome.error, outcome.final) == ("step 'h': key is empty", True)


def test_without_the_plugin_the_step_type_is_unknown() -> None:
    step_plugins.cache_clear()
    assert "hash" not in step_types()


def test_a_slow_plugin_step_fails_at_its_time_limit() -> None:
    def slow(config: Any, call: StepCall) -> Any:
        time.sleep(0.3)
        return call.timeout

    class NoConfig(BaseModel):
        pass

    plugins = {"slow": StepPlugin(NoConfig, slow)}
    with httpx.Client() as client:
        runtime = Runtime(client, plugins=lambda: plugins)
        outcome, _ = run_steps([{"id": "s", "type": "slow", "config": {"timeoutSeconds": 0.1}}], runtime=runtime)
        assert outcome.error == "step 's': took longer than its 0.1s time limit"
        outcome, store = run_steps([{"id": "s", "type": "slow", "config": {}}], runtime=runtime)
    # With no timeoutSeconds the default (300 s) is bounded by the run's time left (10 s).
    assert 9 < store.done["s"] <= 10


def test_a_stored_backward_jump_fails_instead_of_looping() -> None:
    # Validation refuses it; a definition written around validation must still not loop.
    steps = [
        {"id": "a", "type": "transform", "config": {"value": 1}},
        {"id": "back", "type": "condition", "config": {"if": "true", "then": "a"}},
    ]
    outcome, _ = run_steps(steps)
    assert (outcome.status, outcome.final) == ("failed", True)
    assert outcome.error == "step 'back': config.then: no later step 'a'"
