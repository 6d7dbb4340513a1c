"""The ``sluice`` command line.

``sluice dev`` runs the whole system locally; ``sluice api|worker|scheduler|standalone`` run one
service each (what the images run); ``sluice migrate`` and ``sluice users ...`` manage the database.
Every command resolves the servers first (:mod:`sluice_cli.servers`: the configured URLs, else the
embedded servers, started if needed). Services are started as ``python -m sluice_<service>`` with
the resolved ``DATABASE_URL`` / ``REDIS_URL`` in their environment, so this module never imports them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
import psycopg

from sluice_cli.servers import Endpoints, resolve_endpoints
from sluice_cli.supervisor import Child, Supervisor
from sluice_common import users
from sluice_common.db import migrate, pending_migrations
from sluice_common.errors import SluiceError
from sluice_common.logs import LogFormat, configure_logging
from sluice_common.settings import Settings, load_settings

if TYPE_CHECKING:
    from sluice_common.cron import RedisSchedulerLink

T = TypeVar("T")
SERVICES = ("api", "worker", "scheduler")
DEV_USER = "dev"


def _settings(log_format: LogFormat | None = None) -> Settings:
    """The settings, with logging set up (in ``log_format`` when given, else as configured)."""
    try:
        settings = load_settings()
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(settings.log_level, "cli", log_format or settings.log_format)
    return settings


@contextlib.contextmanager
def _endpoints(settings: Settings, *, need_redis: bool = True) -> Iterator[Endpoints]:
    try:
        endpoints = resolve_endpoints(settings, need_redis=need_redis)
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield endpoints
    finally:
        endpoints.close()


@contextlib.contextmanager
def _connect(endpoints: Endpoints) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(endpoints.database_url) as conn:
        yield conn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sluice-cli", prog_name="sluice")
def main() -> None:
    """Sluice: a self-hosted workflow runner."""


@main.command("migrate")
@click.option("--check", is_flag=True, help="Apply nothing; exit 1 when a migration is pending.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Apply nothing; wait until no migration is pending (the migration job's work), at most SECONDS.",
)
def migrate_cmd(check: bool, wait: float | None) -> None:
    """Apply pending database migrations (safe to run from several processes at once)."""
    settings = _settings()
    with _endpoints(settings, need_redis=False) as endpoints:
        try:
            if check or wait is not None:
                _await_migrations(endpoints.database_url, wait or 0.0)
                return
            applied = migrate(endpoints.database_url)
        except SluiceError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


def _await_migrations(database_url: str, seconds: float) -> None:
    """Return once no migration is pending; exit 1 naming them when ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    told = False
    while True:
        try:
            pending = pending_migrations(database_url)
        except SluiceError as exc:
            # A database that is still starting is something to wait for too.
            if time.monotonic() >= deadline:
                raise
            pending, reason = [], str(exc)
        else:
            reason = ""
        if not pending and not reason:
            click.echo("migrations: up to date")
            return
        if time.monotonic() >= deadline:
            click.echo(f"migrations pending: {', '.join(pending)}", err=True)
            sys.exit(1)
        if not told:
            click.echo(f"waiting for migrations: {reason or ', '.join(pending)}", err=True)
            told = True
        time.sleep(1.0)


# users ---------------------------------------------------------------------------------------


@main.group("users")
def users_group() -> None:
    """Manage users and their API tokens."""


def _users_call(fn_name: str, *args: object) -> object:
    settings = _settings()
    with _endpoints(settings, need_redis=False) as endpoints:
        migrate(endpoints.database_url)
        with _connect(endpoints) as conn:
            try:
                return getattr(users, fn_name)(conn, *args)
            except SluiceError as exc:
                raise click.ClickException(str(exc)) from None


@users_group.command("create")
@click.argument("name")
def users_create(name: str) -> None:
    """Create a user; the last line printed is its API token (shown only once)."""
    issued = _users_call("create_user", name)
    assert isinstance(issued, users.IssuedToken)
    click.echo(f"created user {name!r}; its API token (store it now, it is not shown again):")
    click.echo(issued.token)


@users_group.command("token")
@click.argument("name")
@click.option("--label", help="A note to tell this token apart.")
def users_token(name: str, label: str | None) -> None:
    """Issue another token for a user; the last line printed is the token."""
    issued = _users_call("create_token", name, label)
    assert isinstance(issued, users.IssuedToken)
    click.echo(f"new API token for {name!r}:")
    click.echo(issued.token)


@users_group.command("revoke")
@click.argument("name")
@click.option("--prefix", help="Revoke only tokens starting with this (default: all).")
def users_revoke(name: str, prefix: str | None) -> None:
    """Revoke a user's tokens."""
    count = _users_call("revoke_tokens", name, prefix)
    click.echo(f"revoked {count} token(s) of {name!r}")


@users_group.command("list")
def users_list() -> None:
    """List users and how many live tokens each has."""
    rows = _users_call("list_users")
    assert isinstance(rows, list)
    for row in rows:
        click.echo(f"{row['name']}\t{row['tokens']} token(s)\tcreated {row['created_at']:%Y-%m-%d}")


# services ------------------------------------------------------------------------------------


def _service_argv(service: str) -> list[str]:
    module = f"sluice_{service}"
    if importlib.util.find_spec(module) is None:
        raise click.ClickException(f"the {service} service is not installed here (package sluice-{service})")
    return [sys.executable, "-m", module]


def _run_service(service: str, *, need_redis: bool = True) -> None:
    """Run one service in this process's place, or as a child on the embedded servers if a URL is unset."""
    settings = _settings()
    argv = _service_argv(service)
    if settings.database_url and (settings.redis_url or not need_redis):
        os.execv(argv[0], argv)  # noqa: S606 - replaces this process with the service
    with _endpoints(settings, need_redis=need_redis) as endpoints:
        env = {**os.environ, "DATABASE_URL": endpoints.database_url}
        if need_redis:
            env["REDIS_URL"] = endpoints.redis_url
        sup = Supervisor([Child(service, argv)], env)
        raise SystemExit(_supervise(sup))


def _supervise(sup: Supervisor) -> int:
    previous = {sig: signal.signal(sig, sup.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sup.start()
        status = sup.wait()
    finally:
        sup.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


@main.command("api")
def api_cmd() -> None:
    """Run the HTTP API (gunicorn)."""
    _run_service("api")


@main.command("worker")
def worker_cmd() -> None:
    """Run a worker process."""
    _run_service("worker")


@main.group("scheduler", invoke_without_command=True)
@click.pass_context
def scheduler_group(ctx: click.Context) -> None:
    """Run the cron scheduler (no subcommand), or talk to the running ones."""
    if ctx.invoked_subcommand is None:
        _run_service("scheduler")


@scheduler_group.command("refresh")
def scheduler_refresh() -> None:
    """Make the scheduler reload every cron trigger from the database now."""
    _with_scheduler_link(lambda link: link.refresh())
    click.echo("refresh requested; the leading scheduler reloads every cron trigger")


@scheduler_group.command("status")
def scheduler_status() -> None:
    """Print whether a scheduler leads and how many cron workflows it schedules (JSON)."""
    import json

    status = _with_scheduler_link(lambda link: link.status())
    click.echo(json.dumps(status))


def _with_scheduler_link(action: Callable[[RedisSchedulerLink], T]) -> T:
    import redis

    from sluice_common.cron import RedisSchedulerLink

    settings = _settings()
    with _endpoints(settings) as endpoints:
        client = redis.Redis.from_url(endpoints.redis_url)
        try:
            return action(RedisSchedulerLink(client, settings))
        except redis.RedisError as exc:
            raise click.ClickException(f"cannot reach Redis: {exc}") from None
        finally:
            client.close()


@main.command("standalone")
def standalone_cmd() -> None:
    """Run everything in one process on PostgreSQL alone (no Redis): api, worker threads, scheduler."""
    _run_service("standalone", need_redis=False)


def _ensure_dev_token(endpoints: Endpoints, token_file: Path) -> str:
    if token_file.exists():
        return token_file.read_text().strip()
    with _connect(endpoints) as conn:
        try:
            issued = users.create_user(conn, DEV_USER)
        except SluiceError:
            issued = users.create_token(conn, DEV_USER, "dev")
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600)
    token_file.write_text(issued.token + "\n")
    return issued.token


def _dev_metrics_ports(settings: Settings) -> dict[str, int]:
    """The worker's and the scheduler's metrics ports: SLUICE_METRICS_PORT and the next one (none unset)."""
    if settings.metrics_port is None:
        return {}
    return {"worker": settings.metrics_port, "scheduler": settings.metrics_port + 1}


def _dev_metrics_env(port: int | None) -> dict[str, str]:
    return {} if port is None else {"SLUICE_METRICS_PORT": str(port)}


def _dev_metrics_note(settings: Settings, ports: dict[str, int]) -> str:
    host, port = settings.api_bind.rsplit(":", 1)
    api = [f"http://{host}:{port}/metrics (API)"] if settings.api_metrics else []
    if not ports:
        if not api:
            return "Metrics: off (SLUICE_API_METRICS=false, SLUICE_METRICS_PORT unset)."
        return f"Metrics: {api[0]}; set SLUICE_METRICS_PORT for the worker's and the scheduler's."
    listen = settings.metrics_host
    return "Metrics: " + ", ".join(api + [f"http://{listen}:{p}/metrics ({name})" for name, p in ports.items()]) + "."


@main.command("dev")
def dev_cmd() -> None:
    """Run the whole system locally: embedded servers if needed, migrations, all services."""
    # Text, whatever the environment says: the lines of all services are merged with a prefix each,
    # for a person to read.
    settings = _settings(log_format="text")
    metrics = _dev_metrics_ports(settings)
    # The API's gunicorn workers share their metric values through files: a fresh folder per session.
    with _endpoints(settings) as endpoints, tempfile.TemporaryDirectory(prefix="sluice-api-metrics-") as api_metrics:
        child_env = {name: _dev_metrics_env(metrics.get(name)) for name in SERVICES}
        child_env["api"] = {"PROMETHEUS_MULTIPROC_DIR": os.environ.get("PROMETHEUS_MULTIPROC_DIR") or api_metrics}
        children = [Child(name, _service_argv(name), child_env[name]) for name in SERVICES]
        try:
            migrate(endpoints.database_url)
        except SluiceError as exc:
            raise click.ClickException(str(exc)) from None
        token_file = settings.data_path / "dev-token"
        _ensure_dev_token(endpoints, token_file)
        host, port = settings.api_bind.rsplit(":", 1)
        click.echo(
            f"Sluice is starting: open http://{host}:{port}/ in a browser and sign in with the dev user's\n"
            f"API token, in {token_file}. The JSON API is under /api (try /api/ready); send the token as\n"
            f'  -H "Authorization: Bearer $(cat {token_file})"\n'
            f"{_dev_metrics_note(settings, metrics)}\n"
            "Press Ctrl-C to stop.",
            err=True,
        )
        env = {
            # The multiprocess folder is the API's alone: the worker and the scheduler are one process each.
            **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            "DATABASE_URL": endpoints.database_url,
            "REDIS_URL": endpoints.redis_url,
            "SLUICE_LOG_FORMAT": "text",
        }
        sup = Supervisor(children, env)
        status = _supervise(sup)
    click.echo("Sluice stopped.", err=True)
    raise SystemExit(status)


@main.group("config")
def config_group() -> None:
    """Change settings of a running system (shared through Redis)."""


@config_group.command("rate-limit")
@click.argument("per_minute", type=click.IntRange(min=1))
def config_rate_limit(per_minute: int) -> None:
    """Set the global limit of run starts per minute, effective at once on every worker."""
    import redis

    from sluice_common.broker import make_broker
    from sluice_common.db import open_pool
    from sluice_common.ratelimit import RedisRateLimiter
    from sluice_common.runs import change_rate_limit

    settings = _settings()
    with _endpoints(settings) as endpoints:
        client = redis.Redis.from_url(endpoints.redis_url)
        pool = open_pool(settings, endpoints.database_url, name="cli")
        broker = make_broker(settings, endpoints.redis_url)
        try:
            limiter = RedisRateLimiter(client, settings.redis_prefix, settings.rate_limit_per_minute)
            woken = change_rate_limit(pool, broker, limiter, per_minute)
        finally:
            broker.close()
            pool.close()
            client.close()
    click.echo(f"rate limit set to {per_minute} run starts per minute ({woken} held-back run(s) woken)")


@main.group("embedded")
def embedded_group() -> None:
    """Manage the embedded PostgreSQL and Redis of the data folder."""


@embedded_group.command("stop")
def embedded_stop() -> None:
    """Stop the embedded servers of $SLUICE_DATA_DIR, whoever started them."""
    from sluice_cli.embedded import EmbeddedServers

    EmbeddedServers(_settings().data_path).stop_all()
    click.echo("embedded servers stopped")


if __name__ == "__main__":
    main()
