"""HTTP for steps: one pooled httpx client per worker process, an SSRF guard, manual redirects.

The guard (unless ``SLUICE_HTTP_ALLOW_PRIVATE=true``) resolves the host of every request and of
every redirect hop, and refuses the request when any address it resolves to is not a public
unicast address: loopback, private (RFC 1918, IPv6 ULA), link-local (which includes the cloud
metadata address 169.254.169.254), CGNAT, multicast, reserved, unspecified, and IPv4-mapped IPv6
forms of those. Hosts in ``SLUICE_HTTP_ALLOW_HOSTS`` are exempt.

The request then goes to the address that was checked, not to a second DNS answer (DNS
rebinding): the URL's host is replaced by the address, the ``Host`` header keeps the name, and
for HTTPS the TLS server name (SNI) and certificate check use the name too (httpcore's
``sni_hostname`` extension). Redirects are followed here, hop by hop, with the same check, at
most ``maxRedirects`` times; credentials (``Authorization``, cookies, headers that carry a
secret) are dropped when a redirect leaves the original origin.

The client keeps no cookies (its jar refuses them): it is shared by every run of the process,
so a cookie set for one user's request must never be sent with another's.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urljoin

import httpx

from sluice_common.errors import StepFailure

REDIRECTS = {301, 302, 303, 307, 308}
SENSITIVE_HEADERS = {"authorization", "proxy-authorization", "cookie"}
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
CGNAT = ipaddress.ip_network("100.64.0.0/10")


class HttpRefused(StepFailure):
    """The request was refused before anything was sent (SSRF guard, bad scheme)."""


@dataclass(frozen=True)
class HttpPolicy:
    allow_private: bool = False
    allow_hosts: frozenset[str] = frozenset()


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    content: bytes
    truncated: bool
    url: str
    redirects: list[str] = field(default_factory=list)


def make_client(max_connections: int = 100) -> httpx.Client:
    """The worker process's pooled client: no cookie memory, no automatic redirects."""
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.Client(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
        cookies=httpx.Cookies(jar),
        follow_redirects=False,
        trust_env=False,  # proxies from the environment would bypass the address check
    )


def refused_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address must not be reached from a step, or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return refused_reason(mapped)
    if ip in METADATA:
        return "a cloud metadata address"
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_private, "a private address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT, "a shared (CGNAT) address"),
        (not ip.is_global, "not a public address"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HttpRefused(f"cannot resolve {host!r}: {exc.strerror}") from None
    addresses = []
    for info in infos:
        text = str(info[4][0]).split("%")[0]  # drop an IPv6 zone index
        addresses.append(ipaddress.ip_address(text))
    if not addresses:
        raise HttpRefused(f"{host!r} resolves to no address")
    return addresses


def _target(url: httpx.URL, policy: HttpPolicy) -> tuple[httpx.URL, dict[str, Any]]:
    """The URL to connect to (the checked address) and the request extensions for it."""
    if url.scheme not in ("http", "https"):
        raise HttpRefused(f"only http and https URLs are allowed, not {url.scheme!r}")
    host = url.host
    if not host:
        raise HttpRefused("the URL has no host")
    if policy.allow_private or host.lower() in policy.allow_hosts:
        return url, {}
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = _resolve(host, port)
    for ip in addresses:
        reason = refused_reason(ip)
        if reason:
            raise HttpRefused(
                f"refused to connect to {host} ({ip}): {reason}. Private, loopback, link-local and "
                "metadata addresses are blocked; an operator can allow them with "
                "SLUICE_HTTP_ALLOW_PRIVATE=true or SLUICE_HTTP_ALLOW_HOSTS"
            )
    ip = addresses[0]
    if str(ip) == host:  # already an address: nothing to pin
        return url, {}
    extensions: dict[str, Any] = {"sni_hostname": host} if url.scheme == "https" else {}
    return url.copy_with(host=str(ip)), extensions


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def request(
    client: httpx.Client,
    policy: HttpPolicy,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    params: dict[str, str] | None = None,
    content: bytes | str | None = None,
    json_body: Any = None,
    form: dict[str, str] | None = None,
    timeout: float,
    max_redirects: int,
    max_bytes: int,
    secret_values: Iterable[str] = (),
) -> HttpResult:
    """Send one step request, following redirects through the guard; read at most ``max_bytes``.

    Raises :class:`HttpRefused`, ``httpx.HTTPError`` (transport problems, timeouts) or
    ``TimeoutError`` when the whole exchange outlasts ``timeout``.
    """
    deadline = time.monotonic() + timeout
    current = httpx.URL(url)
    if params:
        current = current.copy_merge_params(params)
    start_origin = _origin(current)
    secrets = {s for s in secret_values if s}
    sent_headers = dict(headers)
    hops: list[str] = []
    body: dict[str, Any] = {}
    if json_body is not None:
        body["json"] = json_body
    elif content is not None:
        body["content"] = content
    elif form is not None:
        body["data"] = form
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connect_url, extensions = _target(current, policy)
        request_headers = dict(sent_headers)
        if connect_url.host != current.host:
            request_headers["Host"] = current.netloc.decode("ascii")
        req = client.build_request(
            method,
            connect_url,
            headers=request_headers,
            timeout=httpx.Timeout(remaining),
            extensions=extensions,
            **body,
        )
        response = client.send(req, stream=True)
        try:
            location = response.headers.get("location")
            if response.status_code in REDIRECTS and location and max_redirects > 0:
                if len(hops) >= max_redirects:
                    raise HttpRefused(f"more than {max_redirects} redirects (last to {location})")
                nxt = httpx.URL(urljoin(str(current), location))
                hops.append(str(nxt))
                if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                    method, body = ("GET" if method != "HEAD" else "HEAD"), {}
                    sent_headers = {
                        k: v for k, v in sent_headers.items() if k.lower() not in ("content-type", "content-length")
                    }
                if _origin(nxt) != start_origin:
                    sent_headers = {
                        k: v
                        for k, v in sent_headers.items()
                        if k.lower() not in SENSITIVE_HEADERS and not any(s in v for s in secrets)
                    }
                current = nxt
                continue
            chunks: list[bytes] = []
            size = 0
            truncated = False
            for chunk in response.iter_bytes():
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
                size += len(chunk)
                if size >= max_bytes:
                    truncated = True
                    break
            content_bytes = b"".join(chunks)[:max_bytes]
            return HttpResult(
                status=response.status_code,
                headers=dict(response.headers),
                content=content_bytes,
                truncated=truncated,
                url=str(current),
                redirects=hops,
            )
        finally:
            response.close()
