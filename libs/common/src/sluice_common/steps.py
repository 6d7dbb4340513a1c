"""The step type registry: one way for every step type, built in or from a plugin, to exist.

A step type is a :class:`StepType`: its name, its pydantic config model, and whether it branches.
A :class:`StepRegistry` holds the step types one process knows. It lives here, in common, because
two services use it:

* the API validates a definition against it when a workflow is created
  (``sluice_common.workflow.validate_workflow``: unknown types, configs, templates, jumps);
* the worker decides a step's type in it once per step, then runs the step.

Running needs what only the worker has (httpx, the expression sandbox, the SSRF guard), so run
functions are not here: the worker attaches one to each registered type by name
(``sluice_worker.steps``), and refuses to start a step whose type has none.

Every type goes through :meth:`StepRegistry.register`, the same call for both origins:

* built-in types (``http``, ``transform``, ``condition``, ``delay``, ``workflow``, ``fail``) are
  listed in ``sluice_common.workflow.BUILTIN_STEP_TYPES``, next to their config models;
* plugins come from the ``sluice.steps`` entry points, each a :class:`StepPlugin` (a config model
  and a run function taking a :class:`StepCall`), and are registered after the built-in types
  (``sluice_common.workflow.step_registry``).

``docs/engine.md`` ("Adding a step type") says what to write for a new built-in type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from sluice_common.errors import StepFailure

PLUGIN_GROUP = "sluice.steps"
TYPE_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

# A branching type's config: ``if`` is an expression (checked, never rendered as a template);
# ``then`` and ``else`` name a later step or STOP, and are not rendered either.
BRANCH_IF = "if"
BRANCH_TARGETS = ("then", "else")
STOP = "stop"


@dataclass(frozen=True)
class StepType:
    """One step type as every service knows it.

    ``config_model`` validates the step's ``config`` (strictly at creation; after rendering its
    templates in the worker). ``branches``: the config has :data:`BRANCH_IF` and
    :data:`BRANCH_TARGETS`, and the step's output says in ``next`` where the run goes on (a later
    step id, or :data:`STOP` to end the run); only ``condition`` does.
    """

    name: str
    config_model: type[BaseModel]
    branches: bool = False
    description: str = ""


class StepRegistry:
    """The step types of one process, by name; a name is registered once."""

    def __init__(self, types: Iterable[StepType] = ()) -> None:
        self._types: dict[str, StepType] = {}
        for step_type in types:
            self.register(step_type)

    def register(self, step_type: StepType) -> StepType:
        """Add ``step_type``; raises ``ValueError`` when its name is invalid or already taken."""
        if not TYPE_NAME.fullmatch(step_type.name):
            raise ValueError(f"{step_type.name!r} is not a step type name ({TYPE_NAME.pattern})")
        if step_type.name in self._types:
            raise ValueError(f"step type {step_type.name!r} is already registered")
        self._types[step_type.name] = step_type
        return step_type

    def get(self, name: str) -> StepType | None:
        return self._types.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[StepType]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def names(self) -> list[str]:
        return sorted(self._types)

    def models(self) -> dict[str, type[BaseModel]]:
        """Config model of every registered type, by name."""
        return {name: t.config_model for name, t in self._types.items()}


# Plugins --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCall:
    """What a plugin's run function gets besides its (validated, rendered) config."""

    run_id: str
    workflow_id: str
    owner_id: str
    attempt: int
    step_id: str
    timeout: float  # seconds this step may take; the function must return (or raise) within it
    context: Mapping[str, Any] = field(default_factory=dict)  # trigger, steps, run, vars (read-only)


class StepError(StepFailure):
    """Raised by a plugin's run function to fail with a message (``final``: retrying cannot help)."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        self.final = final
        super().__init__(message)


@dataclass(frozen=True)
class StepPlugin:
    """A step type added by a package: ``[project.entry-points."sluice.steps"] name = "module:PLUGIN"``.

    ``config_model`` is a pydantic model (validated when a workflow is created, so it must not
    need the worker); ``run(config, call)`` executes the step in the worker and returns a
    JSON-serialisable output, or raises :class:`StepError`.
    """

    config_model: type[BaseModel]
    run: Callable[[Any, StepCall], Any]
    description: str = ""

    def step_type(self, name: str) -> StepType:
        """What the registry holds for this plugin under its entry point's ``name``."""
        return StepType(name, self.config_model, description=self.description)
