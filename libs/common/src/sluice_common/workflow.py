"""The workflow model and its validation.

A workflow is ``{name, description?, trigger: {type, config}, steps: [{id, type, config}], status,
settings?}`` in camelCase JSON. :func:`validate_workflow` checks a whole definition and reports
every problem with its JSON path (``$.steps[1].config.url``), not only the first one.

Step configs are validated here, not in the worker, because the API must reject a bad
definition at creation time without importing worker code. Each step's type is looked up in the
step registry (:mod:`sluice_common.steps`) that :func:`step_registry` builds: the built-in types
of :data:`BUILTIN_STEP_TYPES` (their config models are below), then the plugins of the
``sluice.steps`` entry points, both through the same ``StepRegistry.register``.

Strings in step configs may be templates over the run context (``{{ steps.fetch.body.id }}``).
Their syntax is checked here with Jinja2's parser only: parsing runs nothing, and nothing is
compiled (Jinja2's compiler computes constant expressions as it goes, so compiling
``'a' * 10**9`` here would build it in the API, outside any bound). They are evaluated only in
the worker's sandbox (``sluice_worker.expressions``), which bounds what an expression may cost.
Templates are expressions only: the statement tags (``{% for %}``, ``{% macro %}``...) are
refused, so no definition can loop or recurse.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import zoneinfo
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from uuid import UUID

import jinja2
from croniter import croniter
from jinja2 import nodes
from jinja2.parser import Parser
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from sluice_common.errors import FieldProblem, ValidationFailed, field_problems, json_path
from sluice_common.steps import (
    BRANCH_IF,
    BRANCH_TARGETS,
    PLUGIN_GROUP,
    STOP,
    TYPE_NAME,
    StepRegistry,
    StepType,
)

# Plugins written before the registry import these from here.
from sluice_common.steps import StepCall as StepCall
from sluice_common.steps import StepError as StepError
from sluice_common.steps import StepPlugin as StepPlugin

log = logging.getLogger(__name__)

STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
MAX_STEPS = 200
MAX_TEMPLATE_CHARS = 16_384
MAX_STEP_TIMEOUT_SECONDS = 7 * 86400


class _Model(BaseModel):
    """Strict camelCase model: unknown fields and wrong JSON types are errors (no ``0`` for
    ``false``, no ``"5"`` for ``5``), so typos never pass silently.

    Input is read by the camelCase names only (:func:`validate_workflow` passes ``by_name=False``):
    ``max_attempts`` is as unknown as any other misspelling. The Python names stay valid elsewhere
    (``populate_by_name``) for definitions stored before that rule, which the worker still reads.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
    )


# Triggers -------------------------------------------------------------------------------------


def parse_cron(schedule: str) -> tuple[str, bool]:
    """Return ``(normalised expression, has_seconds)`` or raise ``ValueError`` saying what is wrong.

    Five fields are minute-first; six fields put seconds first.
    """
    fields = schedule.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"a cron schedule has 5 fields (minute hour day month weekday) or 6 with seconds first; got {len(fields)}"
        )
    has_seconds = len(fields) == 6
    normalised = " ".join(fields)
    if not croniter.is_valid(normalised, second_at_beginning=has_seconds):
        raise ValueError(f"{schedule!r} is not a valid cron expression")
    return normalised, has_seconds


def cron_iter(schedule: str, start: datetime) -> croniter:
    """A croniter over ``schedule`` (5 or 6 fields, seconds first) from the aware ``start``."""
    normalised, has_seconds = parse_cron(schedule)
    return croniter(normalised, start, second_at_beginning=has_seconds)


class CronConfig(_Model):
    schedule: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    missed: Literal["skip", "run_once", "all"] = "skip"
    missed_grace_seconds: Annotated[int, Field(ge=0, le=7 * 86400)] = 3600
    overlap: Literal["allow", "skip", "queue_one"] = "allow"

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        return parse_cron(value)[0]

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (for example Europe/Paris)") from None
        return value


class EmptyConfig(_Model):
    pass


class ManualTrigger(_Model):
    type: Literal["manual"]
    config: EmptyConfig = EmptyConfig()


class WebhookTrigger(_Model):
    type: Literal["webhook"]
    config: EmptyConfig = EmptyConfig()


class CronTrigger(_Model):
    type: Literal["cron"]
    config: CronConfig


Trigger = Annotated[ManualTrigger | CronTrigger | WebhookTrigger, Field(discriminator="type")]


# Steps ----------------------------------------------------------------------------------------


# What HTTP allows in a request (RFC 9110 5.1, 5.5): a header name is a token; a value is visible
# ASCII with inner spaces and tabs (httpx sends values as ASCII; h11 refuses the rest, CR and LF
# above all, which would split the request).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
IDEMPOTENCY_HEADER = "Idempotency-Key"


def url_problem(url: str) -> str | None:
    """Why an ``http`` step can never request ``url``, or None (checked again when it is sent)."""
    if _CONTROL.search(url):
        return "must not contain control characters (CR, LF, tab...)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    return None


def header_name_problem(name: str) -> str | None:
    if not _TOKEN.fullmatch(name):
        return f"{name[:100]!r} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    return None


def header_value_problem(value: str) -> str | None:
    if _CONTROL.search(value.replace("\t", "")):
        return "a header value must not contain CR, LF or other control characters"
    if not value.isascii():
        return "a header value must be ASCII"
    if not _FIELD_VALUE.fullmatch(value):
        return "a header value must not start or end with a space or tab"
    return None


def _refuse(problem: Callable[[str], str | None], *, skip_templates: bool) -> AfterValidator:
    """A validator from a ``*_problem`` function. A template is checked once rendered: the worker
    validates the rendered config with the same model."""

    def check(value: str) -> str:
        found = None if skip_templates and is_template(value) else problem(value)
        if found:
            raise ValueError(found)
        return value

    return AfterValidator(check)


HeaderName = Annotated[str, _refuse(header_name_problem, skip_templates=False)]
HeaderValue = Annotated[str, _refuse(header_value_problem, skip_templates=True)]


class HttpConfig(_Model):
    # A template such as "{{ trigger.id }}" keeps its type; where a string is expected, a number is fine.
    model_config = ConfigDict(coerce_numbers_to_str=True)

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    url: Annotated[str, Field(min_length=1, max_length=8192), _refuse(url_problem, skip_templates=True)]
    query: dict[str, str] = {}
    # Header names are never rendered: they are checked as they are. Values may be templates.
    headers: dict[HeaderName, HeaderValue] = {}
    # The same key for every execution of this step in this run (see docs/engine.md).
    idempotency_key: bool = True
    idempotency_header: HeaderName = IDEMPOTENCY_HEADER
    json_body: Annotated[Any, Field(alias="json")] = None
    body: str | None = None
    form: dict[str, str] | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    accept_status: list[Annotated[int, Field(ge=100, le=599)]] | None = None
    max_redirects: Annotated[int, Field(ge=0, le=20)] = 5

    @model_validator(mode="after")
    def _one_body(self) -> HttpConfig:
        given = [n for n, v in (("json", self.json_body), ("body", self.body), ("form", self.form)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json, body, form (got {', '.join(given)})")
        return self


class TransformConfig(_Model):
    value: Any


class ConditionConfig(_Model):
    # A template such as "{{ trigger.id }}" keeps its type; where a string is expected, a number is fine.
    model_config = ConfigDict(coerce_numbers_to_str=True)

    expression: Annotated[str, Field(alias="if", min_length=1, max_length=4096)]
    then: str | None = None
    else_: Annotated[str | None, Field(alias="else")] = None
    reason: Annotated[str | None, Field(max_length=1000)] = None


class DelayConfig(_Model):
    seconds: Annotated[float | None, Field(gt=0, le=366 * 86400)] = None
    until: Annotated[str | None, Field(max_length=MAX_TEMPLATE_CHARS)] = None  # ISO 8601, or a template

    @field_validator("until")
    @classmethod
    def _check_until(cls, value: str | None) -> str | None:
        if value is not None and not is_template(value):
            parse_time(value)
        return value

    @model_validator(mode="after")
    def _one_of(self) -> DelayConfig:
        if (self.seconds is None) == (self.until is None):
            raise ValueError("give exactly one of seconds or until")
        return self


def parse_time(value: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC. Raises ``ValueError`` saying what is wrong."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time such as 2030-01-31T08:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class WorkflowStepConfig(_Model):
    workflow_id: Annotated[str, Field(min_length=1, max_length=MAX_TEMPLATE_CHARS)]  # a workflow id, or a template
    trigger_data: Any = None
    wait: bool = True

    @field_validator("workflow_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not is_template(value):
            try:
                UUID(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a workflow id") from None
        return value


class FailConfig(_Model):
    # A template such as "{{ trigger.id }}" keeps its type; where a string is expected, a number is fine.
    model_config = ConfigDict(coerce_numbers_to_str=True)

    message: Annotated[str, Field(min_length=1, max_length=2000)]


BUILTIN_STEP_TYPES: tuple[StepType, ...] = (
    StepType("http", HttpConfig, description="an HTTP request; its output is the response"),
    StepType("transform", TransformConfig, description="a value built from templates"),
    StepType("condition", ConditionConfig, branches=True, description="go on at then/else, or stop the run"),
    StepType("delay", DelayConfig, description="wait for some time, or until a time"),
    StepType("workflow", WorkflowStepConfig, description="run another workflow, waiting for it or not"),
    StepType("fail", FailConfig, description="fail the run with a message"),
)
"""The built-in step types; their run functions are attached in the worker (``sluice_worker.steps``)."""

_BUILTIN_NAMES = frozenset(t.name for t in BUILTIN_STEP_TYPES)


# Plugins and the registry ---------------------------------------------------------------------


@functools.cache
def step_plugins() -> dict[str, StepPlugin]:
    """Step types from the ``sluice.steps`` entry points, loaded once per process.

    A plugin that fails to load, is not a :class:`StepPlugin`, or reuses a built-in name is
    skipped with a warning: one broken package must not stop the API or the workers.
    """
    found: dict[str, StepPlugin] = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name in _BUILTIN_NAMES or not TYPE_NAME.fullmatch(ep.name):
            log.warning("step type %r from %s ignored: the name is built in or invalid", ep.name, ep.value)
            continue
        try:
            plugin = ep.load()
        except Exception:
            log.warning("step type %r could not be loaded from %s", ep.name, ep.value, exc_info=True)
            continue
        if not isinstance(plugin, StepPlugin):
            log.warning("step type %r: %s is not a sluice_common.steps.StepPlugin", ep.name, ep.value)
            continue
        found[ep.name] = plugin
    return found


_last_registry: tuple[Mapping[str, StepPlugin], StepRegistry] | None = None


def step_registry(plugins: Mapping[str, StepPlugin] | None = None) -> StepRegistry:
    """The registry of the built-in step types, then ``plugins`` (default: :func:`step_plugins`).

    Built once for each set of plugins (once per process, outside tests) and reused: the worker
    looks every step's type up in it.
    """
    global _last_registry
    if plugins is None:
        plugins = step_plugins()
    last = _last_registry
    if last is not None and last[0] is plugins:
        return last[1]
    registry = StepRegistry(BUILTIN_STEP_TYPES)
    for name, plugin in plugins.items():
        try:
            registry.register(plugin.step_type(name))
        except ValueError as exc:  # step_plugins() skips these; plugins given directly may not
            log.warning("step type %r ignored: %s", name, exc)
    _last_registry = (plugins, registry)
    return registry


def step_types() -> dict[str, type[BaseModel]]:
    """Config model of every step type this process knows: built-in ones and plugins."""
    return step_registry().models()


# Templates ------------------------------------------------------------------------------------

# Parsing only: nothing here is ever compiled or evaluated (the worker evaluates in its sandbox).
# Jinja2's compiler folds constant expressions while it compiles (``'a' * 10**9`` would be
# computed right there, outside any bound), so validation stops at the parse tree; the optimizer
# is off as well, in case anything compiles with this environment. Same delimiters as the worker.
_PARSER = jinja2.Environment(autoescape=False, optimized=False)  # noqa: S701 - JSON values, never HTML
_STATEMENT_HELP = "statements ({% ... %}) are not supported in templates; use expressions in {{ ... }}"


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def _literal_problem(exc: ValueError) -> str:
    """The parser's ``ValueError``: a literal Python cannot convert (integers of more than 4300
    digits are refused by Python itself)."""
    return "a number has too many digits" if "digits" in str(exc) else f"a literal cannot be read: {exc}"


def template_problem(text: str) -> str | None:
    """Why ``text`` is not a valid template, or None. Only ``{{ expression }}`` parts are allowed."""
    if len(text) > MAX_TEMPLATE_CHARS:
        return f"a template is at most {MAX_TEMPLATE_CHARS} characters"
    try:
        tree = _PARSER.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"template syntax error: {exc.message}"
    except RecursionError:
        return "the template is nested too deeply"
    except ValueError as exc:
        return _literal_problem(exc)
    if not all(isinstance(node, nodes.Output) for node in tree.body):
        return _STATEMENT_HELP
    return None


def parse_expression(text: str) -> nodes.Expr:
    """The parse tree of one expression (what ``Environment.compile_expression`` parses, without
    compiling it). Raises ``jinja2.TemplateSyntaxError``, or ``ValueError``/``RecursionError``."""
    parser = Parser(_PARSER, text, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        raise jinja2.TemplateSyntaxError("chunk after expression", parser.stream.current.lineno)
    return expr


def expression_problem(text: str) -> str | None:
    """Why ``text`` is not a valid expression (as in a condition's ``if``), or None."""
    if len(text) > MAX_TEMPLATE_CHARS:
        return f"an expression is at most {MAX_TEMPLATE_CHARS} characters"
    if "{%" in text or "{#" in text:
        return _STATEMENT_HELP
    try:
        parse_expression(unwrap_expression(text))
    except jinja2.TemplateSyntaxError as exc:
        return f"expression syntax error: {exc.message}"
    except RecursionError:
        return "the expression is nested too deeply"
    except ValueError as exc:
        return _literal_problem(exc)
    return None


def unwrap_expression(text: str) -> str:
    """A condition may be written ``a == 1`` or ``{{ a == 1 }}``; both mean the expression."""
    stripped = text.strip()
    if stripped.startswith("{{") and stripped.endswith("}}") and stripped.count("{{") == 1:
        return stripped[2:-2]
    return stripped


def _template_problems(value: Any, path: str, out: list[FieldProblem]) -> None:
    if isinstance(value, str):
        if is_template(value):
            problem = template_problem(value)
            if problem:
                out.append(FieldProblem(path, problem))
    elif isinstance(value, dict):
        for key, item in value.items():
            _template_problems(item, json_path((str(key),), path), out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _template_problems(item, f"{path}[{index}]", out)


def step_timeout_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "must be a number of seconds"
    if not 0 < value <= MAX_STEP_TIMEOUT_SECONDS:
        return f"must be more than 0 and at most {MAX_STEP_TIMEOUT_SECONDS} seconds"
    return None


def split_step_timeout(model: type[BaseModel], config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """``timeoutSeconds`` is allowed on every step; models that do not declare it never see it."""
    if "timeoutSeconds" in config and "timeout_seconds" not in model.model_fields:
        rest = dict(config)
        return rest, rest.pop("timeoutSeconds")
    return config, config.get("timeoutSeconds")


class Step(_Model):
    id: Annotated[str, Field(pattern=STEP_ID_PATTERN)]
    type: Annotated[str, Field(min_length=1, max_length=64)]
    config: dict[str, Any] = {}


# Workflow -------------------------------------------------------------------------------------


class WorkflowSettings(_Model):
    max_attempts: Annotated[int | None, Field(ge=1, le=100)] = None
    timeout_seconds: Annotated[int, Field(ge=1, le=7 * 86400)] = 3600
    backoff_min_ms: Annotated[int | None, Field(ge=0, le=86_400_000)] = None
    backoff_max_ms: Annotated[int | None, Field(ge=0, le=86_400_000)] = None
    variables: dict[str, Any] = {}

    @model_validator(mode="after")
    def _backoff_order(self) -> WorkflowSettings:
        low, high = self.backoff_min_ms, self.backoff_max_ms
        if low is not None and high is not None and low > high:
            raise ValueError("backoffMinMs must not exceed backoffMaxMs")
        return self


class WorkflowDefinition(_Model):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str | None, Field(max_length=5000)] = None
    trigger: Trigger
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)]
    status: Literal["active", "paused"] = "active"
    settings: WorkflowSettings = WorkflowSettings()


# Validation -----------------------------------------------------------------------------------


# Discriminated unions add the tag ("cron") to an error's location; users never wrote it.
_TRIGGER_TAGS = ("manual", "cron", "webhook")


def _check_steps(raw_steps: Any, registry: StepRegistry) -> list[FieldProblem]:
    """Checks pydantic cannot express: each config against its type, unique ids, jump targets."""
    if not isinstance(raw_steps, list):
        return []
    problems: list[FieldProblem] = []
    seen: dict[str, int] = {}
    ids = {s["id"] for s in raw_steps if isinstance(s, dict) and isinstance(s.get("id"), str)}
    positions: dict[Any, int] = {}
    for index, step in enumerate(raw_steps):
        if isinstance(step, dict) and isinstance(step.get("id"), str):
            positions.setdefault(step["id"], index)
    for index, step in enumerate(raw_steps):
        if not isinstance(step, dict):
            continue
        base = f"$.steps[{index}]"
        step_id = step.get("id")
        if isinstance(step_id, str):
            if step_id in seen:
                problems.append(
                    FieldProblem(f"{base}.id", f"duplicate step id {step_id!r} (also steps[{seen[step_id]}])")
                )
            else:
                seen[step_id] = index
        type_name = step.get("type")
        if not isinstance(type_name, str):
            continue
        step_type = registry.get(type_name)
        if step_type is None:
            names = ", ".join(registry.names())
            problems.append(FieldProblem(f"{base}.type", f"unknown step type {type_name!r}; known: {names}"))
            continue
        raw_config = step.get("config", {})
        if not isinstance(raw_config, dict):
            problems.append(FieldProblem(f"{base}.config", "must be an object"))
            continue
        model = step_type.config_model
        raw_config, timeout = split_step_timeout(model, raw_config)
        if timeout is not None:
            problem = step_timeout_problem(timeout)
            if problem:
                problems.append(FieldProblem(f"{base}.config.timeoutSeconds", problem))
        try:
            config = model.model_validate(raw_config, by_name=False)
        except ValidationError as exc:
            problems.extend(field_problems(exc, f"{base}.config"))
            continue
        if not step_type.branches:
            _template_problems(raw_config, f"{base}.config", problems)
            continue
        # The validated values, by their JSON names: `if`, `then`, `else`.
        branch = config.model_dump(by_alias=True)
        problem = expression_problem(str(branch[BRANCH_IF]))
        if problem:
            problems.append(FieldProblem(f"{base}.config.{BRANCH_IF}", problem))
        rest = {k: v for k, v in raw_config.items() if k != BRANCH_IF}
        _template_problems(rest, f"{base}.config", problems)
        for name in BRANCH_TARGETS:
            target = branch.get(name)
            if target is None or target == STOP:
                continue
            if target not in ids:
                problems.append(
                    FieldProblem(f"{base}.config.{name}", f"no step with id {target!r} (use a step id or {STOP!r})")
                )
            elif positions.get(target, -1) <= index:
                # Forward jumps only: a run cannot loop, and resuming replays one path.
                problems.append(FieldProblem(f"{base}.config.{name}", f"step {target!r} does not come after this step"))
    return problems


def validate_workflow(data: Any, *, registry: StepRegistry | None = None) -> WorkflowDefinition:
    """Validate a workflow definition; raise :class:`ValidationFailed` with every problem.

    Step types are those of ``registry`` (default: :func:`step_registry`, built-in types and plugins).
    """
    known = step_registry() if registry is None else registry
    problems: list[FieldProblem] = []
    definition: WorkflowDefinition | None = None
    try:
        definition = WorkflowDefinition.model_validate(data, by_name=False)
    except ValidationError as exc:
        problems.extend(field_problems(exc, tags=_TRIGGER_TAGS))
    if isinstance(data, dict):
        problems.extend(_check_steps(data.get("steps"), known))
    if problems:
        raise ValidationFailed(problems)
    assert definition is not None
    return definition
