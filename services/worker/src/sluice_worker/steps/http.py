"""The ``http`` step: one request through the SSRF guard (:mod:`sluice_worker.safehttp`)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from sluice_common.workflow import HttpConfig
from sluice_worker.safehttp import HttpRefused
from sluice_worker.safehttp import request as http_request
from sluice_worker.steps.base import StepFailed, StepInput


def run(step: StepInput) -> Any:
    config: HttpConfig = step.config
    timeout = min(config.timeout_seconds, step.timeout)
    try:
        result = http_request(
            step.runtime.http,
            step.runtime.http_policy,
            config.method,
            config.url,
            headers=config.headers,
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
