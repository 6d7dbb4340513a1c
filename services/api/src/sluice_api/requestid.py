"""The request id: every API request gets one, for its log lines and its answer.

:class:`RequestIdMiddleware` (the app's first middleware) takes the ``X-Request-Id`` the client or
a proxy sent when it is a short token (letters, digits and ``._:-``, up to 128 characters), else
makes one (a uuid4 in hex); it binds it to the log context (:mod:`sluice_common.logs`) while the
request is served, so every line logged for it names it, and returns it in the answer's
``X-Request-Id``. A request refused before the app sees it (by the gunicorn worker) gets one too
(:func:`request_id`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Final

import falcon

from sluice_common.logs import bind, clear

HEADER: Final = "X-Request-Id"
# Short and plain: it is echoed in a header and written into every log line of the request.
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(incoming: str | None = None) -> str:
    """``incoming`` when it is an acceptable request id, else a fresh one."""
    if incoming is not None and _TOKEN.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives each request its id, in the log context while it is served and in the answer's header."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        rid = request_id(req.get_header(HEADER))
        req.context.request_id = rid
        # A thread serves many requests: start from an empty context, whatever the last one left.
        clear()
        bind(request_id=rid)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        # Set here, after the responder and the error handlers, which may replace the headers.
        resp.set_header(HEADER, getattr(req.context, "request_id", None) or request_id())
        clear()
