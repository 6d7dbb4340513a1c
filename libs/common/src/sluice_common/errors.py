"""The one exception tree of Sluice, and the one conversion of pydantic errors into field problems.

Every error Sluice raises on purpose derives from :class:`SluiceError`::

    SluiceError
    ├── ConfigError            a setting is missing or invalid (start-up stops)
    ├── InfrastructureError    PostgreSQL or Redis cannot be reached or started      -> 503
    ├── NotFoundError          no such object, or another user's                     -> 404
    ├── ConflictError          valid, but clashes with the current state             -> 409
    ├── AuthError              missing, unknown or revoked credentials                -> 401
    ├── ValidationFailed       input failed validation; carries every FieldProblem    -> 422
    └── StepFailure            a step of a run could not complete (worker only)
        ├── StepFailed         sluice_worker.engine: the step failed; the run's error
        ├── StepError          sluice_common.steps: raised by a plugin's run function
        ├── ExpressionError    sluice_worker.expressions: a template or expression failed
        └── HttpRefused        sluice_worker.safehttp: a request refused before sending

The API turns these into HTTP problems in one place (``sluice_api.problems``), by a list of the
classes above that have a status; a class is answered with the status of the first listed class
it derives from. :class:`StepFailure` is deliberately on its own branch, under none of them:
steps run in the worker, never in a request, so a step failure reaching the API would be a bug
and is answered as one (a logged 500), never as a client error.

:func:`field_problems` is the one place a pydantic ``ValidationError`` becomes
:class:`FieldProblem` items located by JSON paths (:func:`json_path`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from pydantic import ValidationError


class SluiceError(Exception):
    """Base of every error Sluice raises on purpose."""


class ConfigError(SluiceError):
    """A setting is missing or invalid; start-up stops with this message."""


class InfrastructureError(SluiceError):
    """PostgreSQL or Redis cannot be reached or started."""


class NotFoundError(SluiceError):
    """The object does not exist, or belongs to another user (never say which)."""


class ConflictError(SluiceError):
    """The request is valid but clashes with the current state (for example a paused workflow)."""


class AuthError(SluiceError):
    """Missing, malformed, unknown or revoked credentials."""


@dataclass(frozen=True)
class FieldProblem:
    """One problem with one field of an input, located by a JSON path such as ``$.steps[0].id``."""

    path: str
    message: str


class ValidationFailed(SluiceError):
    """Input failed validation; carries every problem found, not only the first."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems
        summary = "; ".join(f"{p.path}: {p.message}" for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} validation problem(s): {summary}{more}")


class StepFailure(SluiceError):
    """A step of a run could not complete. Raised and handled in the worker only: the run's
    step records the message; it never becomes an HTTP answer."""


# Pydantic errors as field problems -------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def json_path(loc: tuple[int | str, ...], base: str = "$") -> str:
    """Render a pydantic error location as a JSON path: ``("steps", 0, "id")`` -> ``$.steps[0].id``."""
    out = base
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.fullmatch(part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


def field_problems(exc: ValidationError, base: str = "$", *, tags: Collection[str] = ()) -> list[FieldProblem]:
    """Every error of ``exc`` as a :class:`FieldProblem` whose path starts at ``base``.

    ``tags`` are the discriminator values of tagged unions in the model: pydantic adds the tag
    to the location (``$.trigger.cron.config``), but users never wrote it, so it is left out.
    """
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(part for part in err["loc"] if part not in tags) if tags else tuple(err["loc"])
        if len(loc) > 1 and loc[-1] == "[key]":  # a bad key of an object: its path is the key's own
            loc = loc[:-1]
        problems.append(FieldProblem(json_path(loc, base), err["msg"].removeprefix("Value error, ")))
    return problems
