"""The run function the worker attaches to a plugin's step type: it calls the plugin's own ``run``
with a :class:`~sluice_common.steps.StepCall`, which needs nothing of the worker."""

from __future__ import annotations

import time
from typing import Any

from sluice_common.steps import StepCall, StepError, StepPlugin
from sluice_worker.steps.base import Run, StepFailed, StepInput


def plugin_run(plugin: StepPlugin) -> Run:
    def run(step: StepInput) -> Any:
        call = StepCall(
            run_id=step.ctx.run_id,
            workflow_id=step.ctx.workflow_id,
            owner_id=step.ctx.owner_id,
            attempt=step.ctx.attempt,
            step_id=step.step_id,
            timeout=step.timeout,
            context={k: v for k, v in step.scope.values.items() if k != "secrets"},
        )
        started = time.monotonic()
        try:
            output = plugin.run(step.config, call)
        except StepError as exc:
            raise StepFailed(step.step_id, str(exc), final=exc.final) from None
        # Built-in types bound their own waits; a plugin's function is only trusted to try.
        if time.monotonic() - started > step.timeout:
            raise StepFailed(step.step_id, f"took longer than its {step.timeout:g}s time limit")
        return output

    return run
