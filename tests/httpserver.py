"""A real local HTTP server for steps to call, counting hits per path and keeping the headers of each hit."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

S = TypeVar("S", bound=ThreadingHTTPServer)


class _Handler(BaseHTTPRequestHandler):
    server: LocalServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        key = query.get("key", url.path)
        with self.server.lock:
            self.server.hits[key] += 1
            hit = self.server.hits[key]
            self.server.headers[key].append(dict(self.headers))
        if url.path == "/ok":
            self._reply(200, {"ok": True, "hit": hit, "key": key})
        elif url.path == "/flaky":
            # Fails the first `fail` calls for a key, then succeeds.
            if hit <= int(query.get("fail", "2")):
                self._reply(500, {"error": "flaky", "hit": hit})
            else:
                self._reply(200, {"ok": True, "hit": hit})
        elif url.path == "/fail":
            self._reply(500, {"error": "always"})
        elif url.path == "/slowfail":
            time.sleep(float(query.get("s", "1")))
            self._reply(500, {"error": "slow and failing"})
        elif url.path == "/slow":
            time.sleep(float(query.get("s", "1")))
            self._reply(200, {"slept": float(query.get("s", "1")), "hit": hit})
        else:
            self._reply(404, {"error": "no such path"})


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.headers: defaultdict[str, list[dict[str, str]]] = defaultdict(list)  # of each hit, in order
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def running(server: S) -> Iterator[S]:
    """``server`` serving from a thread of its own until the block ends, then shut and closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve() -> Iterator[LocalServer]:
    with running(LocalServer()) as server:
        yield server
