"""Sluice settings: one typed, frozen object read from the environment, and only here.

Every service and the CLI call :func:`load_settings` once at start-up and pass the result down.
A bad value stops start-up with a :class:`~sluice_common.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice_common.errors import ConfigError

_BIND_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    """All configuration of Sluice. Field aliases are the environment variable names."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=False)

    database_url: Annotated[str | None, Field(validation_alias=_env("DATABASE_URL"))] = None
    redis_url: Annotated[str | None, Field(validation_alias=_env("REDIS_URL"))] = None
    data_dir: Annotated[Path, Field(validation_alias=_env("SLUICE_DATA_DIR"))] = Path(".sluice")
    api_bind: Annotated[str, Field(validation_alias=_env("SLUICE_API_BIND"))] = "127.0.0.1:8000"
    api_workers: Annotated[int, Field(ge=1, le=64, validation_alias=_env("SLUICE_API_WORKERS"))] = 2
    api_threads: Annotated[int, Field(ge=1, le=256, validation_alias=_env("SLUICE_API_THREADS"))] = 4
    api_max_body_bytes: Annotated[
        int, Field(ge=1024, le=64 * 1024 * 1024, validation_alias=_env("SLUICE_API_MAX_BODY_BYTES"))
    ] = 1024 * 1024
    # How long a client has to send a whole request (head and body) before the API answers 408.
    api_request_timeout_seconds: Annotated[
        float, Field(gt=0, le=3600, validation_alias=_env("SLUICE_API_REQUEST_TIMEOUT_SECONDS"))
    ] = 20.0
    # Connections one API worker process holds open (reading, being served or kept alive).
    api_max_connections: Annotated[
        int, Field(ge=1, le=100_000, validation_alias=_env("SLUICE_API_MAX_CONNECTIONS"))
    ] = 1000
    # Requests per minute per API token (and per webhook); 0 turns the limit off.
    api_rate_limit_per_minute: Annotated[
        int, Field(ge=0, validation_alias=_env("SLUICE_API_RATE_LIMIT_PER_MINUTE"))
    ] = 600
    # Where clients reach the API, for the webhook URLs it hands out (else the request's own host).
    public_url: Annotated[str | None, Field(validation_alias=_env("SLUICE_PUBLIC_URL"))] = None
    concurrency: Annotated[int, Field(ge=1, le=1000, validation_alias=_env("SLUICE_CONCURRENCY"))] = 10
    rate_limit_per_minute: Annotated[int, Field(ge=1, validation_alias=_env("SLUICE_RATE_LIMIT_PER_MINUTE"))] = 100
    max_attempts: Annotated[int, Field(ge=1, le=100, validation_alias=_env("SLUICE_MAX_ATTEMPTS"))] = 3
    user_concurrency: Annotated[int, Field(ge=1, le=10000, validation_alias=_env("SLUICE_USER_CONCURRENCY"))] = 5
    priority_aging_seconds: Annotated[
        float, Field(ge=0, le=86400, validation_alias=_env("SLUICE_PRIORITY_AGING_SECONDS"))
    ] = 60.0
    retry_backoff_min_ms: Annotated[
        int, Field(ge=0, le=86_400_000, validation_alias=_env("SLUICE_RETRY_BACKOFF_MIN_MS"))
    ] = 1000
    retry_backoff_max_ms: Annotated[
        int, Field(ge=0, le=86_400_000, validation_alias=_env("SLUICE_RETRY_BACKOFF_MAX_MS"))
    ] = 60_000
    run_timeout_seconds: Annotated[
        int, Field(ge=1, le=7 * 86400, validation_alias=_env("SLUICE_RUN_TIMEOUT_SECONDS"))
    ] = 3600
    lease_seconds: Annotated[float, Field(ge=1, le=600, validation_alias=_env("SLUICE_LEASE_SECONDS"))] = 15.0
    # How long a stopping worker waits for its runs' current steps to end; under the deployments'
    # grace period (60 s), so that the worker says which runs it leaves before it is killed.
    stop_grace_seconds: Annotated[float, Field(ge=0, le=86400, validation_alias=_env("SLUICE_STOP_GRACE_SECONDS"))] = (
        50.0
    )
    reconcile_seconds: Annotated[float, Field(gt=0, le=3600, validation_alias=_env("SLUICE_RECONCILE_SECONDS"))] = 5.0
    redis_prefix: Annotated[str, Field(min_length=1, validation_alias=_env("SLUICE_REDIS_PREFIX"))] = "sluice"
    db_pool_min: Annotated[int, Field(ge=0, le=100, validation_alias=_env("SLUICE_DB_POOL_MIN"))] = 1
    db_pool_max: Annotated[int, Field(ge=1, le=200, validation_alias=_env("SLUICE_DB_POOL_MAX"))] = 10
    # How long a request (or any caller) waits for a PostgreSQL connection before giving up: an API
    # request then answers 503 at once instead of committing long after its client has left.
    db_pool_timeout_seconds: Annotated[
        float, Field(gt=0, le=300, validation_alias=_env("SLUICE_DB_POOL_TIMEOUT_SECONDS"))
    ] = 5.0
    log_level: Annotated[str, Field(validation_alias=_env("SLUICE_LOG_LEVEL"))] = "INFO"
    # One line per record: ``text`` for people (the default, and ``sluice dev``), ``json`` for log
    # collectors (the images set it).
    log_format: Annotated[Literal["text", "json"], Field(validation_alias=_env("SLUICE_LOG_FORMAT"))] = "text"
    # Engine
    step_timeout_seconds: Annotated[
        float, Field(gt=0, le=7 * 86400, validation_alias=_env("SLUICE_STEP_TIMEOUT_SECONDS"))
    ] = 300.0
    step_output_max_bytes: Annotated[
        int, Field(ge=1024, le=64 * 2**20, validation_alias=_env("SLUICE_STEP_OUTPUT_MAX_BYTES"))
    ] = 256 * 1024
    http_allow_private: Annotated[bool, Field(validation_alias=_env("SLUICE_HTTP_ALLOW_PRIVATE"))] = False
    http_allow_hosts: Annotated[str, Field(validation_alias=_env("SLUICE_HTTP_ALLOW_HOSTS"))] = ""
    secret_key: Annotated[str | None, Field(validation_alias=_env("SLUICE_SECRET_KEY"), repr=False)] = None
    workflow_max_depth: Annotated[int, Field(ge=1, le=50, validation_alias=_env("SLUICE_WORKFLOW_MAX_DEPTH"))] = 5
    # Scheduler
    cron_priority: Annotated[int, Field(ge=1, le=10, validation_alias=_env("SLUICE_CRON_PRIORITY"))] = 7
    run_retention_days: Annotated[float, Field(gt=0, validation_alias=_env("SLUICE_RUN_RETENTION_DAYS"))] = 30.0
    scheduler_lease_seconds: Annotated[
        float, Field(ge=1, le=60, validation_alias=_env("SLUICE_SCHEDULER_LEASE_SECONDS"))
    ] = 8.0
    cron_late_tolerance_seconds: Annotated[
        float, Field(ge=0, le=86400, validation_alias=_env("SLUICE_CRON_LATE_TOLERANCE_SECONDS"))
    ] = 60.0
    # Tracing is configured by the standard OTEL_* variables (sluice_common.tracing); this adds
    # PostgreSQL and Redis client spans to the traces, several per run, so it is off by default.
    trace_clients: Annotated[bool, Field(validation_alias=_env("SLUICE_TRACE_CLIENTS"))] = False
    # Metrics: the worker's and the scheduler's /metrics listener (none when the port is unset;
    # the images set it), and per-workflow labels (one series per workflow: off by default).
    metrics_port: Annotated[int | None, Field(ge=0, le=65535, validation_alias=_env("SLUICE_METRICS_PORT"))] = None
    metrics_host: Annotated[str, Field(min_length=1, validation_alias=_env("SLUICE_METRICS_HOST"))] = "127.0.0.1"
    metrics_workflow_labels: Annotated[bool, Field(validation_alias=_env("SLUICE_METRICS_WORKFLOW_LABELS"))] = False
    # Alerts: where the scheduler's leader posts each alert that starts or ends (none when unset),
    # and how often it evaluates them. Hidden from repr: such URLs often carry a token.
    alert_webhook_url: Annotated[str | None, Field(validation_alias=_env("SLUICE_ALERT_WEBHOOK_URL"), repr=False)] = (
        None
    )
    alert_interval_seconds: Annotated[
        float, Field(ge=1, le=3600, validation_alias=_env("SLUICE_ALERT_INTERVAL_SECONDS"))
    ] = 15.0
    # The dashboard's session cookie: sent only over HTTPS when true (set it behind a TLS proxy),
    # and how long a sign-in lasts.
    dashboard_secure_cookie: Annotated[bool, Field(validation_alias=_env("SLUICE_DASHBOARD_SECURE_COOKIE"))] = False
    dashboard_session_hours: Annotated[
        float, Field(gt=0, le=24 * 90, validation_alias=_env("SLUICE_DASHBOARD_SESSION_HOURS"))
    ] = 12.0
    # The API's own metrics: its HTTP middleware, the runs it creates and ``GET /metrics`` (off: none).
    api_metrics: Annotated[bool, Field(validation_alias=_env("SLUICE_API_METRICS"))] = True

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("api_bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        match = _BIND_RE.match(value)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError("must be HOST:PORT, for example 127.0.0.1:8000")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("alert_webhook_url")
    @classmethod
    def _check_alert_webhook_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        try:
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a port that is not a number, or out of range
            valid = False
        if not valid:
            raise ValueError("must be an http:// or https:// URL, for example https://alerts.example.com/sluice")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _check_log_format(cls, value: object) -> object:
        if not isinstance(value, str) or value.strip().lower() not in ("text", "json"):
            raise ValueError("must be text or json")
        return value.strip().lower()

    @field_validator("http_allow_hosts")
    @classmethod
    def _check_allow_hosts(cls, value: str) -> str:
        for host in (h.strip() for h in value.split(",")):
            if host and not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+", host):
                raise ValueError(f"{host!r} is not a host name or address (give a comma-separated list)")
        return value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        try:
            raw = base64.urlsafe_b64decode(value.encode() + b"=" * (-len(value) % 4))
        except (ValueError, binascii.Error):
            raw = b""
        if len(raw) != 32:
            raise ValueError("must be 32 random bytes in URL-safe base64 (see docs/engine.md)")
        return value

    @model_validator(mode="after")
    def _check_backoff(self) -> Settings:
        if self.retry_backoff_min_ms > self.retry_backoff_max_ms:
            raise ValueError("SLUICE_RETRY_BACKOFF_MIN_MS must not exceed SLUICE_RETRY_BACKOFF_MAX_MS")
        return self

    @property
    def http_allowed_hosts(self) -> frozenset[str]:
        """Hosts (names or addresses, lower case) that HTTP steps may reach even when private."""
        return frozenset(h.strip().lower().strip("[]") for h in self.http_allow_hosts.split(",") if h.strip())

    @property
    def data_path(self) -> Path:
        """The data folder as an absolute path (embedded servers, dev token)."""
        return self.data_dir.expanduser().resolve()


@dataclass(frozen=True)
class ServerUrls:
    """Where a service finds PostgreSQL and Redis (``redis_url`` is empty when it needs none)."""

    database_url: str
    redis_url: str


def server_urls(settings: Settings, *, need_redis: bool = True) -> ServerUrls:
    """The configured server URLs; a missing one is a :class:`ConfigError`.

    Services take their servers as given. The ``sluice`` command is what starts the embedded
    servers when ``DATABASE_URL`` / ``REDIS_URL`` are unset, and hands their URLs to the service.
    """
    missing = [
        name
        for name, value in (("DATABASE_URL", settings.database_url), ("REDIS_URL", settings.redis_url))
        if not value and (need_redis or name == "DATABASE_URL")
    ]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: point the service at its "
            "servers, or start it with the sluice command, which starts the embedded servers for a missing URL"
        )
    return ServerUrls(settings.database_url or "", settings.redis_url or "")


def _variable_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``environ`` (default: the process environment).

    Raises :class:`ConfigError` with one line per bad variable.
    """
    try:
        if environ is None:
            return Settings()
        names = {
            str(info.validation_alias.choices[0])
            for info in Settings.model_fields.values()
            if isinstance(info.validation_alias, AliasChoices)
        }
        values = {k: v for k, v in environ.items() if k in names}
        # Reading from an explicit mapping must not fall back to the real environment.
        return Settings.model_validate(values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = _variable_name(err["loc"])
            # A value hidden from repr (a key, a URL with a token) stays out of the message too.
            hidden = any(
                not info.repr and name in (field, *getattr(info.validation_alias, "choices", ()))
                for field, info in Settings.model_fields.items()
            )
            got = "value hidden" if hidden else f"got {err.get('input')!r}"
            lines.append(f"{name}: {err['msg']} ({got})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
