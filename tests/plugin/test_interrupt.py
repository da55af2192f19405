"""Ctrl-C stops an isolated run like plain pytest and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLOW = """
import os, subprocess, time
import pytest

# Both in containers of one spec: the second one's is started while the first test runs.
pytestmark = pytest.mark.container(volumes=["{out}:/out"])

def test_waits():
    subprocess.Popen(["sleep", "1234"])          # a grandchild inside the container
    open("/out/started", "w").write(str(os.getpid()))
    time.sleep(60)

def test_never_reached():
    pass
"""


def _container_processes() -> list[str]:
    """The container's processes: the grandchild, and a container's PID 1 (a fork of the inner
    pytest, with its command line)."""
    found = []
    for pattern in ("sleep 1234", "test_slow[.]py"):
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        found += out.stdout.split()
    return found


@pytest.mark.rootless
def test_ctrl_c_interrupts_the_run_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    state = tmp_path / "state"
    (tmp_path / "test_slow.py").write_text(SLOW.format(out=out))
    env = {**os.environ, "PYTEST_ISOLATE_STATE": str(state)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_slow.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "started").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the isolated test never started"
            time.sleep(0.05)
        assert (out / "started").read_text() == "1"  # it really runs as PID 1 of its container
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output
    assert "test_never_reached" not in output
    deadline = time.monotonic() + 5
    while _container_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _container_processes() == [], "a process of the container survived Ctrl-C"
    assert not state.exists() or list(state.iterdir()) == [], list(state.iterdir())
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
