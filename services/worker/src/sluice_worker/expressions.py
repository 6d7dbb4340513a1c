"""The expression sandbox: templates and conditions in step configs, evaluated over the run context.

Why Jinja2's ``ImmutableSandboxedEnvironment``: it is maintained by the Pallets project, widely
deployed for untrusted templates, and its sandbox is the part of Jinja that gets security
review: attribute access is checked (no ``__class__``, ``__globals__``, ``mro``, function
internals), no built-in or module is reachable, and the immutable variant forbids mutating
lists and dicts. Its ``{{ ... }}`` syntax is what workflow authors already know. ``eval`` or an
AST-walking interpreter of our own would be easier to get wrong.

On top of the sandbox Sluice bounds every evaluation, so a hostile definition cannot spin or
exhaust memory:

- nothing is computed while a template is compiled: Jinja2's constant folding (its optimizer,
  and its rendering of constant output at compile time) is off, so ``'a' * 10**9`` meets the
  checks below at run time instead of being built by the compiler, unbounded;
- only expressions: statement tags (loops, macros, ``set``) are refused when a workflow is
  validated and again here, so nothing can loop or recurse;
- ``range`` is capped at :data:`MAX_RANGE` items, ``*``, ``+``, ``**`` and ``%`` are checked
  before they run (sequence and string results at most :data:`MAX_SIZE`, small exponents, no
  huge widths in ``%`` or ``str.format``), padding methods such as ``ljust`` are refused;
- a filter allow-list (no ``center``, ``indent``, ``wordwrap``, ``batch``, ``slice``,
  ``format``, ``random``...: filters whose cost an argument can blow up);
- every call, attribute and item access checks a deadline (:data:`EVAL_SECONDS`);
- results longer than :data:`MAX_OUTPUT` characters are errors, and a too-deep template fails
  with a clear message (Python's ``RecursionError`` is caught).

A string that is exactly one ``{{ expression }}`` keeps the expression's type (object, list,
number, bool); any other template renders to a string. Compiled templates are cached per
process, so rendering a known template costs microseconds.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jinja2
from jinja2 import StrictUndefined, Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sluice_common.errors import StepFailure
from sluice_common.workflow import expression_problem, is_template, template_problem, unwrap_expression

MAX_RANGE = 10_000
MAX_SIZE = 100_000  # items of a list or characters of a string built by an operator
MAX_OUTPUT = 1_000_000  # characters of one rendered template
MAX_WEIGHT = 2_000_000  # elements plus characters of any value a literal or operator builds
MAX_POWER_BITS = 4_096
EVAL_SECONDS = 2.0
CACHE_SIZE = 4_096

_SAFE_FILTERS = {
    "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "first", "float", "groupby", "int",
    "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr",
    "reverse", "round", "select", "selectattr", "sort", "string", "striptags", "sum", "title", "tojson",
    "trim", "truncate", "unique", "upper", "urlencode", "wordcount",
}  # fmt: skip
_PADDING_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}
_WIDE_PERCENT = re.compile(r"%[-#0 +]*(?:\*|\d{4,})|%[-#0 +]*\d*\.(?:\*|\d{4,})")
_WIDE_FORMAT = re.compile(r"\{[^{}]*:[^{}]*(?:\d{4,}|\{)")


class ExpressionError(StepFailure):
    """An expression or template could not be evaluated; the message says why."""


_local = threading.local()


def _check_deadline() -> None:
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise ExpressionError(f"evaluation took longer than {EVAL_SECONDS:g}s")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 0


def _safe_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise ExpressionError(f"range() is limited to {MAX_RANGE} items")
    return rng


def _replace(value: Any, old: str, new: str, count: int | None = None) -> str:
    text = str(value)
    if old and len(new) > len(old):
        grows = (text.count(old) if count is None else min(count, text.count(old))) * (len(new) - len(old))
        if len(text) + grows > MAX_SIZE:
            raise ExpressionError(f"replace() would build more than {MAX_SIZE} characters")
    elif not old and len(new) * (len(text) + 1) > MAX_SIZE:
        raise ExpressionError(f"replace() would build more than {MAX_SIZE} characters")
    return text.replace(old, new) if count is None else text.replace(old, new, count)


def _fromjson(value: Any) -> Any:
    try:
        return json.loads(str(value))
    except ValueError as exc:
        raise ExpressionError(f"fromjson: {exc}") from None


def _weight(value: Any, budget: int = MAX_WEIGHT) -> int:
    """Size of ``value`` as ``str()`` or JSON would expand it (shared references count each time).

    Stops counting once past ``budget``, so checking a huge value costs no more than the budget.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item) + 1
        elif isinstance(item, list | tuple | set | frozenset):
            total += 1
            stack.extend(item)
        elif isinstance(item, dict):
            total += 1
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, range):
            total += len(item)
        else:
            total += 1
        if total > budget:
            return total
    return total


def _bounded(value: Any, what: str) -> Any:
    if _weight(value) > MAX_WEIGHT:
        raise ExpressionError(f"{what} would build a value larger than {MAX_WEIGHT} items")
    return value


class _BoundedCodeGenerator(CodeGenerator):
    """Routes literals and ``~`` through size checks: a template of a few kilobytes could
    otherwise build a huge value from many references to one large value.

    It also computes nothing while compiling. Jinja2 turns the constant parts of an output
    (``{{ 'a' ~ 'b' }}``) into text at compile time, outside the deadline and the checks above;
    here every expression is left to run time, inside them (the environment's optimizer, which
    folds constants the same way, is off too).
    """

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        if isinstance(node, nodes.TemplateData):  # the text around expressions: no evaluation
            return super()._output_child_to_const(node, frame, finalize)
        raise nodes.Impossible

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.sluice_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.sluice_bounded(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        self.write("environment.sluice_bounded(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.sluice_bounded(")
        super().visit_Dict(node, frame)
        self.write(")")


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with bounded evaluation (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})
    code_generator_class = _BoundedCodeGenerator

    @staticmethod
    def sluice_bounded(value: Any) -> Any:
        _check_deadline()
        return _bounded(value, "a literal")

    @staticmethod
    def sluice_concat(parts: tuple[Any, ...]) -> str:
        _check_deadline()
        _bounded(parts, "'~'")
        return "".join(map(str, parts))

    def __init__(self) -> None:
        super().__init__(
            undefined=StrictUndefined, autoescape=False, cache_size=0, finalize=self._finalize, optimized=False
        )
        self.globals = {"range": _safe_range, "dict": dict}
        filters = {name: FILTERS[name] for name in _SAFE_FILTERS}
        filters["replace"] = _replace
        filters["fromjson"] = _fromjson
        self.filters = filters

    @staticmethod
    def _finalize(value: Any) -> Any:
        return _bounded(value, "an output")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    _size(seq)
                    and isinstance(times, int)
                    and times > 0
                    and (_size(seq) * times > MAX_SIZE or _weight(seq) * times > MAX_WEIGHT)
                ):
                    raise ExpressionError(f"'*' would build more than {MAX_SIZE} items")
        elif operator == "+":
            if _size(left) + _size(right) > MAX_SIZE or _weight((left, right)) > MAX_WEIGHT:
                raise ExpressionError(f"'+' would build more than {MAX_SIZE} items")
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and abs(left) > 1
            and right * abs(left).bit_length() > MAX_POWER_BITS
        ):
            raise ExpressionError("'**' result too large")
        elif operator == "%" and isinstance(left, str) and _WIDE_PERCENT.search(left):
            raise ExpressionError("'%' formatting with a width or precision over 999 is not allowed")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        if getattr(__obj, "__name__", None) in _PADDING_METHODS and isinstance(getattr(__obj, "__self__", None), str):
            raise SecurityError(f"str.{__obj.__name__}() is not allowed in templates")
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = getattr(value, "__self__", "")

        def guarded(*args: Any, **kwargs: Any) -> str:
            if isinstance(text, str) and _WIDE_FORMAT.search(text):
                raise ExpressionError("format() with a width or precision over 999 is not allowed")
            return wrapped(*args, **kwargs)

        return guarded


SANDBOX = Sandbox()


class SecretBag:
    """``secrets`` in templates: loads the owner's secrets on first use and remembers what was read.

    The values read are masked (``***``) in everything the run stores. Only ``__getitem__`` is
    defined, so Jinja2 resolves ``secrets.NAME`` by item and no secret name can hit a method.
    """

    def __init__(self, loader: Callable[[], dict[str, str]] | None) -> None:
        self._loader = loader
        self._values: dict[str, str] | None = None
        self.used: set[str] = set()

    def __getitem__(self, name: str) -> str:
        if self._values is None:
            self._values = self._loader() if self._loader is not None else {}
        if name not in self._values:
            raise ExpressionError(f"no secret named {name!r}")
        value = self._values[name]
        self.used.add(value)
        return value


def _fail_undefined(value: Undefined) -> None:
    try:
        str(value)
    except jinja2.UndefinedError as exc:
        raise ExpressionError(exc.message or "undefined value") from None


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-shaped data from an expression result (generators from ``map`` become lists)."""
    if depth == 0 and not isinstance(value, Iterator):
        _bounded(value, "the result")
    if depth > 100:
        raise ExpressionError("the result is nested too deeply")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Undefined):
        _fail_undefined(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | range | set | frozenset | Iterator):
        items = []
        for item in value:
            items.append(_plain(item, depth + 1))
            if len(items) > MAX_SIZE:
                raise ExpressionError(f"the result has more than {MAX_SIZE} items")
        return items
    if isinstance(value, Iterable):
        return _plain(list(value), depth)
    return str(value)


_WHOLE = re.compile(r"^\{\{(.*)\}\}$", re.DOTALL)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compiled(text: str) -> tuple[str, Any]:
    """("native", expression) for a lone ``{{ expr }}``, else ("text", template)."""
    problem = template_problem(text)
    if problem:
        raise ExpressionError(problem)
    try:
        tree = SANDBOX.parse(text)
        body = tree.body
        whole = _WHOLE.match(text)
        if (
            whole is not None
            and len(body) == 1
            and isinstance(body[0], nodes.Output)
            and len(body[0].nodes) == 1
            and not isinstance(body[0].nodes[0], nodes.TemplateData)
        ):
            return "native", SANDBOX.compile_expression(whole.group(1), undefined_to_none=False)
        return "text", SANDBOX.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(f"syntax error: {exc.message}") from None
    except RecursionError:
        raise ExpressionError("the template is nested too deeply") from None


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compiled_expression(text: str) -> Any:
    problem = expression_problem(text)  # refuses what the parser cannot read with a clear message
    if problem:
        raise ExpressionError(problem)
    try:
        return SANDBOX.compile_expression(unwrap_expression(text), undefined_to_none=False)
    except jinja2.TemplateSyntaxError as exc:
        raise ExpressionError(f"syntax error: {exc.message}") from None
    except RecursionError:
        raise ExpressionError("the expression is nested too deeply") from None


def _guarded(fn: Callable[[], Any], seconds: float) -> Any:
    _local.deadline = time.monotonic() + seconds
    try:
        return fn()
    except ExpressionError:
        raise
    except jinja2.UndefinedError as exc:
        raise ExpressionError(exc.message or "undefined value") from None
    except SecurityError as exc:
        raise ExpressionError(f"not allowed: {exc}") from None
    except RecursionError:
        raise ExpressionError("recursion too deep") from None
    except MemoryError:
        raise ExpressionError("out of memory") from None
    except Exception as exc:  # TypeError, ZeroDivisionError, OverflowError...: the author's mistake
        raise ExpressionError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _local.deadline = None


def render(text: str, context: Mapping[str, Any], seconds: float = EVAL_SECONDS) -> Any:
    """Evaluate one config string: plain strings come back as they are."""
    if not is_template(text):
        return text
    kind, compiled = _compiled(text)
    if kind == "native":
        return _guarded(lambda: _plain(compiled(**context)), seconds)
    out = _guarded(lambda: compiled.render(context), seconds)
    if len(out) > MAX_OUTPUT:
        raise ExpressionError(f"the rendered text is longer than {MAX_OUTPUT} characters")
    return out


def evaluate(expression: str, context: Mapping[str, Any], seconds: float = EVAL_SECONDS) -> Any:
    """Evaluate an expression (a condition's ``if``) to a JSON-shaped value."""
    compiled = _compiled_expression(expression)
    return _guarded(lambda: _plain(compiled(**context)), seconds)


def render_value(value: Any, context: Mapping[str, Any], path: str, seconds: float = EVAL_SECONDS) -> Any:
    """Render every template string inside ``value`` (objects and lists are walked).

    Raises :class:`ExpressionError` whose message starts with the JSON path of the field.
    """
    if isinstance(value, str):
        try:
            return render(value, context, seconds)
        except ExpressionError as exc:
            raise ExpressionError(f"{path}: {exc}") from None
    if isinstance(value, dict):
        return {k: render_value(v, context, f"{path}.{k}", seconds) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, context, f"{path}[{i}]", seconds) for i, v in enumerate(value)]
    return value
