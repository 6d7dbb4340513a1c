"""The SSRF guard of HTTP steps: refusals happen before any connection (no network needed)."""

from __future__ import annotations

import ipaddress

import httpx
import pytest

from sluice_common.settings import load_settings
from sluice_worker import safehttp
from sluice_worker.safehttp import HttpPolicy, HttpRefused, make_client, refused_reason, request

REFUSED = [
    "http://127.0.0.1:8000/",
    "http://127.1.2.3/",
    "http://localhost/",  # by name: checked after resolution
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://100.64.0.1/",  # CGNAT
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:169.254.169.254]/",
    "http://[fd00::1]/",  # unique local
    "http://[fe80::1]/",  # link-local
    "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
]


@pytest.mark.parametrize("url", REFUSED)
def test_private_addresses_are_refused_by_default(url: str) -> None:
    with make_client() as client, pytest.raises(HttpRefused) as info:
        request(client, HttpPolicy(), "GET", url, headers={}, timeout=2, max_redirects=5, max_bytes=1000)
    assert "refused to connect" in str(info.value)
    assert "SLUICE_HTTP_ALLOW_PRIVATE" in str(info.value)


def test_only_http_and_https() -> None:
    with make_client() as client, pytest.raises(HttpRefused, match="only http and https"):
        request(client, HttpPolicy(), "GET", "file:///etc/passwd", headers={}, timeout=2, max_redirects=0, max_bytes=10)


def test_public_addresses_pass_the_check() -> None:
    for text in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"):
        assert refused_reason(ipaddress.ip_address(text)) is None


def test_allow_list_and_allow_private_let_requests_through() -> None:
    # Port 9 on loopback has no listener: getting a connection error proves the guard let it pass.
    for policy in (HttpPolicy(allow_hosts=frozenset({"127.0.0.1"})), HttpPolicy(allow_private=True)):
        with make_client() as client, pytest.raises(httpx.ConnectError):
            request(client, policy, "GET", "http://127.0.0.1:9/", headers={}, timeout=2, max_redirects=0, max_bytes=10)


def test_settings_parse_the_allow_list() -> None:
    settings = load_settings({"SLUICE_HTTP_ALLOW_HOSTS": "Internal.Example, 10.0.0.5 ,[fd00::1]"})
    assert settings.http_allowed_hosts == frozenset({"internal.example", "10.0.0.5", "fd00::1"})
    assert settings.http_allow_private is False
    assert load_settings({"SLUICE_HTTP_ALLOW_PRIVATE": "true"}).http_allow_private is True


def test_requests_go_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    # What DNS answers is replaced here; the rewrite of the request is the code under test.
    monkeypatch.setattr(safehttp, "_resolve", lambda host, port: [ipaddress.ip_address("93.184.216.34")])
    url, extensions = safehttp._target(httpx.URL("https://api.example.com:8443/v1/x?q=1"), HttpPolicy())
    assert str(url) == "https://93.184.216.34:8443/v1/x?q=1"
    assert extensions == {"sni_hostname": "api.example.com"}  # TLS name and certificate check
    url, extensions = safehttp._target(httpx.URL("http://api.example.com/x"), HttpPolicy())
    assert (str(url), extensions) == ("http://93.184.216.34/x", {})


def test_a_name_with_any_private_answer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.7")]
    monkeypatch.setattr(safehttp, "_resolve", lambda host, port: answers)
    with pytest.raises(HttpRefused, match=r"refused to connect to rebind.example \(10.0.0.7\): a private address"):
        safehttp._target(httpx.URL("http://rebind.example/"), HttpPolicy())
