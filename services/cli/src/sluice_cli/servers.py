"""Where the services find PostgreSQL and Redis: the configured URLs, or the embedded servers.

Only the ``sluice`` command resolves servers; it hands the URLs to the services it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice_cli.embedded import EmbeddedServers
from sluice_common.settings import Settings


@dataclass
class Endpoints:
    """Resolved server URLs, and the embedded servers this process started (to stop on exit)."""

    database_url: str
    redis_url: str
    embedded: EmbeddedServers

    def close(self) -> None:
        self.embedded.stop_started()


def resolve_endpoints(settings: Settings, *, need_redis: bool = True) -> Endpoints:
    """Use ``DATABASE_URL`` / ``REDIS_URL`` when set, else start or find the embedded servers."""
    embedded = EmbeddedServers(settings.data_path)
    try:
        database_url = settings.database_url or embedded.postgres_url()
        redis_url = settings.redis_url or (embedded.redis_url() if need_redis else "")
    except BaseException:
        embedded.stop_started()
        raise
    return Endpoints(database_url, redis_url, embedded)
