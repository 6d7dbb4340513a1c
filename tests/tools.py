"""External tools some tests need (Prometheus' ``promtool`` and ``prometheus``, from Debian's package;
PostgreSQL's ``auto_explain``, which the embedded server is built without).

Outside CI a missing tool skips the test with the reason; in CI (``CI=true``, where ``.ci/run``
installs the tools and the machine's PostgreSQL has ``auto_explain``) it fails it: a check that
silently stops running is worse than a red build.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def need_binary(name: str, package: str = "prometheus") -> str:
    """The path of ``name``; skip (fail in CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package {package!r}; .ci/run installs it)")
    return path


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; fail it in CI, which must run it."""
    if in_ci():
        pytest.fail(f"{reason}, and CI must run this test")
    pytest.skip(reason)
