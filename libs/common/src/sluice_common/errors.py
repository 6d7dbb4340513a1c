"""The one exception tree of Sluice. The API maps it to HTTP problems in one place."""

from __future__ import annotations

from dataclasses import dataclass


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
