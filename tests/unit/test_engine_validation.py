"""Workflow validation of what the engine adds: templates, expressions, step timeouts, jumps."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest

from sluice_common.errors import ConfigError, ValidationFailed
from sluice_common.settings import load_settings
from sluice_common.workflow import validate_workflow


def workflow(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "w", "trigger": {"type": "manual"}, "steps": list(steps)}


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as info:
        validate_workflow(data)
    return {p.path: p.message for p in info.value.problems}


def test_templates_are_checked_at_creation() -> None:
    found = problems(
        workflow(
            {
                "id": "a",
                "type": "http",
                "config": {"url": "https://x/{{ steps.a.body.id", "headers": {"K": "{{ 1 + }}"}},
            },
            {"id": "b", "type": "transform", "config": {"value": {"list": ["ok", "{% for x in y %}{% endfor %}"]}}},
            {"id": "c", "type": "condition", "config": {"if": "trigger.n >"}},
        )
    )
    assert found["$.steps[0].config.url"].startswith("template syntax error")
    assert found["$.steps[0].config.headers.K"].startswith("template syntax error")
    assert found["$.steps[1].config.value.list[1]"].startswith("statements")
    assert found["$.steps[2].config.if"].startswith("expression syntax error")


def test_valid_templates_pass() -> None:
    validate_workflow(
        workflow(
            {
                "id": "a",
                "type": "http",
                "config": {"url": "https://x/{{ trigger.id }}", "headers": {"K": "{{ secrets.K }}"}},
            },
            {"id": "b", "type": "condition", "config": {"if": "{{ steps.a.status == 200 }}", "then": "d"}},
            {"id": "c", "type": "delay", "config": {"until": "{{ trigger.at }}"}},
            {
                "id": "d",
                "type": "workflow",
                "config": {"workflowId": "{{ vars.child }}", "triggerData": {"x": "{{ 1 }}"}},
            },
        )
    )


# Expressions whose value is huge or slow to compute. Validation checks syntax only: compiling them
# with Jinja2's optimizer on folded the constants right there, in the API process (16 s and 4 GB
# for the first one, or a 500 for the others, whose results are too long to print).
COSTLY_EXPRESSIONS = ["10**5000", "(10**100)**50", "'a' * 10**8", "[0] * 10**8", "'a' * 10**9"]


@pytest.mark.parametrize("expression", COSTLY_EXPRESSIONS)
def test_validation_never_evaluates_an_expression(expression: str) -> None:
    tracemalloc.start()
    start = time.monotonic()
    try:
        validate_workflow(
            workflow(
                {"id": "a", "type": "condition", "config": {"if": expression}},
                {"id": "b", "type": "transform", "config": {"value": "{{ " + expression + " }}"}},
                {"id": "c", "type": "transform", "config": {"value": "x{{ " + expression + " }}y"}},
                {"id": "d", "type": "http", "config": {"url": "https://x/{{ " + expression + " }}"}},
            )
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 1.0
    assert peak < 5_000_000  # bytes: what parsing a few short strings takes, nothing of the values


def test_literals_python_cannot_read_are_validation_problems() -> None:
    digits = "1" * 5000  # Python refuses to convert integers of more than 4300 digits
    found = problems(
        workflow(
            {"id": "a", "type": "http", "config": {"url": "https://x", "headers": {"N": "{{ " + digits + " }}"}}},
            {"id": "b", "type": "transform", "config": {"value": "{{ trigger.n > " + digits + " }}"}},
        )
    )
    assert found["$.steps[0].config.headers.N"] == "a number has too many digits"
    assert found["$.steps[1].config.value"] == "a number has too many digits"


def test_http_requests_that_can_never_be_sent_are_refused() -> None:
    found = problems(
        workflow(
            {"id": "a", "type": "http", "config": {"url": "http://[::1"}},
            {"id": "b", "type": "http", "config": {"url": "https://x/a\r\nHost: evil"}},
            {"id": "c", "type": "http", "config": {"url": "https://x/\n"}},
            {"id": "d", "type": "http", "config": {"url": "ftp://x/file"}},
            {"id": "e", "type": "http", "config": {"url": "https://x:99999/"}},
            {
                "id": "f",
                "type": "http",
                "config": {
                    "url": "https://x",
                    "headers": {"X A": "1", "X-B": "1\r\nX-Evil: 1", "X-C": "caf\u00e9", "X-D": " padded"},
                    "idempotencyHeader": "Idempotency Key",
                },
            },
        )
    )
    assert found == {
        "$.steps[0].config.url": "is not a valid URL: Invalid IPv6 URL",
        "$.steps[1].config.url": "must not contain control characters (CR, LF, tab...)",
        "$.steps[2].config.url": "must not contain control characters (CR, LF, tab...)",
        "$.steps[3].config.url": "must be an http:// or https:// URL",
        "$.steps[4].config.url": "is not a valid URL: Port out of range 0-65535",
        "$.steps[5].config.headers['X A']": (
            "'X A' is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
        ),
        "$.steps[5].config.headers['X-B']": "a header value must not contain CR, LF or other control characters",
        "$.steps[5].config.headers['X-C']": "a header value must be ASCII",
        "$.steps[5].config.headers['X-D']": "a header value must not start or end with a space or tab",
        "$.steps[5].config.idempotencyHeader": (
            "'Idempotency Key' is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
        ),
    }
    # Templates are checked once rendered, at run time; ordinary URLs and headers pass.
    validate_workflow(
        workflow(
            {
                "id": "a",
                "type": "http",
                "config": {
                    "url": "{{ trigger.url }}",
                    "headers": {"Authorization": "Bearer {{ secrets.T }}", "X-Empty": "", "X-Tab": "a\tb"},
                    "idempotencyKey": False,
                },
            },
            {"id": "b", "type": "http", "config": {"url": "http://[::1]:8080/x?q=a b", "idempotencyHeader": "X-Op"}},
        )
    )


def test_step_timeouts_on_any_step() -> None:
    validate_workflow(workflow({"id": "a", "type": "transform", "config": {"value": 1, "timeoutSeconds": 2.5}}))
    found = problems(
        workflow(
            {"id": "a", "type": "transform", "config": {"value": 1, "timeoutSeconds": 0}},
            {"id": "b", "type": "fail", "config": {"message": "x", "timeoutSeconds": "soon"}},
            {"id": "c", "type": "http", "config": {"url": "https://x", "timeoutSeconds": 900}},
        )
    )
    assert "more than 0" in found["$.steps[0].config.timeoutSeconds"]
    assert "number of seconds" in found["$.steps[1].config.timeoutSeconds"]
    assert "$.steps[2].config.timeoutSeconds" in found


def test_condition_jumps_go_forward_only() -> None:
    found = problems(
        workflow(
            {"id": "a", "type": "transform", "config": {"value": 1}},
            {"id": "b", "type": "condition", "config": {"if": "true", "then": "a", "else": "b"}},
        )
    )
    assert found["$.steps[1].config.then"] == "step 'a' does not come after this step"
    assert found["$.steps[1].config.else"] == "step 'b' does not come after this step"


def test_delay_and_workflow_literals_are_checked() -> None:
    found = problems(
        workflow(
            {"id": "a", "type": "delay", "config": {"until": "tomorrow"}},
            {"id": "b", "type": "workflow", "config": {"workflowId": "not-an-id"}},
        )
    )
    assert "ISO 8601" in found["$.steps[0].config.until"]
    assert "not a workflow id" in found["$.steps[1].config.workflowId"]


def test_engine_settings() -> None:
    settings = load_settings({})
    assert (settings.step_timeout_seconds, settings.step_output_max_bytes) == (300.0, 262144)
    assert settings.workflow_max_depth == 5
    with pytest.raises(ConfigError, match="SLUICE_SECRET_KEY"):
        load_settings({"SLUICE_SECRET_KEY": "too-short"})
    with pytest.raises(ConfigError, match="SLUICE_STEP_OUTPUT_MAX_BYTES"):
        load_settings({"SLUICE_STEP_OUTPUT_MAX_BYTES": "10"})
