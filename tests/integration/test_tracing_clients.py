"""``SLUICE_TRACE_CLIENTS``: PostgreSQL and Redis client spans, on the services' own pool and clients.

Tracing sets a process-wide provider, so the traced process is a child of the test; it exports to
a real OTLP receiver in the test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import Servers, process_env, wait_until
from tests.otlp import receive

pytestmark = pytest.mark.integration

PROBE = textwrap.dedent(
    """
    import redis
    from sluice_common import tracing
    from sluice_common.db import open_pool
    from sluice_common.settings import load_settings, server_urls

    settings = load_settings()
    urls = server_urls(settings)
    assert tracing.configure_tracing("sluice-probe", trace_clients=settings.trace_clients)
    pool = open_pool(settings, urls.database_url, name="probe")
    client = redis.Redis.from_url(urls.redis_url)
    with tracing.span("probe"):
        with pool.connection() as conn:
            assert conn.execute("SELECT 41 + 1 AS answer").fetchone()["answer"] == 42
        client.ping()
    pool.close()
    tracing.shutdown_tracing()
    """
)


@pytest.mark.parametrize("on", [True, False])
def test_client_spans_only_when_turned_on(servers: Servers, fresh_database: str, redis_prefix: str, on: bool) -> None:
    with receive() as receiver:
        env = process_env(
            fresh_database,
            servers.redis_url,
            redis_prefix,
            SLUICE_TRACE_CLIENTS=str(on).lower(),
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        )
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        spans = wait_until(receiver.received, timeout=10)
    (probe,) = [s for s in spans if s.name == "probe"]
    children = [s for s in spans if s.parent_span_id == probe.span_id]
    systems = {s.attributes.get("db.system") or s.attributes.get("db.system.name") for s in children}
    if on:
        assert {"postgresql", "redis"} <= systems
        assert all(s.kind == 3 and s.trace_id == probe.trace_id for s in children)  # client spans
    else:
        assert children == []
