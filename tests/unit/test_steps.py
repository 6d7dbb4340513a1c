"""The step registry: built-in types and plugins are registered, validated and run the same way."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from sluice_common.errors import ValidationFailed
from sluice_common.steps import StepCall, StepPlugin, StepRegistry, StepType
from sluice_common.workflow import BUILTIN_STEP_TYPES, step_registry, validate_workflow
from sluice_worker.engine import Runtime
from sluice_worker.steps import BUILTIN_RUNS, StepRunners, default_runners, step_runners
from sluice_worker.steps.base import StepInput
from tests.unit.test_engine import run_steps

BUILTIN = ["http", "transform", "condition", "delay", "workflow", "fail"]


class ShoutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: Annotated[str, Field(min_length=1)]


def shout(step: StepInput) -> Any:
    config: ShoutConfig = step.config
    return config.text.upper() + "!"


class SkipConfig(BaseModel):
    # A branching type's config: `if`, and `then`/`else` naming later steps.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    expression: Annotated[str, Field(alias="if")]
    then: str | None = None
    else_: Annotated[str | None, Field(alias="else")] = None


def skip_to_then(step: StepInput) -> Any:
    config: SkipConfig = step.config
    return {"next": config.then}


def workflow(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "w", "trigger": {"type": "manual"}, "steps": list(steps)}


def plugin_run(config: Any, call: StepCall) -> Any:
    return "plugged"


def test_built_in_types_and_plugins_are_registered_and_attached_through_the_same_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered: list[str] = []
    attached: list[str] = []
    register, attach = StepRegistry.register, StepRunners.attach

    def recording_register(self: StepRegistry, step_type: StepType) -> StepType:
        registered.append(step_type.name)
        return register(self, step_type)

    def recording_attach(self: StepRunners, name: str, run: Any) -> Any:
        attached.append(name)
        return attach(self, name, run)

    monkeypatch.setattr(StepRegistry, "register", recording_register)
    monkeypatch.setattr(StepRunners, "attach", recording_attach)
    plugins = {"plugged": StepPlugin(ShoutConfig, plugin_run)}
    runners = step_runners(step_registry(plugins), plugins)
    assert registered == [*BUILTIN, "plugged"]
    assert attached == [*BUILTIN, "plugged"]
    assert runners.without_run() == []
    assert [t.name for t in BUILTIN_STEP_TYPES] == list(BUILTIN_RUNS) == BUILTIN


def test_every_registered_built_in_type_has_a_run_function() -> None:
    runners = default_runners({})
    assert runners.without_run() == []
    assert sorted(r.type.name for r in runners) == sorted(BUILTIN)
    assert [r.type.name for r in runners if r.type.branches] == ["condition"]


def test_a_registry_refuses_a_taken_or_invalid_name() -> None:
    registry = StepRegistry(BUILTIN_STEP_TYPES)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(StepType("http", ShoutConfig))
    with pytest.raises(ValueError, match="not a step type name"):
        registry.register(StepType("Shout!", ShoutConfig))
    with pytest.raises(ValueError, match="not registered"):
        StepRunners(registry).attach("shout", shout)


def test_a_type_registered_like_the_built_in_ones_validates_at_creation_and_runs_in_the_engine() -> None:
    registry = StepRegistry(BUILTIN_STEP_TYPES)
    step = {"id": "s", "type": "shout", "config": {"text": "{{ trigger.who }}"}}
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow(step), registry=registry)
    assert [p.path for p in info.value.problems] == ["$.steps[0].type"]

    registry.register(StepType("shout", ShoutConfig))
    validate_workflow(workflow(step), registry=registry)
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow({**step, "config": {"text": "", "loud": True}}), registry=registry)
    assert sorted(p.path for p in info.value.problems) == ["$.steps[0].config.loud", "$.steps[0].config.text"]

    runners = step_runners(registry, {})
    runners.attach("shout", shout)
    with httpx.Client() as client:
        outcome, store = run_steps([step], trigger={"who": "ada"}, runtime=Runtime(client, steps=runners))
    assert outcome.status == "succeeded", outcome.error
    assert store.done == {"s": "ADA!"}


def test_a_branching_type_gets_jump_checks_and_decides_the_walk() -> None:
    registry = StepRegistry(BUILTIN_STEP_TYPES)
    registry.register(StepType("skip", SkipConfig, branches=True))
    steps = [
        {"id": "a", "type": "transform", "config": {"value": 1}},
        {"id": "jump", "type": "skip", "config": {"if": "true", "then": "c"}},
        {"id": "b", "type": "transform", "config": {"value": 2}},
        {"id": "c", "type": "transform", "config": {"value": 3}},
    ]
    validate_workflow(workflow(*steps), registry=registry)
    backward = {"id": "jump", "type": "skip", "config": {"if": "1 +", "then": "a"}}
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow(steps[0], backward), registry=registry)
    assert sorted(p.path for p in info.value.problems) == ["$.steps[1].config.if", "$.steps[1].config.then"]

    runners = step_runners(registry, {})
    runners.attach("skip", skip_to_then)
    with httpx.Client() as client:
        outcome, store = run_steps(steps, runtime=Runtime(client, steps=runners))
    assert outcome.status == "succeeded", outcome.error
    assert store.done == {"a": 1, "jump": {"next": "c"}, "c": 3}


def test_a_plugin_reusing_a_built_in_name_is_ignored_not_fatal() -> None:
    plugins = {"http": StepPlugin(ShoutConfig, plugin_run), "plugged": StepPlugin(ShoutConfig, plugin_run)}
    runners = step_runners(step_registry(plugins), plugins)
    http = runners.get("http")
    assert http is not None
    assert http.type.config_model is not ShoutConfig
    assert http.run is BUILTIN_RUNS["http"]
    assert runners.get("plugged") is not None
