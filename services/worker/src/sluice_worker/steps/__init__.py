"""The worker's half of the step registry: a run function attached to every registered step type.

The registry itself (:mod:`sluice_common.steps`) holds each type's name, config model and whether
it branches; the API validates with it and cannot import this package. Here, each type gets the
function that runs it, attached by name through :meth:`StepRunners.attach`, the same call for
both origins:

* built-in types: one module each in this package (``http``, ``transform``, ``condition``,
  ``delay``, ``workflow``, ``fail``), attached in :data:`BUILTIN_RUNS`;
* plugins: :func:`~sluice_worker.steps.plugin.plugin_run` wraps the plugin's own ``run``.

The engine looks a step's type up once (:meth:`StepRunners.get`) and calls what it finds.
Adding a built-in type (see ``docs/engine.md``): its config model and one ``StepType`` line in
``sluice_common.workflow.BUILTIN_STEP_TYPES``, a module here with ``run(step)``, and one line in
:data:`BUILTIN_RUNS`. A unit test checks that every registered built-in type has a run function.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from sluice_common.steps import StepPlugin, StepRegistry, StepType
from sluice_common.workflow import step_registry
from sluice_worker.steps import condition, delay, fail, http, transform, workflow
from sluice_worker.steps.base import Run
from sluice_worker.steps.plugin import plugin_run

BUILTIN_RUNS: dict[str, Run] = {
    "http": http.run,
    "transform": transform.run,
    "condition": condition.run,
    "delay": delay.run,
    "workflow": workflow.run,
    "fail": fail.run,
}
"""The run function of each built-in type of ``sluice_common.workflow.BUILTIN_STEP_TYPES``."""


@dataclass(frozen=True)
class RunnableStep:
    """A registered step type with the function that runs it."""

    type: StepType
    run: Run


class StepRunners:
    """The step types of a registry that this worker can run, by name."""

    def __init__(self, registry: StepRegistry) -> None:
        self.registry = registry
        self._runnable: dict[str, RunnableStep] = {}

    def attach(self, name: str, run: Run) -> RunnableStep:
        """Attach the run function of the registered type ``name`` (once)."""
        step_type = self.registry.get(name)
        if step_type is None:
            raise ValueError(f"step type {name!r} is not registered")
        if name in self._runnable:
            raise ValueError(f"step type {name!r} already has a run function")
        runnable = self._runnable[name] = RunnableStep(step_type, run)
        return runnable

    def get(self, name: str) -> RunnableStep | None:
        return self._runnable.get(name)

    def __iter__(self) -> Iterator[RunnableStep]:
        return iter(self._runnable.values())

    def without_run(self) -> list[str]:
        """Registered types that have no run function here."""
        return [t.name for t in self.registry if t.name not in self._runnable]


def step_runners(registry: StepRegistry, plugins: Mapping[str, StepPlugin]) -> StepRunners:
    """The built-in types' run functions and each plugin's, attached to ``registry``."""
    runners = StepRunners(registry)
    for name, run in BUILTIN_RUNS.items():
        runners.attach(name, run)
    for name, plugin in plugins.items():
        if name in registry and runners.get(name) is None:  # not refused by the registry
            runners.attach(name, plugin_run(plugin))
    return runners


_last: tuple[Mapping[str, StepPlugin], StepRunners] | None = None


def default_runners(plugins: Mapping[str, StepPlugin]) -> StepRunners:
    """The runners of the process's registry (built-in types and ``plugins``), built once per set
    of plugins: the engine asks for them at every run."""
    global _last
    last = _last
    if last is not None and last[0] is plugins:
        return last[1]
    runners = step_runners(step_registry(plugins), plugins)
    _last = (plugins, runners)
    return runners
