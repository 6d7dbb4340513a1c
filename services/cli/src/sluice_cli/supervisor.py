"""Runs the services as child processes for ``sluice dev``, with prefixed, colour-coded logs.

Children are started in their own sessions so a terminal's Ctrl-C reaches only this supervisor,
which then stops them in order (SIGTERM, then SIGKILL after a grace period). On Linux each child
also gets SIGTERM from the kernel if the supervisor itself dies, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

_COLOURS = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m"]
_RESET = "\033[0m"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the supervisor's
    process: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = None


@dataclass
class Supervisor:
    children: list[Child]
    env: Mapping[str, str]
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    colour: bool = field(default_factory=lambda: sys.stdout.isatty())
    grace_seconds: float = 15.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _emit(self, name: str, index: int, line: str) -> None:
        width = max(len(c.name) for c in self.children)
        label = f"{name:<{width}} |"
        if self.colour:
            label = f"{_COLOURS[index % len(_COLOURS)]}{label}{_RESET}"
        with self._lock:
            self.out.write(f"{label} {line}\n")
            self.out.flush()

    def _pump(self, child: Child, index: int) -> None:
        assert child.process is not None
        assert child.process.stdout is not None
        for raw in iter(child.process.stdout.readline, b""):
            self._emit(child.name, index, raw.decode(errors="replace").rstrip("\n"))

    def start(self) -> None:
        for index, child in enumerate(self.children):
            child.process = subprocess.Popen(
                child.argv,
                env={**self.env, **child.env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            child.pump = threading.Thread(target=self._pump, args=(child, index), daemon=True)
            child.pump.start()
            self._emit(child.name, index, f"started (pid {child.process.pid})")

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self, on_exit: Callable[[Child, int], None] | None = None) -> int:
        """Block until a stop is requested or a child exits; return the exit status to use."""
        status = 0
        while not self._stop.is_set():
            for child in self.children:
                assert child.process is not None
                code = child.process.poll()
                if code is not None:
                    self._emit(child.name, self.children.index(child), f"exited with status {code}")
                    if on_exit is not None:
                        on_exit(child, code)
                    self._stop.set()
                    status = code or 1
                    break
            self._stop.wait(0.2)
        return status

    def stop(self) -> None:
        alive = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in alive:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for child in alive:
            assert child.process is not None
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._emit(child.name, self.children.index(child), "did not stop in time; killing")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        for child in self.children:
            if child.pump is not None:
                child.pump.join(timeout=2)
            if child.process is not None:
                # Reap whatever the child's own children left in its process group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.process.pid, signal.SIGKILL)
