"""What every dashboard page shares: the ``Page`` base, its session and CSRF checks, forms, rendering.

Pages are Falcon resources like the API's, mounted from ``sluice_api.dashboard.routes``. They set
``public = True`` so that the API's bearer check leaves them alone, and :class:`SessionMiddleware`
does theirs instead: it finds the session of the cookie (a sign-in page for a missing one) and
refuses a POST without the session's CSRF token (a hidden form field, or the ``X-CSRF-Token``
header htmx sends from the page's ``hx-headers``). Errors raised by a page become HTML pages in
:func:`install_error_pages`; the API's keep their problem+json answers.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, unquote

import falcon
import jinja2
import psycopg
import psycopg_pool
import redis

from sluice_api import problems
from sluice_api.auth import Caller, RequestLimiter, too_many
from sluice_api.dashboard import sessions, views
from sluice_api.deps import Dependencies
from sluice_api.inputs import media_type, read_body
from sluice_api.stats import QueueStatsCache
from sluice_common.errors import AuthError, ConflictError, NotFoundError, SluiceError, ValidationFailed

log = logging.getLogger(__name__)

FLASH_COOKIE = "sluice_flash"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
FORM_TYPE = "application/x-www-form-urlencoded"
# Scripts only from here (htmx and the dashboard's own file); inline styles for the timeline bars.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


class CsrfRefused(SluiceError):
    """A POST without the session's CSRF token."""


@dataclass(frozen=True)
class Dashboard:
    """What pages are built with (one per app)."""

    deps: Dependencies
    templates: jinja2.Environment
    stats: QueueStatsCache  # the stats endpoint's own (one computation a second for both)


def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sluice_api.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ago=views.ago,
        when=views.when,
        duration=views.duration,
        pretty=views.pretty_json,
        short=views.short_id,
    )
    env.globals["static"] = views.static_url
    return env


def static_directory() -> str:
    return str(resources.files("sluice_api.dashboard") / "static")


class Page:
    """A dashboard resource. ``signed_in``: needs a session (all but the sign-in page)."""

    public: ClassVar[bool] = True  # the API's bearer check skips it; SessionMiddleware checks it
    signed_in: ClassVar[bool] = True
    query_params: ClassVar[frozenset[str]] = frozenset()
    nav: ClassVar[str] = ""

    def __init__(self, dashboard: Dashboard) -> None:
        self._dash = dashboard
        self._deps = dashboard.deps

    def render(self, req: falcon.Request, resp: falcon.Response, template: str, status: int = 200, **ctx: Any) -> None:
        session: sessions.Session | None = getattr(req.context, "session", None)
        flash = req.cookies.get(FLASH_COOKIE)
        if flash:
            resp.unset_cookie(FLASH_COOKIE, path="/")
        resp.status = status
        resp.content_type = "text/html; charset=utf-8"
        resp.text = self._dash.templates.get_template(template).render(
            session=session,
            csrf=session.csrf if session else "",
            csrf_header=CSRF_HEADER,
            nav=self.nav,
            flash=unquote(flash)[:300] if flash else None,
            path=req.relative_uri,
            **ctx,
        )

    def redirect(self, resp: falcon.Response, location: str, flash: str | None = None) -> None:
        """After a POST: see the result at ``location`` (303), with a one-time message."""
        if flash:
            resp.set_cookie(
                FLASH_COOKIE,
                quote(flash[:300]),
                path="/",
                http_only=True,
                secure=self._deps.settings.dashboard_secure_cookie,
                same_site="Strict",
                max_age=60,
            )
        raise falcon.HTTPSeeOther(location)


def caller_of_page(req: falcon.Request) -> Caller:
    caller: Caller = req.context.caller
    return caller


def form_of(req: falcon.Request) -> dict[str, str]:
    """The fields of the POST (the last value of a repeated one)."""
    form: dict[str, str] = req.context.form
    return form


def _read_form(req: falcon.Request, limit: int) -> dict[str, str]:
    if not req.content_length:
        return {}
    if media_type(req) != FORM_TYPE:
        raise falcon.HTTPUnsupportedMediaType(title="Unsupported Media Type", description=f"send {FORM_TYPE}")
    try:
        text = read_body(req, limit).decode()
    except UnicodeDecodeError:
        raise falcon.HTTPBadRequest(title="Bad Request", description="the form is not UTF-8") from None
    return dict(parse_qsl(text, keep_blank_values=True))


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class SessionMiddleware:
    """Finds the page's session, sends the signed-out to the sign-in page, counts the request in
    its token's request limit, checks CSRF on POST."""

    def __init__(self, deps: Dependencies, limiter: RequestLimiter) -> None:
        self._deps = deps
        self._limiter = limiter

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any, params: Any) -> None:
        if not isinstance(resource, Page):
            return
        req.context.page = True  # its errors are HTML pages (install_error_pages)
        resp.set_header("Content-Security-Policy", _CSP)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "same-origin")
        resp.cache_control = ["no-store"]
        cookie = req.cookies.get(sessions.SESSION_COOKIE)
        session = sessions.find_session(self._deps.pool, cookie) if cookie else None
        req.context.session = session
        if session is not None:
            req.context.caller = Caller(session.user_id, session.user_name, session.limit_key)
            wait = self._limiter.hit(session.limit_key)
            if wait is not None:
                raise too_many(wait)
        if req.method == "POST":
            req.context.form = _read_form(req, self._deps.settings.api_max_body_bytes)
        if not resource.signed_in:
            return
        if session is None:
            target = "/login?next=" + quote(req.relative_uri if req.method == "GET" else "/", safe="")
            if req.get_header("HX-Request"):
                resp.set_header("HX-Redirect", target)
                raise falcon.HTTPStatus(falcon.HTTP_401, text="")
            raise falcon.HTTPSeeOther(target)
        if req.method == "POST":
            given = req.context.form.get(CSRF_FIELD) or req.get_header(CSRF_HEADER) or ""
            if not hmac.compare_digest(given.encode(), session.csrf.encode()):
                raise CsrfRefused("the form's CSRF token is missing or wrong: reload the page and try again")


def install_error_pages(app: falcon.App[falcon.Request, falcon.Response], templates: jinja2.Environment) -> None:
    """Errors of the pages (and unknown paths outside ``/api`` and ``/metrics``) become HTML pages;
    the API's stay problems."""

    def on_api(req: falcon.Request, exc: Exception | None = None) -> bool:
        """Whether the problem+json handlers answer: anything but a page, or a path no route
        matched under ``/api`` and ``/metrics``."""
        if getattr(req.context, "page", False):
            return False
        if isinstance(exc, falcon.HTTPRouteNotFound):
            return req.path.startswith("/api/") or req.path in ("/api", "/metrics")
        return True

    def page(req: falcon.Request, resp: falcon.Response, status: int, title: str, detail: str) -> None:
        resp.status = status
        resp.content_type = "text/html; charset=utf-8"
        session = getattr(req.context, "session", None)
        resp.text = templates.get_template("error.html").render(
            session=session,
            csrf=session.csrf if session else "",
            csrf_header=CSRF_HEADER,
            nav="",
            flash=None,
            path=req.relative_uri,
            status=status,
            title=title,
            detail=detail,
        )

    def sluice_error(req: falcon.Request, resp: falcon.Response, exc: SluiceError, params: dict[str, Any]) -> None:
        if on_api(req):
            problems.handle_sluice_error(req, resp, exc, params)
            return
        for cls, status, title in (
            (NotFoundError, 404, "Not found"),
            (CsrfRefused, 403, "Refused"),
            (AuthError, 401, "Not signed in"),
            (ConflictError, 409, "Conflict"),
            (ValidationFailed, 422, "Invalid input"),
        ):
            if isinstance(exc, cls):
                detail = str(exc)
                if isinstance(exc, ValidationFailed):
                    detail = "; ".join(f"{p.path}: {p.message}" for p in exc.problems)
                page(req, resp, status, title, detail)
                return
        unexpected(req, resp, exc, params)

    def http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: dict[str, Any]) -> None:
        if on_api(req, exc):
            problems.handle_http_error(req, resp, exc, params)
            return
        if exc.headers:
            resp.set_headers(exc.headers)
        page(req, resp, exc.status_code, exc.title or str(exc.status_code), exc.description or "")

    def unavailable(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
        if on_api(req):
            problems.handle_unavailable(req, resp, exc, params)
            return
        log.warning("%s %s: backing service unavailable: %s", req.method, req.path, type(exc).__name__)
        resp.set_header("Retry-After", "5")
        page(req, resp, 503, "Unavailable", "PostgreSQL or Redis does not answer; try again in a moment.")

    def unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
        if on_api(req):
            problems.handle_unexpected(req, resp, exc, params)
        elif isinstance(exc, falcon.HTTPError):
            http_error(req, resp, exc, params)
        else:
            log.exception("unhandled error on %s %s", req.method, req.path)
            page(req, resp, 500, "Internal error", "Something went wrong; the server log has the details.")

    app.add_error_handler(Exception, unexpected)
    app.add_error_handler(falcon.HTTPError, http_error)
    app.add_error_handler(SluiceError, sluice_error)
    for cls in (redis.RedisError, psycopg.OperationalError, psycopg_pool.PoolTimeout):
        app.add_error_handler(cls, unavailable)
