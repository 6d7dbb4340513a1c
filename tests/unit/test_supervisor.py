"""The ``sluice dev`` supervisor with real child processes (no network)."""

import io
import sys
import time

import psutil

from sluice_cli.supervisor import Child, Supervisor

STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: None)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "time.sleep(60)\n"
)
POLITE = "import time\nprint('hello', flush=True)\ntime.sleep(60)\n"


def test_prefixes_lines_and_stops_every_child() -> None:
    out = io.StringIO()
    sup = Supervisor(
        [
            Child("polite", [sys.executable, "-c", POLITE]),
            Child("stubborn", [sys.executable, "-c", STUBBORN]),
        ],
        env={},
        out=out,
        colour=False,
        grace_seconds=1.0,
    )
    sup.start()
    deadline = time.monotonic() + 10
    while ("hello" not in out.getvalue() or "ignoring" not in out.getvalue()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [c.process.pid for c in sup.children if c.process]
    sup.request_stop()
    assert sup.wait() == 0
    sup.stop()
    text = out.getvalue()
    assert "polite   | hello" in text
    assert "stubborn | ignoring SIGTERM" in text
    assert "stubborn | did not stop in time; killing" in text
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_a_child_that_exits_stops_the_rest() -> None:
    out = io.StringIO()
    sup = Supervisor(
        [
            Child("quitter", [sys.executable, "-c", "raise SystemExit(3)"]),
            Child("sleeper", [sys.executable, "-c", POLITE]),
        ],
        env={},
        out=out,
        colour=False,
    )
    sup.start()
    assert sup.wait() == 3
    sup.stop()
    assert "quitter | exited with status 3" in out.getvalue()
    sleeper = sup.children[1].process
    assert sleeper is not None
    assert sleeper.poll() is not None
