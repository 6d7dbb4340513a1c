"""Reading request input: bounded JSON bodies, models, query parameters and page cursors.

Every failure here is a 4xx problem that says what to fix; nothing is written before input has
passed all of it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl
from uuid import UUID

import falcon
from pydantic import BaseModel, ValidationError

from sluice_common.errors import FieldProblem, ValidationFailed, field_problems

M = TypeVar("M", bound=BaseModel)

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
JSON_TYPES = ("application/json", "application/merge-patch+json")


_DRAIN_MAX = 16 * 1024 * 1024


def _too_large(stream: Any, limit: int) -> falcon.HTTPError:
    # Read what is left of a moderately oversized body so the connection stays usable for the
    # client's next request (a huge upload is left to the server, which closes the connection).
    drained = 0
    try:
        while drained < _DRAIN_MAX:
            chunk = stream.read(65536)
            if not chunk:
                break
            drained += len(chunk)
    except Exception:  # noqa: S110 - the answer is 413 whatever the rest of the body is
        pass
    return falcon.HTTPContentTooLarge(
        title="Content Too Large", description=f"the request body is larger than {limit} bytes"
    )


def _body_stream(req: falcon.Request) -> Any:
    """The stream the body is read from.

    Falcon's ``bounded_stream`` reads ``Content-Length`` bytes, and none when there is no such
    header: a chunked body (``Transfer-Encoding: chunked``) would be read as empty, whatever it
    holds. Such a body is read from the server's own input stream, which decodes the chunks and
    ends with the body (gunicorn says so with ``wsgi.input_terminated``); a server that does not
    end it there cannot be read safely, and the client is asked for a length instead.
    """
    if req.content_length is not None:
        return req.bounded_stream
    codings = [c.strip().lower() for c in (req.get_header("Transfer-Encoding") or "").split(",") if c.strip()]
    if not codings:
        return req.bounded_stream  # no body at all
    if codings != ["chunked"]:
        raise falcon.HTTPBadRequest(
            title="Bad Request", description="the only Transfer-Encoding this API reads is chunked"
        )
    if not req.env.get("wsgi.input_terminated"):
        raise falcon.HTTPLengthRequired(
            title="Length Required", description="send the body with a Content-Length header"
        )
    return req.stream


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes whether or not Content-Length is given.

    A body the server cannot decode (a malformed or truncated chunked body) is a 400: reading it
    as empty would act on a request the client did not send.
    """
    length = req.content_length
    stream = _body_stream(req)
    if length is not None and length > limit:
        raise _too_large(stream, limit)
    try:
        data: bytes = stream.read(limit + 1)
    except Exception as exc:  # the server's parser of the framing (gunicorn: InvalidChunkSize, NoMoreData...)
        raise falcon.HTTPBadRequest(
            title="Bad Request", description=f"the request body could not be read: {_framing_error(exc)}"
        ) from None
    if len(data) > limit:
        raise _too_large(stream, limit)
    return data


def _framing_error(exc: Exception) -> str:
    kind = type(exc).__name__
    if "chunk" in kind.lower():
        return "malformed chunked encoding"
    if kind == "NoMoreData":
        return "the body ended before its declared size"
    return "malformed body framing"


def media_type(req: falcon.Request) -> str:
    return (req.content_type or "").split(";", 1)[0].strip().lower()


MAX_DEPTH = 64


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_storable(value: Any) -> None:
    """Refuse what PostgreSQL's jsonb cannot hold, as a 422: NUL characters, lone surrogates,
    infinite numbers, and nesting deeper than ``MAX_DEPTH`` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValidationFailed([FieldProblem("$", "strings must not contain NUL (\\u0000) characters")])
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationFailed(
                    [FieldProblem("$", "strings must be valid Unicode (no lone surrogates)")]
                ) from None
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValidationFailed([FieldProblem("$", "numbers must be finite")])
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ValidationFailed([FieldProblem("$", f"nested deeper than {MAX_DEPTH} levels")])
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def parse_json(data: bytes) -> Any:
    try:
        value = json.loads(data, parse_constant=_not_json)
    except UnicodeDecodeError:
        raise falcon.HTTPBadRequest(title="Bad Request", description="the body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise falcon.HTTPBadRequest(
            title="Bad Request",
            description=f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except ValueError as exc:  # NaN, Infinity, integers too long to convert
        raise falcon.HTTPBadRequest(title="Bad Request", description=f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ValidationFailed([FieldProblem("$", f"nested deeper than {MAX_DEPTH} levels")]) from None
    check_storable(value)
    return value


def read_json(req: falcon.Request, limit: int, *, required: bool = True) -> Any:
    """The JSON body (``None`` when empty and not required)."""
    data = read_body(req, limit)
    if not data.strip():
        if required:
            raise falcon.HTTPBadRequest(title="Bad Request", description="a JSON body is required")
        return None
    kind = media_type(req)
    if kind and kind not in JSON_TYPES and not kind.endswith("+json"):
        raise falcon.HTTPUnsupportedMediaType(
            title="Unsupported Media Type", description=f"send application/json, not {kind}"
        )
    return parse_json(data)


def validate(model: type[M], data: Any) -> M:
    """``model`` from ``data``; every problem reported at once with its JSON path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValidationFailed([FieldProblem("$", "must be a JSON object")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(field_problems(exc)) from None


# Query parameters -------------------------------------------------------------------------------


def query(req: falcon.Request) -> dict[str, str]:
    """Query parameters, refusing repeated ones (ambiguous) with a 400."""
    seen: dict[str, str] = {}
    for key, value in parse_qsl(req.query_string, keep_blank_values=True):
        if key in seen:
            raise falcon.HTTPBadRequest(title="Bad Request", description=f"query parameter {key!r} is repeated")
        seen[key] = value
    return seen


class KnownParamsMiddleware:
    """Refuses query parameters a resource does not take (``query_params``), like unknown fields."""

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any, params: Any) -> None:
        if resource is None:
            return
        known: frozenset[str] = getattr(resource, "query_params", frozenset())
        unknown = sorted(set(req.params) - known)
        if unknown:
            hint = f"; known: {', '.join(sorted(known))}" if known else "; this endpoint takes none"
            raise ValidationFailed(
                [FieldProblem(f"query.{name[:100]}", f"unknown query parameter{hint}") for name in unknown[:20]]
            )


def bad_param(name: str, message: str) -> ValidationFailed:
    return ValidationFailed([FieldProblem(f"query.{name}", message)])


def int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_param(name, f"must be an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise bad_param(name, f"must be an integer from {low} to {high}")
    return value


def choice_param(params: dict[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = params.get(name)
    if raw is None:
        return None
    if raw not in choices:
        raise bad_param(name, f"must be one of {', '.join(choices)}")
    return raw


def uuid_param(params: dict[str, str], name: str) -> UUID | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return UUID(raw)
    except ValueError:
        raise bad_param(name, "must be a UUID") from None


def time_param(params: dict[str, str], name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None:
        return None
    message = "must be an RFC 3339 date-time with an offset, for example 2026-01-31T12:00:00Z"
    if not RFC3339.fullmatch(raw):
        raise bad_param(name, message)
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        raise bad_param(name, message) from None


# Cursors ----------------------------------------------------------------------------------------


def encode_cursor(at: datetime, id_: UUID) -> str:
    raw = json.dumps([at.isoformat(), str(id_)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def encode_version_cursor(version: int) -> str:
    return base64.urlsafe_b64encode(json.dumps(["v", version]).encode()).decode().rstrip("=")


def decode_version_cursor(params: dict[str, str]) -> int | None:
    """The version a page of versions continues below (newest first)."""
    raw = params.get("cursor")
    if raw is None:
        return None
    try:
        decoded = base64.urlsafe_b64decode((raw + "=" * (-len(raw) % 4)).encode("ascii"))
        if len(decoded) > 50:
            raise ValueError("too long")
        kind, version = json.loads(decoded)
    except (ValueError, TypeError, binascii.Error, UnicodeError, RecursionError):
        raise bad_param("cursor", "is not a cursor this API returned") from None
    if kind != "v" or type(version) is not int or not 1 <= version <= 2**31 - 1:
        raise bad_param("cursor", "is not a cursor this API returned")
    return version


def decode_cursor(params: dict[str, str]) -> tuple[datetime, UUID] | None:
    """The position a page continues from (keyset pagination: newest first, then by id)."""
    raw = params.get("cursor")
    if raw is None:
        return None
    try:
        padded = raw + "=" * (-len(raw) % 4)
        decoded = base64.urlsafe_b64decode(padded.encode("ascii"))
        if len(decoded) > 200:
            raise ValueError("too long")
        at, id_ = json.loads(decoded)
        if not isinstance(at, str) or not isinstance(id_, str):
            raise TypeError("not strings")
        position = datetime.fromisoformat(at), UUID(id_)
    except (ValueError, TypeError, binascii.Error, UnicodeError, RecursionError):
        raise bad_param("cursor", "is not a cursor this API returned") from None
    if position[0].tzinfo is None:
        raise bad_param("cursor", "is not a cursor this API returned")
    return position
