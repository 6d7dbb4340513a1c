"""The expression sandbox against hostile and ordinary templates (no network, no database)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from sluice_worker.expressions import SANDBOX, ExpressionError, SecretBag, evaluate, render, render_value

CONTEXT: dict[str, Any] = {
    "trigger": {"n": 3, "name": "Ada", "tags": ["a", "b"]},
    "steps": {"fetch": {"status": 200, "body": {"id": 7, "items": [{"v": 1}, {"v": 2}]}}},
    "run": {"id": "r1", "attempt": 1, "workflowId": "w1", "triggerType": "manual"},
    "vars": {"base": "https://api.example.com"},
    "secrets": SecretBag(lambda: {"TOKEN": "t0k"}),
}


def test_plain_strings_are_returned_untouched() -> None:
    assert render("no template here: { } }} {", CONTEXT) == "no template here: { } }} {"


def test_a_lone_expression_keeps_its_type() -> None:
    assert render("{{ steps.fetch.body }}", CONTEXT) == {"id": 7, "items": [{"v": 1}, {"v": 2}]}
    assert render("{{ trigger.n * 2 }}", CONTEXT) == 6
    assert render(" {{ trigger.n * 2 }}", CONTEXT) == " 6"  # anything around it: a string
    assert render("{{ trigger.tags }}", CONTEXT) == ["a", "b"]
    assert render("{{ steps.fetch.body['items'] | map(attribute='v') | list }}", CONTEXT) == [1, 2]
    assert render("{{ steps.fetch.body['items'] | map(attribute='v') }}", CONTEXT) == [1, 2]  # a generator
    assert render("{{ none }}", CONTEXT) is None
    assert render("{{ trigger.missing | default('x') }}", CONTEXT) == "x"


def test_mixed_templates_render_to_strings() -> None:
    assert render("{{ vars.base }}/items/{{ steps.fetch.body.id }}", CONTEXT) == "https://api.example.com/items/7"
    assert render("{{ trigger.n }}{{ trigger.n }}", CONTEXT) == "33"
    assert render("{{ trigger | tojson }}", CONTEXT) == '{"n": 3, "name": "Ada", "tags": ["a", "b"]}'
    assert render("{{ '{\"a\": 1}' | fromjson }}", CONTEXT) == {"a": 1}


def test_conditions() -> None:
    assert evaluate("steps.fetch.status == 200 and trigger.n < 5", CONTEXT) is True
    assert evaluate("{{ 'b' in trigger.tags }}", CONTEXT) is True
    assert evaluate("trigger.missing is defined", CONTEXT) is False


def test_render_value_walks_objects_and_names_the_failing_field() -> None:
    value = {"a": ["{{ trigger.n }}", {"b": "x{{ run.id }}"}], "c": 5}
    assert render_value(value, CONTEXT, "config") == {"a": [3, {"b": "xr1"}], "c": 5}
    with pytest.raises(ExpressionError) as info:
        render_value({"a": [{"b": "{{ trigger.nope.deeper }}"}]}, CONTEXT, "config")
    assert str(info.value) == "config.a[0].b: 'dict object' has no attribute 'nope'"


HOSTILE = {
    # attribute walking to interpreter internals
    "{{ ''.__class__.__mro__[1].__subclasses__() }}": "not allowed",
    "{{ trigger.__class__ }}": "not allowed",
    "{{ self.__init__.__globals__ }}": "not allowed",
    "{{ run.items.__self__ }}": "not allowed",
    "{{ (trigger.get).__self__ }}": "not allowed",
    "{{ range.__init__.__globals__['os'] }}": "not allowed",
    "{{ lipsum.__globals__['os'].environ }}": "'lipsum' is undefined",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}": "not allowed",
    "{{ namespace.__init__ }}": "not allowed",
    "{{ config.items() }}": "'config' is undefined",
    "{{ request.environ }}": "'request' is undefined",
    "{{ trigger | attr('__class__') }}": "not allowed",
    "{{ [trigger] | map(attribute='__class__') | list }}": "not allowed",
    "{{ trigger.n.__add__ }}": "not allowed",
    "{{ trigger.tags.append(1) }}": "not allowed",
    "{{ trigger.update({'n': 1}) }}": "not allowed",
    "{{ '{0.__class__}'.format(trigger) }}": "not allowed",
    # no modules, no files, no code
    "{% import 'os' as os %}": "statements",
    "{% include '/etc/passwd' %}": "statements",
    "{% extends '/etc/passwd' %}": "statements",
    # no loops, no recursion
    "{% for i in range(10) %}{% for j in range(10) %}x{% endfor %}{% endfor %}": "statements",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}": "statements",
    "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}": "nested too deeply",
    "{{ " + "[" * 3000 + "]" * 3000 + " }}": "nested too deeply",
    # huge values
    "{{ range(10 ** 9) | list }}": "range() is limited",
    "{{ range(100000000) | sum }}": "range() is limited",
    "{{ 'x' * 10 ** 9 }}": "'*' would build",
    "{{ [0] * 10 ** 9 }}": "'*' would build",
    "{{ [range(10000) | list] * 100000 }}": "'*' would build",
    "{{ ('x' * 90000) + ('x' * 90000) }}": "'+' would build",
    "{{ 2 ** (10 ** 8) }}": "'**' result too large",
    "{{ 9 ** 999999 }}": "'**' result too large",
    "{{ '%0999999999d' % 1 }}": "'%' formatting",
    "{{ '%.999999999f' % 1 }}": "'%' formatting",
    "{{ '{:>999999999}'.format(1) }}": "format() with a width",
    "{{ '{:{}}'.format(1, 999999999) }}": "format() with a width",
    "{{ 'x'.ljust(10 ** 9) }}": "str.ljust() is not allowed",
    "{{ 'x'.zfill(10 ** 9) }}": "str.zfill() is not allowed",
    "{{ 'x' | center(10 ** 9) }}": "No filter named 'center'",
    "{{ 'x' | indent(10 ** 9) }}": "No filter named 'indent'",
    "{{ [1] | batch(10 ** 9, 0) | list }}": "No filter named 'batch'",
    "{{ ('a' * 99999) | replace('a', 'bbbb') }}": "replace() would build",
    "{{ ([('x' * 99999)] * 21) | string }}": "would build",
    "{{ ['" + "x" * 100 + "' * 99999, " + ", ".join(["'y' * 99999"] * 30) + "] }}": "would build",
}


@pytest.mark.parametrize(("template", "expected"), list(HOSTILE.items()), ids=lambda t: str(t)[:40])
def test_hostile_templates_fail_fast_with_a_message(template: str, expected: str) -> None:
    start = time.monotonic()
    with pytest.raises(ExpressionError) as info:
        render(template, CONTEXT)
    assert expected in str(info.value)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("'a' * 10**9", "'*' would build"),
        ("[0] * 10**9", "'*' would build"),
        ("10**5000", "'**' result too large"),
        ("(10**100)**50", "'**' result too large"),
        ("trigger.n ** (10**6)", "'**' result too large"),
        ("('ab' * 50000) * trigger.n", "'*' would build"),
    ],
)
def test_costly_conditions_fail_fast_with_a_message(expression: str, expected: str) -> None:
    # The same expressions as conditions (evaluate) and as templates: bounded at run time.
    start = time.monotonic()
    for attempt in (lambda: evaluate(expression, CONTEXT), lambda: render("{{ " + expression + " }}", CONTEXT)):
        with pytest.raises(ExpressionError) as info:
            attempt()
        assert expected in str(info.value)
    assert time.monotonic() - start < 1.0


def test_an_unreadable_literal_is_an_expression_error() -> None:
    for attempt in (lambda: evaluate("1" * 5000, CONTEXT), lambda: render("{{ " + "1" * 5000 + " }}", CONTEXT)):
        with pytest.raises(ExpressionError, match="too many digits"):
            attempt()


def test_nothing_is_computed_while_compiling() -> None:
    # Jinja2 folds constant expressions into the compiled code; the sandbox computes them at run
    # time only, under its checks and deadline.
    source = SANDBOX.compile("{{ 'fold' ~ 'ed' }}{{ 6 * 7 }}{{ [1, 2] | join('-') }}", raw=True)
    assert "folded" not in source
    assert "42" not in source
    assert "1-2" not in source
    assert render("{{ 'fold' ~ 'ed' }}{{ 6 * 7 }}{{ [1, 2] | join('-') }}", CONTEXT) == "folded421-2"
    with pytest.raises(ExpressionError, match="evaluation took longer"):
        render("{{ 'constant' ~ 'text' }}", CONTEXT, seconds=0.0)


def test_a_long_but_harmless_template_is_fine_and_bounded() -> None:
    start = time.monotonic()
    assert len(render("{{ range(10000) | map('string') | join(',') }}", CONTEXT)) == 48889
    assert render("{{ ('ab' * 50000) | length }}", CONTEXT) == 100000
    assert time.monotonic() - start < 1.0


def test_evaluation_has_a_deadline() -> None:
    # Each operation is bounded; the deadline bounds the whole (checked at every call and lookup).
    with pytest.raises(ExpressionError) as info:
        render("{{ range(10000) | map('string') | map('upper') | join }}", CONTEXT, seconds=0.0)
    assert "evaluation took longer than" in str(info.value)


def test_secrets_are_looked_up_lazily_and_remembered() -> None:
    loads = []

    def loader() -> dict[str, str]:
        loads.append(1)
        return {"A": "1"}

    bag = SecretBag(loader)
    context = {**CONTEXT, "secrets": bag}
    assert render("x", context) == "x"
    assert loads == []
    assert render("{{ secrets.A }}-{{ secrets['A'] }}", context) == "1-1"
    assert loads == [1]
    assert bag.used == {"1"}
    with pytest.raises(ExpressionError, match="no secret named 'B'"):
        render("{{ secrets.B }}", context)
    with pytest.raises(ExpressionError, match="not allowed"):
        render("{{ secrets._loader }}", context)
