"""The ``workflow`` step: starts a child run, and parks until it ends when it waits for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sluice_common.workflow import WorkflowStepConfig
from sluice_worker.steps.base import Park, StepFailed, StepInput

if TYPE_CHECKING:
    from sluice_worker.engine import ChildState


def _child_output(step_id: str, child: ChildState) -> Any:
    if child.status == "succeeded":
        return {"runId": child.run_id, "status": child.status, "output": child.output}
    # Final: the child has used its own retries; retrying the parent would multiply them.
    raise StepFailed(
        step_id, f"sub-workflow run {child.run_id} {child.status}: {child.error or 'no error recorded'}", final=True
    )


def run(step: StepInput) -> Any:
    config: WorkflowStepConfig = step.config
    subruns = step.runtime.subruns
    if subruns is None:
        raise StepFailed(step.step_id, "this worker cannot start sub-workflows", final=True)
    if step.waiting is not None:
        child = subruns.state(step.waiting["childRunId"])
        if child.status in ("succeeded", "failed", "cancelled"):
            return _child_output(step.step_id, child)
        return Park(step.waiting, waiting_for=child.run_id)
    child_id = subruns.start(step.ctx, step.step_id, config.workflow_id, config.trigger_data)
    if not config.wait:
        return {"runId": child_id, "status": "started"}
    return Park({"childRunId": child_id}, waiting_for=child_id)
