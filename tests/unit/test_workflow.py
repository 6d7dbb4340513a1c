from datetime import UTC, datetime
from typing import Any

import pytest

from sluice_common.errors import ValidationFailed, json_path
from sluice_common.workflow import ConditionConfig, CronTrigger, cron_iter, validate_workflow


def workflow(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "Nightly report",
        "trigger": {"type": "cron", "config": {"schedule": "*/5 * * * *", "timezone": "Europe/Paris"}},
        "steps": [
            {"id": "fetch", "type": "http", "config": {"url": "https://example.com/data"}},
            {
                "id": "check",
                "type": "condition",
                "config": {"if": "steps.fetch.status == 200", "else": "stop"},
            },
            {"id": "shape", "type": "transform", "config": {"value": {"n": 1}}},
        ],
    }
    base.update(overrides)
    return base


def paths(exc: ValidationFailed) -> dict[str, str]:
    return {p.path: p.message for p in exc.problems}


def test_a_valid_workflow_parses_with_defaults() -> None:
    wf = validate_workflow(workflow())
    assert wf.name == "Nightly report"
    assert wf.status == "active"
    assert isinstance(wf.trigger, CronTrigger)
    assert wf.trigger.config.timezone == "Europe/Paris"
    assert wf.trigger.config.missed == "skip"
    assert [s.id for s in wf.steps] == ["fetch", "check", "shape"]
    assert wf.settings.timeout_seconds == 3600


def test_camel_case_in_and_out() -> None:
    wf = validate_workflow(workflow(settings={"maxAttempts": 5, "timeoutSeconds": 60}))
    assert wf.settings.max_attempts == 5
    dumped = wf.model_dump(by_alias=True, exclude_none=True)
    assert dumped["settings"]["maxAttempts"] == 5
    assert dumped["trigger"]["config"]["missedGraceSeconds"] == 3600


def test_only_camel_case_names_are_accepted() -> None:
    snake = workflow(
        trigger={"type": "cron", "config": {"schedule": "* * * * *", "missed_grace_seconds": 5}},
        steps=[
            {"id": "a", "type": "http", "config": {"url": "https://x", "accept_status": [200]}},
            {"id": "b", "type": "workflow", "config": {"workflowId": "{{ vars.w }}", "trigger_data": {}}},
        ],
        settings={"max_attempts": 2},
    )
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(snake)
    assert paths(info.value) == {
        "$.trigger.config.missed_grace_seconds": "Extra inputs are not permitted",
        "$.steps[0].config.accept_status": "Extra inputs are not permitted",
        "$.steps[1].config.trigger_data": "Extra inputs are not permitted",
        "$.settings.max_attempts": "Extra inputs are not permitted",
    }


def test_every_problem_is_reported_with_its_path() -> None:
    bad = {
        "name": "",
        "trigger": {"type": "cron", "config": {"schedule": "61 * * * *", "timezone": "Mars/Olympus"}},
        "steps": [
            {"id": "a", "type": "http", "config": {"url": "https://x", "timeoutSeconds": -1}},
            {"id": "a", "type": "teleport", "config": {}},
            {"id": "9bad id", "type": "fail", "config": {}},
        ],
        "status": "sleeping",
        "colour": "blue",
    }
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(bad)
    found = paths(info.value)
    assert "$.name" in found
    assert "not a valid cron expression" in found["$.trigger.config.schedule"]
    assert "IANA" in found["$.trigger.config.timezone"]
    assert "$.steps[0].config.timeoutSeconds" in found
    assert "duplicate step id 'a'" in found["$.steps[1].id"]
    assert "unknown step type 'teleport'" in found["$.steps[1].type"]
    assert "$.steps[2].id" in found
    assert "$.steps[2].config.message" in found
    assert "$.status" in found
    assert "$.colour" in found
    assert len(info.value.problems) >= 10


@pytest.mark.parametrize(
    ("schedule", "ok"),
    [
        ("*/5 * * * *", True),
        ("0 9 * * mon-fri", True),
        ("0 0 * * sun", True),
        ("*/2 * * * * *", True),  # seconds first
        ("* * * *", False),
        ("* * * * * * *", False),
        ("60 * * * *", False),
        ("not a cron", False),
    ],
)
def test_cron_schedules(schedule: str, ok: bool) -> None:
    data = workflow(trigger={"type": "cron", "config": {"schedule": schedule}})
    if ok:
        assert validate_workflow(data).trigger.type == "cron"
    else:
        with pytest.raises(ValidationFailed) as info:
            validate_workflow(data)
        assert "$.trigger.config.schedule" in paths(info.value)


def test_six_field_schedules_put_seconds_first() -> None:
    it = cron_iter("*/15 * * * * *", datetime(2026, 1, 1, tzinfo=UTC))
    assert [it.get_next(datetime).second for _ in range(3)] == [15, 30, 45]


def test_sunday_schedules_fire_on_sunday() -> None:
    it = cron_iter("0 0 * * sun", datetime(2026, 11, 23, tzinfo=UTC))  # a Monday
    assert it.get_next(datetime).weekday() == 6


def test_manual_and_webhook_triggers_take_no_config() -> None:
    assert validate_workflow(workflow(trigger={"type": "manual"})).trigger.type == "manual"
    assert validate_workflow(workflow(trigger={"type": "webhook", "config": {}})).trigger.type == "webhook"
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow(trigger={"type": "webhook", "config": {"secret": "x"}}))
    assert "$.trigger.config.secret" in paths(info.value)


def test_unknown_trigger_type() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow(trigger={"type": "email"}))
    assert "$.trigger" in paths(info.value)


def test_condition_targets_must_exist() -> None:
    steps = [
        {"id": "c", "type": "condition", "config": {"if": "true", "then": "missing", "else": "stop"}},
        {"id": "d", "type": "fail", "config": {"message": "no"}},
    ]
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow(steps=steps))
    assert "no step with id 'missing'" in paths(info.value)["$.steps[0].config.then"]
    steps[0]["config"]["then"] = "d"
    assert validate_workflow(workflow(steps=steps)).steps[0].id == "c"
    assert ConditionConfig.model_validate(steps[0]["config"]).then == "d"


def test_step_config_rules() -> None:
    steps = [
        {"id": "h", "type": "http", "config": {"url": "https://x", "json": {}, "body": "b"}},
        {"id": "w", "type": "delay", "config": {}},
        {"id": "s", "type": "workflow", "config": {}},
    ]
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow(steps=steps))
    found = paths(info.value)
    assert "at most one of json, body, form" in found["$.steps[0].config"]
    assert "exactly one of seconds or until" in found["$.steps[1].config"]
    assert "$.steps[2].config.workflowId" in found


def test_steps_must_be_a_non_empty_list() -> None:
    for steps in ([], "nope", None):
        with pytest.raises(ValidationFailed) as info:
            validate_workflow(workflow(steps=steps))
        assert "$.steps" in paths(info.value)


def test_not_an_object_at_all() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(["a list"])
    assert "$" in paths(info.value)


def test_backoff_bounds_in_order() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(workflow(settings={"backoffMinMs": 500, "backoffMaxMs": 100}))
    assert "backoffMinMs must not exceed backoffMaxMs" in paths(info.value)["$.settings"]


def test_json_path_rendering() -> None:
    assert json_path(("steps", 0, "config", "url")) == "$.steps[0].config.url"
    assert json_path(("headers", "X-Api-Key")) == "$.headers['X-Api-Key']"
    assert json_path(()) == "$"
