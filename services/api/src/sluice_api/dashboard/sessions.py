"""The dashboard's sign-in sessions: opened with an API token, kept in PostgreSQL, ended by sign-out.

The browser holds the session id (a random 256-bit value) in an HttpOnly, SameSite=Strict cookie;
the table holds only its SHA-256. Being server-side, a session ends at once on sign-out, when the
token it was opened with is revoked, or when its user is disabled: the lookup checks all three,
with the same live-token condition as the API's bearer check. No signing key is needed: the id
is unguessable, and the table cannot be turned back into ids.

The CSRF token of a session is derived from its id (an HMAC keyed with it), so it is stable for
the session, needs no storage, and tells nothing about the id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from uuid import UUID

from sluice_common.db import Pool
from sluice_common.users import LIVE_TOKEN_SQL, authenticate, hash_token

SESSION_COOKIE = "sluice_session"
_ID_CHARS = 43  # secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Session:
    id: str
    user_id: UUID
    user_name: str
    # What the per-token request limit counts by: the key of the token it was opened with, so
    # that the pages and the API calls of one token share one budget.
    limit_key: str

    @property
    def csrf(self) -> str:
        return csrf_token(self.id)


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def limit_key(token_hash: bytes) -> str:
    return token_hash[:12].hex()  # as sluice_api.auth keys a bearer token


def csrf_token(session_id: str) -> str:
    return hmac.new(session_id.encode(), b"sluice-dashboard-csrf", hashlib.sha256).hexdigest()


def open_session(pool: Pool, token: str, hours: float) -> Session:
    """A new session for the user of ``token`` (``AuthError`` for a bad one); expired ones go."""
    session_id = secrets.token_urlsafe(32)
    with pool.connection() as conn, conn.transaction():
        user = authenticate(conn, token)
        conn.execute("DELETE FROM dashboard_sessions WHERE expires_at < now()")
        conn.execute(
            "INSERT INTO dashboard_sessions (id_hash, user_id, token_id, expires_at) "
            "SELECT %s, user_id, id, now() + make_interval(secs => %s) FROM api_tokens WHERE token_hash = %s",
            (_hash(session_id), hours * 3600, hash_token(token)),
        )
    return Session(session_id, UUID(str(user.id)), user.name, limit_key(hash_token(token)))


def find_session(pool: Pool, session_id: str) -> Session | None:
    """The live session of this id, or None (unknown, expired, signed out, token revoked)."""
    if len(session_id) != _ID_CHARS:
        return None
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT u.id, u.name, t.token_hash FROM dashboard_sessions s "
            "JOIN api_tokens t ON t.id = s.token_id JOIN users u ON u.id = s.user_id "
            f"WHERE s.id_hash = %s AND s.expires_at > now() AND {LIVE_TOKEN_SQL}",
            (_hash(session_id),),
        ).fetchone()
    if row is None:
        return None
    return Session(session_id, row["id"], row["name"], limit_key(bytes(row["token_hash"])))


def close_session(pool: Pool, session_id: str) -> None:
    with pool.connection() as conn:
        conn.execute("DELETE FROM dashboard_sessions WHERE id_hash = %s", (_hash(session_id),))
