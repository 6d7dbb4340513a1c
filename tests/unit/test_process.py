"""Process start-up shared by the services: a service run directly never starts a server (without
its URLs it stops and names them), and what it made while starting stays out of later collections."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from sluice_common.process import freeze_startup_objects


@pytest.mark.parametrize(
    ("service", "missing"),
    [
        ("api", "DATABASE_URL and REDIS_URL are not set"),
        ("worker", "DATABASE_URL and REDIS_URL are not set"),
        ("scheduler", "DATABASE_URL and REDIS_URL are not set"),
        ("standalone", "DATABASE_URL is not set"),
    ],
)
def test_a_service_without_its_urls_stops_with_a_message(service: str, missing: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "DATABASE_URL", "REDIS_URL"))}
    env["SLUICE_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", f"sluice_{service}"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert f"{service}: {missing}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # no embedded server was started


def test_a_started_service_keeps_its_startup_objects_out_of_later_collections() -> None:
    class Node:
        other: object = None

    gc.unfreeze()
    try:
        garbage = Node()
        garbage.other = garbage  # a cycle no one refers to: collected first, not frozen for good
        gone = weakref.ref(garbage)
        del garbage
        freeze_startup_objects()
        assert gone() is None
        assert gc.get_freeze_count() > 0  # the rest: modules, settings and all
    finally:
        gc.unfreeze()
