"""What an idle process does not load: each check imports a module in a fresh interpreter.

The idle stack's memory (bench/e2e.py) counts every page a process holds: cryptography's OpenSSL
binding is loaded with the first secret sealed or opened, not by the modules that handle secrets,
so an API worker or a worker whose runs use no secret never holds it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded(module: str, candidates: list[str]) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {candidates!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.parametrize("module", ["sluice_common.secrets", "sluice_api.app", "sluice_worker.service"])
def test_cipher_loaded_on_first_use(module: str) -> None:
    assert _loaded(module, ["cryptography.hazmat.primitives.ciphers.aead", "_cffi_backend"]) == []
