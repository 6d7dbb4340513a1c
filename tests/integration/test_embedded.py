"""The embedded default: real PostgreSQL and Redis from wheels, found again by later processes."""

from pathlib import Path

import psutil
import psycopg
import redis

from sluice_cli.embedded import EmbeddedServers


def test_start_reuse_and_stop(tmp_path: Path) -> None:
    first = EmbeddedServers(tmp_path / "data")
    try:
        pg_url = first.postgres_url()
        redis_url = first.redis_url()
        assert sorted(first.started) == ["postgres", "redis"]
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("sluice",)
        client = redis.Redis.from_url(redis_url)
        assert client.set("k", "v")
        client.close()

        # Another process (here: object) of the same data folder finds them instead of starting new ones.
        second = EmbeddedServers(tmp_path / "data")
        assert second.postgres_url() == pg_url
        assert second.redis_url() == redis_url
        assert second.started == []
        second.stop_started()  # stops nothing it did not start
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        redis_pid = first.redis_pid()
        pg_pid = first.postgres_pid()
    finally:
        first.stop_started()
    assert redis_pid is not None
    assert pg_pid is not None
    assert not psutil.pid_exists(redis_pid)
    assert not psutil.pid_exists(pg_pid)

    # Data survives a restart: Redis keeps an append-only file in the data folder.
    again = EmbeddedServers(tmp_path / "data")
    try:
        client = redis.Redis.from_url(again.redis_url())
        assert client.get("k") == b"v"
        client.close()
    finally:
        again.stop_started()
