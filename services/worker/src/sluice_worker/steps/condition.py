"""The ``condition`` step, the one that branches: evaluates ``if`` and names where the run goes on.

Its config's ``if``, ``then`` and ``else`` reach it unrendered (the engine renders no template in
them for a branching type); its output's ``next`` is the chosen step id, :data:`STOP`, or None for
the next step.
"""

from __future__ import annotations

from typing import Any

from sluice_common.steps import STOP
from sluice_common.workflow import ConditionConfig
from sluice_worker import expressions
from sluice_worker.expressions import ExpressionError
from sluice_worker.steps.base import StepFailed, StepInput


def run(step: StepInput) -> Any:
    config: ConditionConfig = step.config
    expression = config.expression
    try:
        value = expressions.evaluate(expression, step.scope.values, min(step.timeout, expressions.EVAL_SECONDS))
    except ExpressionError as exc:
        raise StepFailed(step.step_id, f"config.if: {exc}", final=True) from None
    result = bool(value)
    target = config.then if result else config.else_
    if target not in (None, STOP):
        # Validation allows forward jumps only; a definition stored without it must not loop.
        later = [s["id"] for s in step.ctx.steps[step.position + 1 :]]
        if target not in later:
            raise StepFailed(
                step.step_id, f"config.{'then' if result else 'else'}: no later step {target!r}", final=True
            )
    output: dict[str, Any] = {"result": result, "next": target}
    if target == STOP:
        output["reason"] = config.reason or f"condition {expression!r} was {str(result).lower()}"
    return output
