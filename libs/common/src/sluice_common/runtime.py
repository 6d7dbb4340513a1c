"""Where a process finds PostgreSQL and Redis: the configured URLs, or the embedded servers."""

from __future__ import annotations

from dataclasses import dataclass

from sluice_common.embedded import EmbeddedServers
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
