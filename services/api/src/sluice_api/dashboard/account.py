"""Signing in and out, and the secrets page (names only: values are never shown again)."""

from __future__ import annotations

import hmac
import secrets as random

import falcon

from sluice_api.dashboard import sessions
from sluice_api.dashboard.web import CSRF_FIELD, CsrfRefused, Page, caller_of_page, form_of, safe_next
from sluice_common import secrets
from sluice_common.errors import AuthError, NotFoundError, ValidationFailed

# Before there is a session, the sign-in form's CSRF token is a double-submit cookie: a cross-site
# form cannot read it, and SameSite=Strict keeps the browser from sending it along.
LOGIN_CSRF_COOKIE = "sluice_login_csrf"


class LoginPage(Page):
    """``GET|POST /login``: an API token (``make run`` prints the dev one) opens a session."""

    signed_in = False
    query_params = frozenset({"next"})

    def _form(self, req: falcon.Request, resp: falcon.Response, status: int = 200, error: str | None = None) -> None:
        token = random.token_urlsafe(24)
        resp.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            path="/login",
            http_only=True,
            secure=self._deps.settings.dashboard_secure_cookie,
            same_site="Strict",
            max_age=3600,
        )
        self.render(req, resp, "login.html", status, login_csrf=token, error=error, next=req.get_param("next") or "")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.context.session is not None:
            raise falcon.HTTPSeeOther(safe_next(req.get_param("next")))
        self._form(req, resp)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        form = form_of(req)
        expected = req.cookies.get(LOGIN_CSRF_COOKIE) or ""
        if not expected or not hmac.compare_digest(form.get(CSRF_FIELD, "").encode(), expected.encode()):
            raise CsrfRefused("the sign-in form's CSRF token is missing or wrong: reload the page and try again")
        try:
            session = sessions.open_session(
                self._deps.pool, form.get("token", "").strip(), self._deps.settings.dashboard_session_hours
            )
        except AuthError as exc:
            self._form(req, resp, 401, f"Not signed in: {exc}.")
            return
        resp.unset_cookie(LOGIN_CSRF_COOKIE, path="/login")
        resp.set_cookie(
            sessions.SESSION_COOKIE,
            session.id,
            path="/",
            http_only=True,
            secure=self._deps.settings.dashboard_secure_cookie,
            same_site="Strict",
            max_age=int(self._deps.settings.dashboard_session_hours * 3600),
        )
        raise falcon.HTTPSeeOther(safe_next(form.get("next")))


class LogoutPage(Page):
    """``POST /logout``: the session ends on the server, not only in this browser."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        sessions.close_session(self._deps.pool, req.context.session.id)
        resp.unset_cookie(sessions.SESSION_COOKIE, path="/")
        self.redirect(resp, "/login", "Signed out.")


class SecretsPage(Page):
    """``GET|POST /secrets``: the names of your secrets; set one (a new value replaces the old)."""

    nav = "secrets"

    def _page(self, req: falcon.Request, resp: falcon.Response, status: int = 200, **ctx: object) -> None:
        items = secrets.list_secrets(self._deps.pool, caller_of_page(req).user_id)
        ctx.setdefault("problems", [])
        ctx.setdefault("name", "")
        self.render(req, resp, "secrets.html", status, items=items, **ctx)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._page(req, resp)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        form = form_of(req)
        name, value = form.get("name", "").strip(), form.get("value", "")
        try:
            secrets.put_secret(self._deps.pool, self._deps.settings, caller_of_page(req).user_id, name, value)
        except ValidationFailed as exc:
            self._page(req, resp, 422, problems=[(p.path, p.message) for p in exc.problems], name=name)
            return
        self.redirect(resp, "/secrets", f"Secret {name} saved.")


class SecretDeletePage(Page):
    """``POST /secrets/{name}/delete``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        try:
            secrets.delete_secret(self._deps.pool, caller_of_page(req).user_id, name)
        except (NotFoundError, ValidationFailed):
            self.redirect(resp, "/secrets", f"No secret {name}.")
        self.redirect(resp, "/secrets", f"Secret {name} deleted.")
