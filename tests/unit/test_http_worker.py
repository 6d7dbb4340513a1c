"""Where the API worker decides a request has arrived in full, checked against gunicorn's own parser."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import ParseException
from gunicorn.http.parser import RequestParser
from hypothesis import given
from hypothesis import strategies as st

from sluice_api.http_worker import (
    BufferingWorker,
    Framing,
    RequestBuffer,
    buffering_worker,
    error_response,
    max_head_bytes,
)
from sluice_common.errors import ConfigError
from sluice_common.settings import load_settings

MAX_HEAD = 8192
MAX_BODY = 1000


def buffer(data: bytes = b"") -> RequestBuffer:
    return RequestBuffer(MAX_HEAD, MAX_BODY, data)


def feed_bytewise(data: bytes) -> list[Framing]:
    buf = buffer()
    return [buf.feed(data[i : i + 1]) for i in range(len(data))]


GET = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = (
    b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
)
CHUNKED_NO_TRAILER = b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n"


@pytest.mark.parametrize("request_bytes", [GET, POST, CHUNKED, CHUNKED_NO_TRAILER])
def test_a_request_is_ready_exactly_at_its_last_byte(request_bytes: bytes) -> None:
    verdicts = feed_bytewise(request_bytes)
    assert verdicts[-1] is Framing.READY
    assert set(verdicts[:-1]) == {Framing.MORE}


def test_bytes_after_the_request_stay_buffered() -> None:
    buf = buffer()
    assert buf.feed(POST + GET[:10]) is Framing.READY
    assert bytes(buf.data) == POST + GET[:10]


@pytest.mark.parametrize(
    "head",
    [
        b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nExpect: something\r\n\r\n",
        b"POST /x HTTP/1.1\r\nno colon here\r\n\r\n",
    ],
)
def test_heads_gunicorn_refuses_are_handed_over_at_once(head: bytes) -> None:
    assert buffer().feed(head) is Framing.HAND_OVER
    # gunicorn refuses it from these bytes alone: it never waits on the client for more.
    parser = RequestParser(Config(), iter([head]), ("127.0.0.1", 1))
    with pytest.raises(ParseException):
        next(parser)


@pytest.mark.parametrize("body", [b"zz\r\n", b"2\r\nabX\r\n", b"1" * 9000])
def test_bad_chunk_framing_is_handed_over(body: bytes) -> None:
    request = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    assert buffer().feed(request) is Framing.HAND_OVER
    parser = RequestParser(Config(), iter([request]), ("127.0.0.1", 1))
    with pytest.raises(ParseException):
        next(parser).body.read()


def test_bodies_over_the_limit_are_too_large_before_they_arrive() -> None:
    assert buffer().feed(b"POST /x HTTP/1.1\r\nContent-Length: 1001\r\n\r\n") is Framing.BODY_TOO_LARGE
    assert buffer().feed(b"POST /x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n") is Framing.MORE
    chunked = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    buf = buffer()
    assert buf.feed(chunked + b"200\r\n" + b"a" * 512 + b"\r\n") is Framing.MORE
    assert buf.feed(b"1e9\r\n") is Framing.BODY_TOO_LARGE  # 512 + 489 bytes
    # Framing alone may not grow the buffer without bound either.
    buf = buffer()
    assert buf.feed(chunked + b"1;" + b"x" * 8000 + b"\r\n") is Framing.MORE
    verdicts = {buf.feed(b"a\r\n1;" + b"x" * 8000 + b"\r\n") for _ in range(20)}
    assert Framing.BODY_TOO_LARGE in verdicts


def test_heads_over_the_limit_are_too_large() -> None:
    assert buffer().feed(b"GET /" + b"a" * MAX_HEAD) is Framing.HEAD_TOO_LARGE
    assert buffer().feed(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n") is Framing.HEAD_TOO_LARGE


def test_expect_continue_only_when_a_body_is_awaited() -> None:
    buf = buffer()
    assert buf.feed(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n") is Framing.MORE
    assert buf.expects_continue
    buf = buffer()
    assert buf.feed(b"POST /x HTTP/1.1\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n") is Framing.MORE
    assert buf.expects_continue
    for head in (
        b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    ):
        buf = buffer()
        buf.feed(head)
        assert not buf.expects_continue


def _gunicorn_reads(data: bytes) -> tuple[bytes, bytes]:
    """The body gunicorn's parser reads from exactly ``data``, and what it leaves unread."""
    parser = RequestParser(Config(), iter([data]), ("127.0.0.1", 1))
    req = next(parser)
    body = req.body.read()
    return body, parser.unreader.take_buffered() + b"".join(parser.unreader.iter or [])


@given(
    body=st.binary(max_size=300),
    chunk_sizes=st.lists(st.integers(1, 50), max_size=8),
    chunked=st.booleans(),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_ready_means_gunicorn_has_everything_it_will_read(
    body: bytes, chunk_sizes: list[int], chunked: bool, cuts: list[int]
) -> None:
    if chunked:
        pieces, rest = [], body
        for size in chunk_sizes:
            if rest:
                pieces.append(b"%x\r\n%s\r\n" % (len(rest[:size]), rest[:size]))
                rest = rest[size:]
        if rest:
            pieces.append(b"%x\r\n%s\r\n" % (len(rest), rest))
        request = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(pieces) + b"0\r\n\r\n"
    else:
        request = b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    following = b"GET /next HTTP/1.1\r\n"
    data = request + following
    buf = buffer()
    verdict = Framing.MORE
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(data)), len(data)]:
        verdict = buf.feed(data[start:cut]) if cut > start else buf.check()
        start = max(start, cut)
        if verdict is Framing.READY:
            break
    assert verdict is Framing.READY
    assert len(buf.data) >= len(request)
    # gunicorn, given only the buffered bytes, reads the whole body and stops where the request ends.
    read, left = _gunicorn_reads(bytes(buf.data))
    assert read == body
    assert left == bytes(buf.data)[len(request) :]


def test_error_responses_are_problems_that_close_the_connection() -> None:
    response = error_response(413, "Content Too Large", "too big")
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {
        "type": "https://sluice.dev/problems/content-too-large",
        "title": "Content Too Large",
        "status": 413,
        "detail": "too big",
    }


def test_the_head_limit_follows_gunicorns_settings() -> None:
    cfg = SimpleNamespace(limit_request_line=4094, limit_request_fields=100, limit_request_field_size=8190)
    assert max_head_bytes(cfg) == 4094 + 2 + 100 * 8192 + 4
    unlimited = SimpleNamespace(limit_request_line=0, limit_request_fields=0, limit_request_field_size=0)
    assert max_head_bytes(unlimited) > max_head_bytes(cfg)


def test_the_request_timeout_and_connection_cap_are_settings() -> None:
    defaults = load_settings({})
    assert (defaults.api_request_timeout_seconds, defaults.api_max_connections) == (20.0, 1000)
    s = load_settings({"SLUICE_API_REQUEST_TIMEOUT_SECONDS": "2.5", "SLUICE_API_MAX_CONNECTIONS": "50"})
    assert (s.api_request_timeout_seconds, s.api_max_connections) == (2.5, 50)
    for name, value in (("SLUICE_API_REQUEST_TIMEOUT_SECONDS", "0"), ("SLUICE_API_MAX_CONNECTIONS", "0")):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})
    worker = buffering_worker(2.5, 4096)
    assert issubclass(worker, BufferingWorker)
    assert (worker.request_timeout, worker.max_body_bytes) == (2.5, 4096)
