"""Users and their API tokens.

Tokens are 256-bit random strings shown once and stored only as SHA-256 hashes. A fast hash is
right here (unlike for passwords): the token has full entropy, so there is nothing to brute-force,
and the API checks it on every request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from sluice_common.errors import (
    AuthError,
    ConflictError,
    FieldProblem,
    NotFoundError,
    ValidationFailed,
)

TOKEN_PREFIX = "slc_"  # noqa: S105 - a marker, not a secret
TOKEN_CHARS = len(TOKEN_PREFIX) + 43  # secrets.token_urlsafe(32)
PREFIX_CHARS = len(TOKEN_PREFIX) + 6  # stored in clear, to tell tokens apart
# A token that still opens anything, in a query joining api_tokens ``t`` and users ``u``: the
# API's bearer check and the dashboard's sessions (opened with a token) both use it.
LIVE_TOKEN_SQL = "t.revoked_at IS NULL AND u.disabled_at IS NULL"  # noqa: S105 - SQL, not a secret
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class User:
    id: UUID
    name: str


@dataclass(frozen=True)
class IssuedToken:
    user: User
    token_id: UUID
    token: str  # the only time the clear token exists


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValidationFailed(
            [
                FieldProblem(
                    "$.name",
                    "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
                )
            ]
        )


def issue_token(conn: psycopg.Connection[Any], user: User, label: str | None = None) -> IssuedToken:
    token = new_token()
    row = conn.execute(
        "INSERT INTO api_tokens (user_id, token_hash, prefix, label) VALUES (%s, %s, %s, %s) RETURNING id",
        (user.id, hash_token(token), token[:PREFIX_CHARS], label),
    ).fetchone()
    assert row is not None
    return IssuedToken(user=user, token_id=_first(row), token=token)


def create_user(conn: psycopg.Connection[Any], name: str) -> IssuedToken:
    """Create a user with a first token, in one transaction."""
    _check_name(name)
    with conn.transaction():
        try:
            row = conn.execute("INSERT INTO users (name) VALUES (%s) RETURNING id", (name,)).fetchone()
        except psycopg.errors.UniqueViolation:
            raise ConflictError(f"a user named {name!r} already exists") from None
        assert row is not None
        return issue_token(conn, User(_first(row), name))


def get_user(conn: psycopg.Connection[Any], name: str) -> User:
    row = conn.execute("SELECT id FROM users WHERE name = %s", (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"no user named {name!r}")
    return User(_first(row), name)


def create_token(conn: psycopg.Connection[Any], name: str, label: str | None = None) -> IssuedToken:
    with conn.transaction():
        return issue_token(conn, get_user(conn, name), label)


def revoke_tokens(conn: psycopg.Connection[Any], name: str, prefix: str | None = None) -> int:
    """Revoke a user's live tokens: all, or those that start with ``prefix``; return how many.

    ``prefix`` may be anything from a few characters to the whole token (a leaked one, say). Only
    the first :data:`PREFIX_CHARS` characters of a token are stored: a longer prefix is compared
    on those (and a whole token by its hash, exactly). Characters are compared as they are (``_``
    and ``%`` are no wildcards). Revoking nothing is an error (:class:`NotFoundError`).
    """
    with conn.transaction():
        user = get_user(conn, name)
        if prefix is None:
            cur = conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL", (user.id,)
            )
        elif len(prefix) == TOKEN_CHARS and prefix.startswith(TOKEN_PREFIX):
            cur = conn.execute(
                "UPDATE api_tokens SET revoked_at = now() "
                "WHERE user_id = %s AND revoked_at IS NULL AND token_hash = %s",
                (user.id, hash_token(prefix)),
            )
        else:
            stored = prefix[:PREFIX_CHARS]
            cur = conn.execute(
                "UPDATE api_tokens SET revoked_at = now() "
                "WHERE user_id = %s AND revoked_at IS NULL AND left(prefix, %s) = %s",
                (user.id, len(stored), stored),
            )
        if cur.rowcount == 0:
            asked = "live token" if prefix is None else f"live token starting with {prefix[:PREFIX_CHARS]!r}"
            raise NotFoundError(f"{name!r} has no {asked}; nothing was revoked")
        return cur.rowcount


def list_users(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT u.name, u.created_at, count(t.id) FILTER (WHERE t.revoked_at IS NULL) AS tokens "
            "FROM users u LEFT JOIN api_tokens t ON t.user_id = u.id GROUP BY u.id ORDER BY u.name"
        ).fetchall()


def authenticate(conn: psycopg.Connection[Any], token: str) -> User:
    """Return the user of a valid, unrevoked token, or raise :class:`AuthError`."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise AuthError("malformed token")
    row = conn.execute(
        "SELECT u.id, u.name FROM api_tokens t JOIN users u ON u.id = t.user_id "
        f"WHERE t.token_hash = %s AND {LIVE_TOKEN_SQL}",
        (hash_token(token),),
    ).fetchone()
    if row is None:
        raise AuthError("unknown or revoked token")
    if isinstance(row, dict):
        return User(row["id"], row["name"])
    return User(row[0], row[1])


def _first(row: Any) -> Any:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]
