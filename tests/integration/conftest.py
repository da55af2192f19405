"""Fixtures for tests that run real containers: an engine with a per-test store, and a leak check.

Every test that uses :func:`engine` is also checked for leaks: after it, this process must have
no more overlay mounts, child processes or open file descriptors than before, and the test's
state root must be empty. While the test runs, this process is a *child subreaper*, so a
container process that escaped its parent is re-parented here and counted, instead of
vanishing under the host's init.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runtime import _sys, state
from runtime.engine import Container, Engine
from runtime.errors import UnsupportedHostError
from runtime.image.store import Store
from runtime.launch import ExitStatus
from runtime.spec import ContainerSpec, Rootfs

HOST = Rootfs(host=True)

GRACE = 2.0
"""Seconds a leftover child process gets to go away before it counts as leaked."""


def _overlay_mounts() -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if " - overlay " in line)


def _children() -> set[int]:
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def _describe_pid(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} [{st}] {cmd or '?'}"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def _entries(root: Path) -> list[str]:
    try:
        return sorted(os.listdir(root))
    except FileNotFoundError:
        return []


@dataclass
class LeakCheck:
    """What this process holds before a test; :meth:`problems` compares with now."""

    grace: float = GRACE
    state_roots: list[Path] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)
    overlays: int = field(default_factory=_overlay_mounts)
    children: set[int] = field(default_factory=_children)
    fds: dict[int, str] = field(default_factory=_fds)

    def watch(self, root: Path) -> None:
        """Also require ``root`` (a state root) to be empty at the end."""
        self.state_roots.append(root)

    def remove_afterwards(self, path: Path) -> None:
        """Remove ``path`` (outside ``tmp_path``) once the check has looked at it."""
        self.scratch.append(path)

    def reap_adopted(self) -> None:
        """Reap children that died after being re-parented here (their parent was killed)."""
        for pid in _children() - self.children:
            if _is_zombie(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def problems(self) -> list[str]:
        found = []
        deadline = time.monotonic() + self.grace
        while True:
            self.reap_adopted()
            extra = _children() - self.children
            if not extra or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if extra:
            found.append("child processes left: " + "; ".join(_describe_pid(p) for p in extra))
            for pid in extra:  # leave nothing behind for the next test
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        overlays = _overlay_mounts()
        if overlays != self.overlays:
            found.append(f"overlay mounts: {self.overlays} before, {overlays} after")
        now = _fds()
        new = {fd: target for fd, target in now.items() if self.fds.get(fd) != target}
        if new:
            found.append(f"file descriptors left open: {new}")
        for root in self.state_roots:
            left = _entries(root)
            if left:
                found.append(f"state directories left in {root}: {left}")
        return found


@pytest.fixture(scope="session")
def _warm_engine(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Start one container per process, so one-time caches (a namespace fd, probes) are not
    mistaken for a test's leak."""
    engine = Engine(state_root=tmp_path_factory.mktemp("warm") / "containers")
    with contextlib.suppress(Exception):
        engine.run(ContainerSpec(HOST, argv=("true",)))
    _sweep_scratch()


SCRATCH = "pytest-isolate-test-"
"""Prefix of the engines' state roots on /dev/shm, followed by the owning process's pid."""


def _sweep_scratch() -> None:
    """Remove the state roots that a killed test process left on /dev/shm (its pid is gone)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            if not entry.name.startswith(SCRATCH):
                continue
            pid = int(entry.name[len(SCRATCH) :].split("-")[0] or 0)
            if pid and entry.stat(follow_symlinks=False).st_uid == os.geteuid():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    state.remove_tree(Path(entry.path))
                except PermissionError:
                    pass  # alive, another user's


@pytest.fixture
def leak_check(_warm_engine: None) -> Iterator[LeakCheck]:
    """Fail the test if it leaves processes, mounts, fds or state directories behind."""
    _sys.prctl(_sys.PR_SET_CHILD_SUBREAPER, 1)
    check = LeakCheck()
    try:
        yield check
        problems = check.problems()
    finally:
        _sys.prctl(_sys.PR_SET_CHILD_SUBREAPER, 0)
        for path in check.scratch:
            state.remove_tree(path)
    if problems:
        pytest.fail("leaked by the test:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty image store of the test's own."""
    return Store(tmp_path / "store")


@pytest.fixture
def other(tmp_path: Path) -> Store:
    """A second empty store, for copies between stores."""
    return Store(tmp_path / "other")


@pytest.fixture
def engine(tmp_path: Path, leak_check: LeakCheck) -> Iterator[Engine]:
    """An engine with a state root of its own; skips where containers cannot run.

    The state root is on a tmpfs, as :func:`runtime.state.default_root` picks it for real runs
    (it decides the layout of a root on top of the host, see ``rootfs.plan_overlays``), and in
    ``tmp_path`` only where ``/dev/shm`` is not a tmpfs.
    """
    where = tmp_path
    if state._is_tmpfs("/dev/shm"):
        where = Path(tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-", dir="/dev/shm"))
        leak_check.remove_afterwards(where)
    eng = Engine(state_root=where / "containers")
    try:
        eng.check_host(userns=os.geteuid() != 0)
    except UnsupportedHostError as e:
        pytest.skip(str(e))
    leak_check.watch(eng.state_root)
    yield eng
    eng.close()


@dataclass(frozen=True)
class Ran:
    """A finished container: how it ended and what it wrote to stdout and stderr."""

    status: ExitStatus
    out: str


Run = Callable[..., Ran]


@pytest.fixture
def run(engine: Engine) -> Run:
    """``run(*argv, **spec_fields)``: run a host-image container, capture its output."""

    def _run(*argv: str, **fields: object) -> Ran:
        spec = ContainerSpec(HOST, argv=argv, **fields)  # type: ignore[arg-type]
        with tempfile.TemporaryFile() as out:
            status = engine.run(spec, stdio=(None, out.fileno(), out.fileno()))
            out.seek(0)
            return Ran(status, out.read().decode(errors="replace"))

    return _run


@pytest.fixture
def running(engine: Engine) -> Iterator[Container]:
    """A started host-image container waiting for ``exec``; removed after the test."""
    with engine.create(ContainerSpec(HOST, hostname="exec-box")) as c:
        c.start()
        yield c
