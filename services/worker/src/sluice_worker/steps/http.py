"""The ``http`` step: one request through the SSRF guard (:mod:`sluice_worker.safehttp`).

Every request carries an ``Idempotency-Key`` header (unless the step turns it off with
``idempotencyKey: false``, or names another header with ``idempotencyHeader``) whose value is
the same for every execution of the same step of the same run: steps run at least once, and a
target that honours the key sees a step executed again after a worker crash as one operation.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from sluice_common.workflow import HttpConfig, header_name_problem, header_value_problem, url_problem
from sluice_worker.safehttp import HttpRefused
from sluice_worker.safehttp import request as http_request
from sluice_worker.steps.base import StepFailed, StepInput

# Fixed for good: changing it would change the key of a step that is executed again.
_KEY_NAMESPACE = uuid.UUID("3f220ca8-6b07-42ac-8686-ea17723614fd")


def idempotency_key(run_id: str, step_id: str) -> str:
    """The key of step ``step_id`` of run ``run_id``: the same at every attempt and every worker."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{run_id}/{step_id}"))


def _request_problem(config: HttpConfig) -> str | None:
    """Why the rendered request can never be sent. Validation refuses these in literal configs;
    a value rendered from a template (or a definition stored before the check) is caught here,
    and failing finally spares the retries that could not succeed either."""
    problem = url_problem(config.url)
    if problem:
        return f"config.url: {problem}"
    for name, value in config.headers.items():
        problem = header_name_problem(name) or header_value_problem(value)
        if problem:
            return f"config.headers.{name[:100]}: {problem}"
    return None


def _headers(step: StepInput, config: HttpConfig) -> dict[str, str]:
    headers = dict(config.headers)
    wanted = config.idempotency_header.lower()
    # A key the step sets itself (say from the trigger's own request id) wins.
    if config.idempotency_key and all(name.lower() != wanted for name in headers):
        headers[config.idempotency_header] = idempotency_key(step.ctx.run_id, step.step_id)
    return headers


def run(step: StepInput) -> Any:
    config: HttpConfig = step.config
    timeout = min(config.timeout_seconds, step.timeout)
    problem = _request_problem(config)
    if problem:
        raise StepFailed(step.step_id, problem, final=True)
    try:
        result = http_request(
            step.runtime.http,
            step.runtime.http_policy,
            config.method,
            config.url,
            headers=_headers(step, config),
            params=config.query or None,
            content=config.body,
            json_body=config.json_body,
            form=config.form,
            timeout=timeout,
            max_redirects=config.max_redirects,
            max_bytes=step.runtime.output_max_bytes * 4,
            secret_values=step.scope.bag.used,
        )
    except HttpRefused as exc:
        raise StepFailed(step.step_id, str(exc), final=True) from None
    except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError) as exc:
        # The request itself is malformed (a redirect to a bad URL, a header HTTP forbids): sending
        # it again cannot help.
        raise StepFailed(step.step_id, f"invalid request: {exc}", final=True) from None
    except (httpx.TimeoutException, TimeoutError):
        raise StepFailed(step.step_id, f"timed out after {timeout:.1f}s") from None
    except httpx.HTTPError as exc:
        raise StepFailed(step.step_id, f"request failed: {type(exc).__name__}: {exc}") from None
    accepted = config.accept_status
    ok = result.status in accepted if accepted else 200 <= result.status < 300
    if not ok:
        raise StepFailed(step.step_id, f"{config.method} {result.url} answered {result.status}")
    text = result.content.decode("utf-8", errors="replace")
    body: Any = text
    content_type = result.headers.get("content-type", "").split(";")[0].strip()
    if content_type.endswith("json") and not result.truncated:
        try:
            body = json.loads(text)
        except ValueError:
            body = text
    output: dict[str, Any] = {"status": result.status, "headers": result.headers, "body": body}
    if result.redirects:
        output["url"] = result.url
    if result.truncated:
        output["bodyTruncated"] = True
    return output
