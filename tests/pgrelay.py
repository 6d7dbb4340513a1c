"""A TCP relay to PostgreSQL that can break a connection once the server has answered a chosen
statement: the statement ran (in autocommit, it committed) and the client never hears of it."""

from __future__ import annotations

import contextlib
import socket
import threading

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


class CuttingRelay:
    """Relays 127.0.0.1:``port`` to the server of ``url``. After :meth:`cut_after`, the first
    message a client sends that contains the marker dooms its connection: the server's answer is
    dropped and both sides are closed."""

    def __init__(self, url: str) -> None:
        with psycopg.connect(url) as conn:
            host, port = conn.info.host, conn.info.port
        # A host that is a directory is the server's Unix socket.
        self._upstream: str | tuple[str, int] = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        self._url = url
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def url(self) -> str:
        """The conninfo of the same database through the relay."""
        params = conninfo_to_dict(self._url)
        params.update(host="127.0.0.1", port=str(self.port), sslmode="disable")
        return make_conninfo(**params)  # type: ignore[arg-type]

    def cut_after(self, marker: bytes) -> None:
        with self._lock:
            self._marker = marker

    def close(self) -> None:
        self._listener.close()

    def _upstream_socket(self) -> socket.socket:
        if isinstance(self._upstream, str):
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.connect(self._upstream)
            return unix
        return socket.create_connection(self._upstream)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = self._upstream_socket()
            doomed = threading.Event()
            threading.Thread(target=self._to_server, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client, doomed), daemon=True).start()

    def _to_server(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        doomed.set()
                server.sendall(data)

    def _to_client(self, server: socket.socket, client: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if doomed.is_set():
                    with self._lock:
                        self.cuts += 1
                    return
                client.sendall(data)
        except OSError:
            pass
        finally:
            for side in (client, server):
                with contextlib.suppress(OSError):
                    side.shutdown(socket.SHUT_RDWR)
                side.close()
