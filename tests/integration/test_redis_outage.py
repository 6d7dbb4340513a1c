"""A Redis outage seen by the API's wake-up sender: the runs are stored, and the log says so once
per change of state (with counts), not once per failed batch."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from urllib.parse import urlsplit

import pytest

from sluice_common.broker import RUN_QUEUE, WakeupSender, make_broker
from sluice_common.logs import Outage
from tests.conftest import wait_until
from tests.integration.conftest import Pipeline


class Relay:
    """A TCP relay to the real Redis that the test can cut and restore (a Redis outage on cue)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        self.port = server.getsockname()[1]
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            with suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            server.close()
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay(pipeline: Pipeline) -> Iterator[Relay]:
    parts = urlsplit(pipeline.redis_url)
    r = Relay((parts.hostname or "127.0.0.1", parts.port or 6379))
    r.up()
    yield r
    r.down()


def test_a_redis_outage_is_logged_once_each_way_with_counts(
    pipeline: Pipeline, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(pipeline.redis_url)
    url = f"redis://127.0.0.1:{relay.port}{parts.path or '/0'}"
    broker = make_broker(pipeline.settings, url)
    # Fail fast while the relay is down.
    broker.client.connection_pool.connection_kwargs.update(socket_connect_timeout=0.5, socket_timeout=0.5)
    sender = WakeupSender(broker)
    caplog.set_level(logging.WARNING, logger="sluice_common.broker")
    try:
        sender.send("first")
        wait_until(lambda: broker.client.hlen(f"{broker.namespace}:{RUN_QUEUE}.msgs") >= 1, 10)
        relay.down()
        for i in range(30):
            sender.send(f"during-{i}")
            time.sleep(0.02)  # separate batches
        relay.up()
        sender.send("after")
        wait_until(lambda: any("works again" in r.getMessage() for r in caplog.records), 20)
    finally:
        sender.close()
        broker.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "sluice_common.broker"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("sending run wake-ups to Redis failed (")
    assert "the reconciler wakes them" in lines[0]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback at WARNING
    counts = re.search(r"after (\d+) failure\(s\) \((\d+) item\(s\)\)", lines[1])
    assert counts is not None, lines[1]
    failures, items = int(counts[1]), int(counts[2])
    assert 1 <= failures <= items <= 30  # batches of the wake-ups sent while Redis was away


def test_outage_counts_failures_and_items_across_threads(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.outage")
    outage = Outage(log, "calling the thing", "nothing is lost")
    caplog.set_level(logging.WARNING, logger="test.outage")
    threads = [
        threading.Thread(target=lambda: [outage.failed(OSError("refused"), 2) for _ in range(50)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outage.down
    outage.recovered()
    outage.recovered()  # already recovered: says nothing more
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "calling the thing failed (OSError: refused); nothing is lost"
    assert lines[1].startswith("calling the thing works again after 200 failure(s) (400 item(s)) over ")
    assert len(lines) == 2
