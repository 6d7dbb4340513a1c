"""Per-user secrets in PostgreSQL: encrypted at rest, listed by name only, bound to their owner."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from sluice_common.db import Pool, open_pool
from sluice_common.errors import ConfigError, NotFoundError, ValidationFailed
from sluice_common.secrets import delete_secret, generate_key, list_secrets, load_secrets, put_secret
from sluice_common.settings import Settings


@pytest.fixture
def pool(settings: Settings) -> Iterator[Pool]:
    pool = open_pool(settings, settings.database_url or "", name="secrets-test", max_size=2)
    yield pool
    pool.close()


def new_user(pool: Pool) -> str:
    with pool.connection() as conn:
        row = conn.execute(
            "INSERT INTO users (name) VALUES (%s) RETURNING id", (f"s-{uuid.uuid4().hex[:8]}",)
        ).fetchone()
    assert row is not None
    return str(row["id"])


def test_put_list_load_replace_delete(pool: Pool, settings: Settings) -> None:
    alice, bob = new_user(pool), new_user(pool)
    first = put_secret(pool, settings, alice, "API_KEY", "value-1")
    put_secret(pool, settings, alice, "_other", "x")
    put_secret(pool, settings, bob, "API_KEY", "bobs")
    assert [s.name for s in list_secrets(pool, alice)] == ["API_KEY", "_other"]
    assert load_secrets(pool, settings, alice) == {"API_KEY": "value-1", "_other": "x"}
    assert load_secrets(pool, settings, alice, ["API_KEY"]) == {"API_KEY": "value-1"}
    assert load_secrets(pool, settings, bob) == {"API_KEY": "bobs"}
    again = put_secret(pool, settings, alice, "API_KEY", "value-2")
    assert again.created_at == first.created_at
    assert again.updated_at >= first.updated_at
    assert load_secrets(pool, settings, alice)["API_KEY"] == "value-2"
    delete_secret(pool, alice, "API_KEY")
    with pytest.raises(NotFoundError):
        delete_secret(pool, alice, "API_KEY")
    assert [s.name for s in list_secrets(pool, alice)] == ["_other"]


def test_values_are_encrypted_at_rest_and_bound_to_owner_and_name(pool: Pool, settings: Settings) -> None:
    alice, bob = new_user(pool), new_user(pool)
    put_secret(pool, settings, alice, "TOKEN", "plain-text-value")
    with pool.connection() as conn:
        row = conn.execute("SELECT ciphertext FROM user_secrets WHERE owner_id = %s", (alice,)).fetchone()
        assert row is not None
        assert b"plain-text-value" not in bytes(row["ciphertext"])
        # A ciphertext copied to another user does not decrypt there.
        conn.execute(
            "INSERT INTO user_secrets (owner_id, name, ciphertext) VALUES (%s, 'TOKEN', %s)", (bob, row["ciphertext"])
        )
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        load_secrets(pool, settings, bob)
    other_key = settings.model_copy(update={"secret_key": generate_key()})
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        load_secrets(pool, other_key, alice)


def test_a_development_key_is_created_once_in_the_data_folder(pool: Pool, settings: Settings) -> None:
    assert settings.secret_key is None
    user = new_user(pool)
    put_secret(pool, settings, user, "K", "v")
    key_file = settings.data_path / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load_secrets(pool, settings, user) == {"K": "v"}


def test_bad_input_is_refused(pool: Pool, settings: Settings) -> None:
    user = new_user(pool)
    for name in ("", "1abc", "has-dash", "a" * 65, "spaced name"):
        with pytest.raises(ValidationFailed) as info:
            put_secret(pool, settings, user, name, "v")
        assert info.value.problems[0].path == "$.name"
    for value in ("", "x" * 20000):
        with pytest.raises(ValidationFailed) as info:
            put_secret(pool, settings, user, "OK", value)
        assert info.value.problems[0].path == "$.value"
    with pytest.raises(ValidationFailed):
        delete_secret(pool, user, "bad name")
