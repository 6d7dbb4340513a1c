"""Users and tokens against a real PostgreSQL, and the ``sluice users`` commands."""

import uuid

import psycopg
import pytest

from sluice_common import users
from sluice_common.errors import AuthError, ConflictError, NotFoundError, ValidationFailed
from tests.conftest import sluice


def name() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def test_create_authenticate_revoke(db: psycopg.Connection[tuple[object, ...]]) -> None:
    n = name()
    issued = users.create_user(db, n)
    assert users.authenticate(db, issued.token) == issued.user
    stored = db.execute("SELECT token_hash FROM api_tokens WHERE user_id = %s", (issued.user.id,)).fetchone()
    assert stored is not None
    assert stored[0] == users.hash_token(issued.token)
    second = users.create_token(db, n, "ci")
    assert users.authenticate(db, second.token).name == n
    assert users.revoke_tokens(db, n, prefix=second.token[:10]) == 1
    with pytest.raises(AuthError):
        users.authenticate(db, second.token)
    assert users.authenticate(db, issued.token).name == n  # the other token still works
    assert users.revoke_tokens(db, n) == 1
    with pytest.raises(AuthError):
        users.authenticate(db, issued.token)


def test_bad_names_and_duplicates(db: psycopg.Connection[tuple[object, ...]]) -> None:
    n = name()
    users.create_user(db, n)
    with pytest.raises(ConflictError):
        users.create_user(db, n)
    with pytest.raises(ValidationFailed):
        users.create_user(db, "no spaces allowed")
    with pytest.raises(NotFoundError):
        users.create_token(db, name())


def test_malformed_and_unknown_tokens(db: psycopg.Connection[tuple[object, ...]]) -> None:
    for token in ("", "Bearer x", "slc_" + "a" * 300, users.new_token()):
        with pytest.raises(AuthError):
            users.authenticate(db, token)


def test_cli_users_create_prints_the_token_last(
    service_env: dict[str, str], db: psycopg.Connection[tuple[object, ...]]
) -> None:
    n = name()
    result = sluice(service_env, "users", "create", n, check=True)
    token = result.stdout.strip().splitlines()[-1]
    assert users.authenticate(db, token).name == n
    again = sluice(service_env, "users", "create", n, check=False)
    assert again.returncode != 0
    assert "already exists" in again.stderr


def test_cli_config_rate_limit_is_shared_through_redis(service_env: dict[str, str]) -> None:
    import redis

    from sluice_common.ratelimit import RedisRateLimiter

    result = sluice(service_env, "config", "rate-limit", "250", check=True)
    assert "rate limit set to 250" in result.stdout
    client = redis.Redis.from_url(service_env["REDIS_URL"])
    try:
        assert RedisRateLimiter(client, service_env["SLUICE_REDIS_PREFIX"], 100).limit() == 250
    finally:
        client.delete(f"{service_env['SLUICE_REDIS_PREFIX']}:ratelimit:per_minute")
        client.close()
    bad = sluice(service_env, "config", "rate-limit", "0", check=False)
    assert bad.returncode == 2
    assert "0 is not in the range x>=1" in bad.stderr


def test_revoking_by_the_whole_token_or_any_prefix_of_it(db: psycopg.Connection[tuple[object, ...]]) -> None:
    n = name()
    leaked = users.create_user(db, n)
    kept = users.create_token(db, n, "kept")
    # The whole leaked token revokes exactly that token.
    assert users.revoke_tokens(db, n, prefix=leaked.token) == 1
    with pytest.raises(AuthError):
        users.authenticate(db, leaked.token)
    assert users.authenticate(db, kept.token).name == n
    # A prefix longer than the stored ten characters still finds its token.
    third = users.create_token(db, n, "third")
    assert users.revoke_tokens(db, n, prefix=third.token[:25]) == 1
    with pytest.raises(AuthError):
        users.authenticate(db, third.token)
    # '_' and '%' are characters, not wildcards (as LIKE patterns these would match the kept
    # token); asking for what matches nothing is an error.
    one_wildcard = next(kept.token[:i] + "_" for i in range(4, 10) if kept.token[i] != "_")
    for pattern in (kept.token[:6] + "%", one_wildcard, "%", "_"):
        with pytest.raises(NotFoundError):
            users.revoke_tokens(db, n, prefix=pattern)
    with pytest.raises(NotFoundError):
        users.revoke_tokens(db, n, prefix=leaked.token)  # already revoked
    assert users.authenticate(db, kept.token).name == n


def test_cli_revoke_by_the_leaked_token_and_refuse_a_miss(
    db: psycopg.Connection[tuple[object, ...]], service_env: dict[str, str]
) -> None:
    n = name()
    issued = users.create_user(db, n)
    done = sluice(service_env, "users", "revoke", n, "--prefix", issued.token, check=False)
    assert done.returncode == 0, done.stderr
    assert "revoked 1 token(s)" in done.stdout
    with pytest.raises(AuthError):
        users.authenticate(db, issued.token)
    missed = sluice(service_env, "users", "revoke", n, "--prefix", issued.token, check=False)
    assert missed.returncode == 1
    assert "nothing was revoked" in missed.stderr
