"""Namespaces set up ahead of time by a small server process, for the next container.

Setting a container up costs its first process a few milliseconds: new mount, network, UTS,
IPC and cgroup namespaces, the overlay and a score of mounts, ``pivot_root``, loopback. The
pytest plugin forks its large process for every test and waits for that setup before the
test can run. This server does the setup of the *next* container while a test runs, on
another core, and hands the new namespaces over as file descriptors; the next test's PID 1
joins them with ``setns`` and does only what must happen inside its own new pid namespace
(mounting ``/proc``, whose view depends on the pid namespace of whoever mounts it).

The server never forks: it enters new namespaces with ``unshare``, sets them up, opens
``/proc/self/ns/*``, and goes back to its own with ``setns`` (a single-threaded process can).
It is a fresh interpreter importing only this package's launch code; it serves one request
at a time, in order, over a socket pair, and dies with its caller (``PR_SET_PDEATHSIG``).
Nothing outlives the descriptors: a namespace with no process and no descriptor is freed,
its mounts with it. A request that fails is answered with an error; the engine then sets
that container up the usual way, which reports the failure properly.

Root only: as an unprivileged user, mounting a fresh ``/proc`` in a user namespace needs
another ``/proc`` already visible in the mount namespace, which a pivoted root has not.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime import _sys, control, rootfs

NAMESPACES = (
    ("mnt", _sys.CLONE_NEWNS),
    ("uts", _sys.CLONE_NEWUTS),
    ("ipc", _sys.CLONE_NEWIPC),
    ("net", _sys.CLONE_NEWNET),
    ("cgroup", _sys.CLONE_NEWCGROUP),
)
"""What the server makes, and the order a PID 1 joins them in (``pid`` is the PID 1's own)."""

_RUNTIME_PARENT = str(Path(__file__).resolve().parent.parent)


class PrepareError(Exception):
    """The server could not set a container up (the usual path will say why, properly)."""


class Preparer:
    """The engine's end of the server: ``submit`` a request, later ``receive`` its namespaces."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = (
            f"import sys; sys.path.insert(0, {_RUNTIME_PARENT!r}); "
            "from runtime.prepare import serve; serve(*map(int, sys.argv[1:]))"
        )
        with theirs:
            # -I -S: none of the caller's environment or site packages; the server needs
            # only the standard library and this package.
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code, str(os.getpid()), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # Its own session: a Ctrl-C in the terminal is for the caller, which then
                # closes the server in order.
                start_new_session=True,
            )
        self._sock = ours

    def fileno(self) -> int:
        return self._sock.fileno()

    def submit(self, flags: int, ops: Sequence[rootfs.Op], hostname: str) -> None:
        """Ask for namespaces (``flags``, pid excluded) set up by ``ops`` and ``hostname``."""
        control.send_blob(self._sock, pickle.dumps((flags, tuple(ops), hostname)))

    def receive(self) -> tuple[int, ...]:
        """The next request's namespace descriptors, in :data:`NAMESPACES` order."""
        msg = control.recv(self._sock)
        if not isinstance(msg, dict):
            raise PrepareError("the namespace server ended")
        if msg.get("t") != "ready":
            raise PrepareError(msg.get("detail", "?"))
        count = msg["count"]
        _, fds, _, _ = socket.recv_fds(self._sock, 1, count)
        if len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise PrepareError("the namespace server sent too few descriptors")
        return tuple(fds)

    def close(self) -> None:
        """End the server: it exits when its socket closes."""
        self._sock.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def serve(caller: int, sock_fd: int) -> None:  # pragma: no cover - runs in the server
    """The server's loop (a separate interpreter): one set of namespaces per request."""
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != caller:
        os._exit(1)
    sock = socket.socket(fileno=sock_fd)
    own = {name: os.open(f"/proc/self/ns/{name}", os.O_RDONLY) for name, _ in NAMESPACES}
    while isinstance(frame := control.recv(sock), bytes):
        flags, ops, hostname = pickle.loads(frame)  # from our own caller, over a private socket
        try:
            fds = _make(flags, ops, hostname, own)
        except OSError as e:
            control.send(sock, {"t": "error", "detail": str(e)})
            continue
        control.send(sock, {"t": "ready", "count": len(fds)})
        socket.send_fds(sock, [b"n"], fds)
        for fd in fds:
            os.close(fd)


def _make(
    flags: int, ops: Sequence[rootfs.Op], hostname: str, own: dict[str, int]
) -> list[int]:  # pragma: no cover - runs in the server
    """Enter new namespaces, set them up, keep descriptors, and always come back."""
    try:
        _sys.unshare(flags)
        # Opened first: after pivot_root, this process's view has no /proc.
        fds = [
            os.open(f"/proc/self/ns/{name}", os.O_RDONLY)
            for name, flag in NAMESPACES
            if flags & flag
        ]
        try:
            rootfs.apply(ops, _sys.RealSyscalls())
            socket.sethostname(hostname)
            if flags & _sys.CLONE_NEWNET:
                _sys.set_loopback_up()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds
    finally:
        for name, flag in NAMESPACES:
            if flags & flag:
                _sys.setns(own[name], flag)
