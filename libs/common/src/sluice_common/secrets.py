"""Per-user secrets, encrypted at rest: store, list (names only), delete, and resolve for the worker.

Values are sealed with AES-256-GCM under the key ``SLUICE_SECRET_KEY`` (32 random bytes in
URL-safe base64). The owner and name are bound in as associated data, so a ciphertext copied to
another row or user does not decrypt. With no key set (development), one is generated on first
use in ``$SLUICE_DATA_DIR/secret.key`` (mode 0600); production deployments set the variable, and
every process that reads secrets (the workers) needs the same key.

Nothing here ever returns a value except :func:`load_secrets`, which the worker uses to resolve
``{{ secrets.NAME }}`` in step configs (and masks the values in what it stores).
"""

from __future__ import annotations

import base64
import os
import re
import secrets as _random
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from sluice_common.db import Pool
from sluice_common.errors import ConfigError, FieldProblem, NotFoundError, ValidationFailed
from sluice_common.settings import Settings

if TYPE_CHECKING:  # imported with the first secret sealed or opened (see _box)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"  # noqa: S105 - a pattern, not a password
MAX_SECRET_BYTES = 16 * 1024
KEY_FILE = "secret.key"
_NONCE = 12

_key_lock = threading.Lock()
_boxes: dict[bytes, AESGCM] = {}


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: its name and when it was set, never its value."""

    name: str
    created_at: datetime
    updated_at: datetime


def generate_key() -> str:
    """A new key for ``SLUICE_SECRET_KEY``."""
    return base64.urlsafe_b64encode(_random.token_bytes(32)).decode()


def _decode_key(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4))


def _dev_key(data_dir: Path) -> bytes:
    """The development key of the data folder, created on first use."""
    path = data_dir / KEY_FILE
    with _key_lock:
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                # O_EXCL: two processes starting together must not write two different keys.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as handle:
                    handle.write(generate_key() + "\n")
        key = _decode_key(path.read_text())
    if len(key) != 32:
        raise ConfigError(f"{path} does not hold a 32-byte key; remove it or set SLUICE_SECRET_KEY")
    return key


def _box(settings: Settings) -> AESGCM:
    # cryptography's OpenSSL binding (some 7 MB of a process's memory) is loaded here, with the first
    # secret sealed or opened, not at import: an API worker or a worker whose runs use no secret
    # never needs it.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _decode_key(settings.secret_key) if settings.secret_key else _dev_key(settings.data_path)
    box = _boxes.get(key)
    if box is None:
        box = _boxes.setdefault(key, AESGCM(key))
    return box


def _aad(owner_id: UUID | str, name: str) -> bytes:
    return f"sluice-secret:{owner_id}:{name}".encode()


def seal(settings: Settings, owner_id: UUID | str, name: str, value: str) -> bytes:
    """Encrypt ``value`` for (owner, name): nonce followed by ciphertext and tag."""
    nonce = _random.token_bytes(_NONCE)
    return nonce + _box(settings).encrypt(nonce, value.encode(), _aad(owner_id, name))


def unseal(settings: Settings, owner_id: UUID | str, name: str, blob: bytes) -> str:
    box = _box(settings)
    from cryptography.exceptions import InvalidTag  # loaded by _box already

    try:
        return box.decrypt(blob[:_NONCE], blob[_NONCE:], _aad(owner_id, name)).decode()
    except InvalidTag:
        raise ConfigError(
            f"secret {name!r} cannot be decrypted: SLUICE_SECRET_KEY differs from the key it was stored with"
        ) from None


def check_name(name: object) -> str:
    if not isinstance(name, str) or not re.fullmatch(SECRET_NAME_PATTERN, name):
        raise ValidationFailed(
            [FieldProblem("$.name", "a secret name is a letter or _ then up to 63 letters, digits or _")]
        )
    return name


def put_secret(pool: Pool, settings: Settings, owner_id: UUID | str, name: str, value: str) -> SecretInfo:
    """Create the secret ``name`` of ``owner_id``, or replace its value. Raises :class:`ValidationFailed`."""
    check_name(name)
    if not isinstance(value, str) or not value:
        raise ValidationFailed([FieldProblem("$.value", "a secret value is a non-empty string")])
    if len(value.encode()) > MAX_SECRET_BYTES:
        raise ValidationFailed([FieldProblem("$.value", f"a secret value is at most {MAX_SECRET_BYTES} bytes")])
    blob = seal(settings, owner_id, name, value)
    with pool.connection() as conn:
        row = conn.execute(
            """
            INSERT INTO user_secrets (owner_id, name, ciphertext) VALUES (%s, %s, %s)
            ON CONFLICT (owner_id, name) DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = now()
            RETURNING name, created_at, updated_at
            """,
            (str(owner_id), name, blob),
        ).fetchone()
    assert row is not None
    return SecretInfo(row["name"], row["created_at"], row["updated_at"])


def list_secrets(pool: Pool, owner_id: UUID | str) -> list[SecretInfo]:
    """The owner's secrets by name, with timestamps; never the values."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT name, created_at, updated_at FROM user_secrets WHERE owner_id = %s ORDER BY name",
            (str(owner_id),),
        ).fetchall()
    return [SecretInfo(r["name"], r["created_at"], r["updated_at"]) for r in rows]


def delete_secret(pool: Pool, owner_id: UUID | str, name: str) -> None:
    """Delete one secret. Raises :class:`NotFoundError` when the owner has no secret of that name."""
    check_name(name)
    with pool.connection() as conn:
        deleted = conn.execute(
            "DELETE FROM user_secrets WHERE owner_id = %s AND name = %s", (str(owner_id), name)
        ).rowcount
    if not deleted:
        raise NotFoundError("no such secret")


def load_secrets(
    pool: Pool, settings: Settings, owner_id: UUID | str, names: list[str] | None = None
) -> dict[str, str]:
    """Decrypted values of the owner's secrets (all, or only ``names``), for the worker's templates."""
    with pool.connection() as conn:
        if names is None:
            rows = conn.execute(
                "SELECT name, ciphertext FROM user_secrets WHERE owner_id = %s", (str(owner_id),)
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT name, ciphertext FROM user_secrets WHERE owner_id = %s AND name = ANY(%s)",
                (str(owner_id), names),
            ).fetchall()
    return {r["name"]: unseal(settings, owner_id, r["name"], bytes(r["ciphertext"])) for r in rows}
