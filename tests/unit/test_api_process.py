"""The API's gunicorn settings: what the master does before it forks a worker."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sluice_api.__main__ import gunicorn_options
from sluice_common.settings import load_settings


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_master_freezes_its_objects_before_each_fork(unfrozen: None) -> None:
    """Objects the master made stay out of the workers' garbage collections, which would otherwise
    copy every page they shared with the master (the idle API's PSS in bench/e2e.py)."""
    options = gunicorn_options(load_settings({}))
    assert gc.get_freeze_count() == 0
    options["pre_fork"](None, None)
    assert gc.get_freeze_count() > 0  # the interpreter's objects so far, modules and all


def test_each_worker_freezes_what_it_made_while_it_loaded_the_app(unfrozen: None) -> None:
    """And the objects a worker made after the fork (the app, its pools and routes) stay out of
    its full collections, which stop every thread while they run (freeze_startup_objects)."""
    options = gunicorn_options(load_settings({}))
    assert gc.get_freeze_count() == 0
    options["post_worker_init"](None)
    assert gc.get_freeze_count() > 0
