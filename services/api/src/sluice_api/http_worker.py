"""The API's gunicorn worker: gthread, except that a thread gets a connection only once its request is in.

gunicorn's gthread worker hands every new or newly readable connection to a thread, which then
reads the request with blocking calls and no time limit: a client that sends its request slowly,
or not at all, holds one of the few threads for as long as it likes, and a few dozen of them stop
the API. :class:`BufferingWorker` keeps gthread (its threads, keep-alive, graceful stop, the app
as is) and moves the reading into the worker's event loop:

- each connection's request head and body are read without blocking into a buffer, by the same
  selector loop that already watches the kept-alive connections;
- a request that has not arrived in full within ``request_timeout`` seconds is answered 408 (or,
  when nothing came at all, the connection is closed), so a stalled client holds a file
  descriptor and a small buffer for a bounded time, never a thread;
- a connection goes to the thread pool when its whole request is buffered; the bytes are replayed
  to gunicorn's own parser, which then never waits on the socket;
- a body over ``max_body_bytes`` (declared, or counted while de-chunking) is answered 413 here
  without buffering it, as is a head larger than gunicorn's own header limits allow (431); like
  the app's, these answers carry an ``X-Request-Id`` (the client's when its head was read);
- gunicorn's ``worker_connections`` caps the connections a worker holds open.

:class:`RequestBuffer` is the part that decides where a request ends; it knows nothing of sockets.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import re
import selectors
import socket
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, ThreadWorker

from sluice_api import requestid
from sluice_api.problems import PROBLEM_JSON, problem_body

_HEX = re.compile(rb"[0-9A-Fa-f]+")
# gunicorn's own bounds (gunicorn.http.message): the request line when "unlimited", the field count.
_MAX_REQUEST_LINE = 8190
_MAX_HEADERS = 32768
_DEFAULT_FIELD_SIZE = 8190
# A chunk-size line is a few hex digits and rarely extensions; gunicorn refuses one over this.
_MAX_CHUNK_LINE = 8192
# Framing of a chunked body allowed on top of its data before the buffer counts as too large.
_CHUNK_OVERHEAD = 64 * 1024
_RECV = 64 * 1024
# After answering an error here, how long and how much of the unwanted request is read and
# dropped before closing: closing with unread data makes the kernel reset the connection, and the
# client may then never see the answer.
_LINGER_SECONDS = 2.0
_LINGER_MAX_BYTES = 16 * 1024 * 1024


class Framing(enum.Enum):
    """What a :class:`RequestBuffer` knows about the request after the bytes seen so far."""

    MORE = "more"  # not complete yet
    READY = "ready"  # head and body are all buffered
    HAND_OVER = "hand over"  # a head gunicorn refuses by itself (400, 417): hand it over as it is
    BODY_TOO_LARGE = "413"
    HEAD_TOO_LARGE = "431"
    TRUNCATED = "400"  # the client stopped sending (half-closed) before the request was whole


class RequestBuffer:
    """The bytes of one HTTP/1.1 request as they arrive, and whether they make a whole request.

    Only the framing is read (``Content-Length``, ``Transfer-Encoding``, ``Expect``, the version);
    anything gunicorn refuses from the head alone is passed on for gunicorn to answer. Bytes after
    the request (a pipelined next one) stay in :attr:`data`.
    """

    def __init__(self, max_head: int, max_body: int, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.expects_continue = False  # the client waits for "100 Continue" before its body
        self.request_id: str | None = None  # the head's X-Request-Id (repeated ones joined, as WSGI does)
        self._max_head = max_head
        self._max_body = max_body
        self._scanned = 0  # how far the search for the head's end got
        self._head_end = -1
        self._end = -1  # with Content-Length (or none): where the request ends
        self._chunked = False
        self._pos = 0  # chunked: where the next chunk-size line (or the trailers) starts
        self._trailers = False
        self._body = 0  # chunked: data bytes so far

    def feed(self, data: bytes) -> Framing:
        self.data += data
        return self.check()

    def check(self) -> Framing:
        if self._head_end < 0:
            idx = self.data.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if idx < 0:
                self._scanned = len(self.data)
                return Framing.HEAD_TOO_LARGE if len(self.data) > self._max_head else Framing.MORE
            if idx + 4 > self._max_head:
                return Framing.HEAD_TOO_LARGE
            self._head_end = idx + 4
            verdict = self._read_head(bytes(self.data[:idx]))
            if verdict is not None:
                return verdict
        if self._chunked:
            return self._scan_chunks()
        return Framing.READY if len(self.data) >= self._end else Framing.MORE

    def _read_head(self, head: bytes) -> Framing | None:
        lines = head.split(b"\r\n")
        version = lines[0].rpartition(b" ")[2]
        length: bytes | None = None
        codings: list[bytes] = []
        expect: bytes | None = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return Framing.HAND_OVER  # not a header field: gunicorn answers 400
            key = name.lower()
            if key == b"content-length":
                if length is not None:
                    return Framing.HAND_OVER
                length = value.strip(b" \t")
            elif key == b"transfer-encoding":
                codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
            elif key == b"expect":
                expect = value.strip(b" \t").lower()
            elif key == b"x-request-id":
                given = value.strip(b" \t").decode("latin-1")
                self.request_id = given if self.request_id is None else f"{self.request_id}, {given}"
        if expect is not None and expect != b"100-continue":
            return Framing.HAND_OVER  # 417
        if codings:
            # gunicorn reads a body only when chunked is the last coding, once, without a
            # Content-Length, in HTTP/1.1; every other combination it refuses from the head.
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1 or length is not None:
                return Framing.HAND_OVER
            if version != b"HTTP/1.1":
                return Framing.HAND_OVER
            self._chunked = True
            self._pos = self._head_end
            self.expects_continue = expect is not None
            return None
        size = 0
        if length is not None:
            if not length.isdigit():
                return Framing.HAND_OVER
            size = int(length)
            if size > self._max_body:
                return Framing.BODY_TOO_LARGE
        self._end = self._head_end + size
        self.expects_continue = expect is not None and size > 0 and version == b"HTTP/1.1"
        return None

    def _scan_chunks(self) -> Framing:
        data = self.data
        while True:
            if self._trailers:
                if len(data) < self._pos + 2:
                    return Framing.MORE
                if data[self._pos : self._pos + 2] == b"\r\n":
                    return Framing.READY
                if data.find(b"\r\n\r\n", self._pos) >= 0:
                    return Framing.READY
                return Framing.HAND_OVER if len(data) - self._pos > self._max_head else Framing.MORE
            idx = data.find(b"\r\n", self._pos)
            if idx < 0:
                return Framing.HAND_OVER if len(data) - self._pos > _MAX_CHUNK_LINE else Framing.MORE
            digits = bytes(data[self._pos : idx]).split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.fullmatch(digits):
                return Framing.HAND_OVER  # gunicorn answers 400 from the line alone
            size = int(digits, 16)
            if size == 0:
                self._trailers = True
                self._pos = idx + 2
                continue
            if self._body + size > self._max_body:
                return Framing.BODY_TOO_LARGE
            end = idx + 2 + size
            if len(data) < end + 2:
                if len(data) > self._head_end + self._max_body + _CHUNK_OVERHEAD:
                    return Framing.BODY_TOO_LARGE
                return Framing.MORE
            if data[end : end + 2] != b"\r\n":
                return Framing.HAND_OVER
            self._body += size
            self._pos = end + 2


def max_head_bytes(cfg: Any) -> int:
    """The largest request head gunicorn's parser accepts with this configuration."""
    line = cfg.limit_request_line
    line = _MAX_REQUEST_LINE if line <= 0 or line > _MAX_REQUEST_LINE else line
    fields = cfg.limit_request_fields
    fields = _MAX_HEADERS if fields <= 0 or fields > _MAX_HEADERS else fields
    size = cfg.limit_request_field_size
    size = _DEFAULT_FIELD_SIZE if size <= 0 else size
    return line + 2 + fields * (size + 2) + 4


def error_response(status: int, title: str, detail: str, request_id: str | None = None) -> bytes:
    """A whole HTTP/1.1 problem response that closes the connection (``request_id``: the request's
    ``X-Request-Id``, kept if acceptable, else one is made)."""
    body = json.dumps(problem_body(status, title, detail, title.lower().replace(" ", "-"))).encode()
    head = (
        f"HTTP/1.1 {status} {title}\r\nContent-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\n{requestid.HEADER}: {requestid.request_id(request_id)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Reading:
    __slots__ = ("buffer", "continued", "deadline")

    def __init__(self, buffer: RequestBuffer, deadline: float) -> None:
        self.buffer = buffer
        self.deadline = deadline
        self.continued = False


class BufferingWorker(ThreadWorker):  # type: ignore[misc]
    """gthread whose threads only ever see fully received requests (see the module docstring).

    Configured by subclassing (:func:`buffering_worker`): gunicorn instantiates the class itself.
    """

    request_timeout: float = 20.0
    max_body_bytes: int = 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Insertion order is deadline order: every deadline is its start plus the same timeout.
        self._reading: dict[Any, _Reading] = {}
        self._lingering: dict[Any, tuple[float, int]] = {}
        self._max_head = max_head_bytes(self.cfg)
        self._stopping = False
        # TLS, HTTP/2, the PROXY protocol and uwsgi frame their bytes differently: those stay plain gthread.
        self._buffers = (
            not self.cfg.is_ssl
            and getattr(self.cfg, "protocol", "http") == "http"
            and getattr(self.cfg, "proxy_protocol", "off") in ("off", False, None)
            and getattr(self.cfg, "http2_cleartext", "off") in ("off", False, None)
        )

    # -- reading a request on the event loop ---------------------------------------------------

    def enqueue_req(self, conn: Any) -> None:
        """Called for a new connection, a kept-alive one that turned readable, and one whose
        parser still holds bytes read ahead (pipelining): read its request before a thread runs."""
        if not self._buffers:
            super().enqueue_req(conn)
            return
        ahead = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        reading = _Reading(
            RequestBuffer(self._max_head, self.max_body_bytes, ahead),
            time.monotonic() + self.request_timeout,
        )
        conn.sock.setblocking(False)
        self._reading[conn] = reading
        try:
            # Usually the request is there already (a kept-alive connection is readable, a new one
            # often is): try before asking the selector.
            verdict: Framing | None = reading.buffer.check() if ahead else Framing.MORE
            if verdict is Framing.MORE:
                verdict = self._receive(conn, reading)
            if verdict is None:
                self._forget(conn)
                self._close(conn)
            elif verdict is Framing.MORE:
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
                self._maybe_continue(conn, reading)
            else:
                self._conclude(conn, reading, verdict, registered=False)
        except Exception:
            self.log.exception("Error reading a request")
            self._forget(conn)
            self._unregister(conn)
            self._close(conn)

    def _on_readable(self, conn: Any, _sock: Any) -> None:
        reading = self._reading.get(conn)
        if reading is None:
            return
        try:
            verdict = self._receive(conn, reading)
            if verdict is None:
                self._forget(conn)
                self._unregister(conn)
                self._close(conn)
                return
            if verdict is Framing.MORE:
                self._maybe_continue(conn, reading)
                return
            self._conclude(conn, reading, verdict, registered=True)
        except Exception:
            self.log.exception("Error reading a request")
            self._forget(conn)
            self._unregister(conn)
            self._close(conn)

    def _receive(self, conn: Any, reading: _Reading) -> Framing | None:
        """One non-blocking read into the buffer; ``None`` when the client closed or reset it."""
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return Framing.MORE
        except OSError:
            return None
        if data:
            return reading.buffer.feed(data)
        # The client has sent all it will: a request cut short (a chunked body without its last
        # chunk, a body shorter than declared) gets its 400 rather than a silent close.
        return Framing.TRUNCATED if reading.buffer.data else None

    def _maybe_continue(self, conn: Any, reading: _Reading) -> None:
        if reading.buffer.expects_continue and not reading.continued:
            reading.continued = True
            # Tiny, on a connection with an empty send buffer: a non-blocking send takes it whole.
            with contextlib.suppress(OSError):
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _conclude(self, conn: Any, reading: _Reading, verdict: Framing, *, registered: bool) -> None:
        self._forget(conn)
        if registered:
            self._unregister(conn)
        if verdict is Framing.BODY_TOO_LARGE:
            detail = f"the request body is larger than {self.max_body_bytes} bytes"
            self._refuse(conn, error_response(413, "Content Too Large", detail, reading.buffer.request_id))
        elif verdict is Framing.HEAD_TOO_LARGE:
            detail = "the request head is larger than the server accepts"
            self._refuse(
                conn, error_response(431, "Request Header Fields Too Large", detail, reading.buffer.request_id)
            )
        elif verdict is Framing.TRUNCATED:
            detail = "the request could not be read: it ended before its body was complete"
            self._refuse(conn, error_response(400, "Bad Request", detail, reading.buffer.request_id))
        else:
            self._hand_over(conn, reading)

    def _hand_over(self, conn: Any, reading: _Reading) -> None:
        # Outside TLS and HTTP/2, init() only makes the socket blocking and creates the parser.
        conn.init()
        conn.parser.unreader.unread(bytes(reading.buffer.data))
        conn.data_ready = True
        conn.sluice_continued = reading.continued
        super().enqueue_req(conn)

    def handle_request(self, req: Any, conn: Any) -> Any:
        if getattr(conn, "sluice_continued", False):
            # "100 Continue" went out while the body was awaited; gunicorn must not send another.
            conn.sluice_continued = False
            req._expected_100_continue = False
        return super().handle_request(req, conn)

    # -- timeouts, refusals and closing --------------------------------------------------------

    def murder_pending(self) -> None:
        """Called by gthread's loop (also while stopping) about once a second: expire reads too."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and not self._stopping:
            # Stopping: nothing is coming on a silent connection; a partial request gets the
            # same short grace as gthread's kept-alive connections. One deadline for all keeps
            # the order.
            self._stopping = True
            for reading in self._reading.values():
                if not reading.buffer.data:
                    reading.deadline = now
                reading.deadline = min(reading.deadline, now + STOP_KEEPALIVE_LINGER)
            self._reading = dict(sorted(self._reading.items(), key=lambda item: item[1].deadline))
        while self._reading:
            conn, reading = next(iter(self._reading.items()))
            if reading.deadline > now:
                break
            self._forget(conn)
            self._unregister(conn)
            if reading.buffer.data and self.alive:
                detail = f"the request did not arrive within {self.request_timeout:g} seconds"
                self._refuse(conn, error_response(408, "Request Timeout", detail, reading.buffer.request_id))
            else:
                self._close(conn)
        while self._lingering:
            conn, (deadline, _) = next(iter(self._lingering.items()))
            if deadline > now:
                break
            del self._lingering[conn]
            self._unregister(conn)
            self._close(conn)

    def _refuse(self, conn: Any, response: bytes) -> None:
        """Answer with ``response`` and close, reading and dropping what the client still sends."""
        try:
            conn.sock.send(response)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._lingering[conn] = (time.monotonic() + _LINGER_SECONDS, 0)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering, conn))

    def _on_lingering(self, conn: Any, _sock: Any) -> None:
        deadline, dropped = self._lingering[conn]
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        dropped += len(data)
        if data and dropped < _LINGER_MAX_BYTES:
            self._lingering[conn] = (deadline, dropped)
            return
        del self._lingering[conn]
        self._unregister(conn)
        self._close(conn)

    def _forget(self, conn: Any) -> None:
        self._reading.pop(conn, None)

    def _unregister(self, conn: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)

    def _close(self, conn: Any) -> None:
        self.nr_conns -= 1
        try:
            conn.close()
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.ENOTCONN):
                raise


def buffering_worker(request_timeout: float, max_body_bytes: int) -> type[BufferingWorker]:
    """:class:`BufferingWorker` with these limits, for gunicorn's ``worker_class``."""
    return type(
        "BufferingWorker",
        (BufferingWorker,),
        {"request_timeout": request_timeout, "max_body_bytes": max_body_bytes, "__module__": __name__},
    )
