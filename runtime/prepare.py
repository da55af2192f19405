"""Namespaces set up ahead of time by a small server process, for the next container.

Setting a container up costs its first process a few milliseconds: new mount, network, UTS,
IPC and cgroup namespaces, the overlay and a score of mounts, ``pivot_root``, loopback. The
pytest plugin forks its large process for every test and waits for that setup before the
test can run. This server does the setup of the *next* containers while a test runs, on
another core, and hands the new namespaces over as file descriptors; a next test's PID 1
joins them with ``setns`` and does only what must happen inside its own new pid namespace
(mounting ``/proc``, whose view depends on the pid namespace of whoever mounts it).

The server never forks: it enters new namespaces with ``unshare``, sets them up, opens
``/proc/self/ns/*``, and goes back to its own with ``setns`` (a single-threaded process can).
It is a fresh interpreter importing only this package's launch code; it serves one request
at a time, in order, over a socket pair, and dies with its caller (``PR_SET_PDEATHSIG``).
Nothing outlives the descriptors: a namespace with no process and no descriptor is freed,
its mounts with it, and so is the container's writable state, which lives in a tmpfs of its
own mount namespace (:class:`Recipe`), not on the host. A request that fails is answered
with an error; the engine then sets that container up the usual way, which reports the
failure properly.

Network namespaces are recycled when nothing happened in them. A new one is the most
expensive namespace to make and to free: the kernel registers (and later, in a worker, tears
down) a loopback device, IPv6 and a dozen other per-namespace subsystems; ~4% of all CPU time
of a 300-test run. When the engine has reaped a container (so no process is left in it), it
gives the namespace back (:meth:`Preparer.recycle`); the server keeps it for a later container
only if it reads exactly as it did when new (:func:`_net_state`): not one packet counted, no
socket of any kind in use, none in ``TIME_WAIT``. Without traffic nothing outlives a
container's processes in a network namespace, and a container cannot change the rest
(interfaces, addresses, routes, filters) without ``CAP_NET_ADMIN``, which it never has;
``/proc/sys`` is read-only in it. So a recycled namespace differs from a new one only by its
inode number; one that a test used for real is freed as before.

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
from dataclasses import dataclass
from pathlib import Path

from runtime import _sys, control, rootfs, state

NAMESPACES = (
    ("mnt", _sys.CLONE_NEWNS),
    ("uts", _sys.CLONE_NEWUTS),
    ("ipc", _sys.CLONE_NEWIPC),
    ("net", _sys.CLONE_NEWNET),
    ("cgroup", _sys.CLONE_NEWCGROUP),
)
"""What the server makes, and the order a PID 1 joins them in (``pid`` is the PID 1's own)."""

_RUNTIME_PARENT = str(Path(__file__).resolve().parent.parent)

_STATE_FLAGS = _sys.MS_NOSUID | _sys.MS_NODEV
"""The state's tmpfs (like the host directory it stands in for, nothing there runs)."""

NET_COUNTERS = ("dev", "snmp", "snmp6", "netstat")
"""The network namespace's interface and protocol counters (``/proc/self/net/*``, read from
inside it): one packet of any kind, on any socket, changes them."""
NET_SOCKETS = ("sockstat", "sockstat6")
"""Its socket counts, of which only the per-namespace ones are compared (:func:`_net_state`):
sockets in use per protocol, and TCP's ``TIME_WAIT``. (Reading the socket tables themselves,
``/proc/net/tcp``, walks the host's whole TCP hash table: ~5 ms each.)"""
_PER_NAMESPACE = frozenset({b"used", b"inuse", b"tw"})
"""The fields of ``sockstat`` counted per namespace; the others (orphans, memory) are the
host's and change with its traffic."""
MAX_SPARE = 10
"""Clean network namespaces kept for reuse: enough for the containers an engine gives back
together (the pytest plugin reaps 8 retired ones at a time) and the next ones to prepare."""
MAX_LENT = 16
"""Network namespaces lent out and not yet given back; the oldest is forgotten past this
(a container removed by some path that never gives its namespace back)."""
MAX_BATCH = 8
"""Containers asked for at once, at most. The caller writes every request before it reads an
answer, so the answers (with five descriptors in flight each) must fit in its socket's buffer
(212992 bytes here), or both sides wait for each other forever: a batch of 200 did. And each
batch lends its network namespaces out (:data:`MAX_LENT`)."""


class PrepareError(Exception):
    """The server could not set a container up (the usual path will say why, properly)."""


@dataclass(frozen=True)
class Recipe:
    """How the server sets up each container of one spec: the same every time, because such
    a container keeps its state (overlay upper and work directories, ``/etc`` files) in a
    tmpfs over the same ``state.root`` in its own mount namespace, not in a directory of its
    own on the host. Nothing is left to create or remove per container outside the kernel's
    namespaces, and the plan is made once."""

    flags: int
    """The namespaces to make (``pid`` excluded: the PID 1 makes its own)."""
    ops: tuple[rootfs.Op, ...]
    """The mount plan after its first step (:data:`rootfs.MAKE_PRIVATE`), but ``/proc``."""
    hostname: str
    state: rootfs.StatePaths
    layout: rootfs.Layout
    etc_files: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        """The server's request for one container: to encode once per recipe (its plan is a
        few dozen small objects; pickling them took ~1 ms of the caller's per batch)."""
        return pickle.dumps(("make", self))


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
        self._returned: list[int] = []

    def fileno(self) -> int:
        return self._sock.fileno()

    def submit(self, request: bytes, count: int) -> None:
        """Ask for ``count`` (at most :data:`MAX_BATCH`) containers set up by a recipe
        (:meth:`Recipe.encode`)."""
        self._send(control.blob_frame(request) * count)

    def flush(self) -> None:
        """Send what :meth:`recycle` noted."""
        if self._returned:
            self._send(b"")

    def _send(self, frames: bytes) -> None:
        """One write, whatever it carries: each write wakes the server, which may take the
        caller's CPU for a moment (~0.14 ms a write in the pytest plugin, under cProfile)."""
        if self._returned:
            frames = control.blob_frame(pickle.dumps(("recycle", self._returned))) + frames
            self._returned = []
        self._sock.sendall(frames)

    def receive(self) -> tuple[tuple[int, ...], int | None]:
        """The next request's namespace descriptors, in :data:`NAMESPACES` order, and the
        number of its network namespace for :meth:`recycle` (``None`` without one)."""
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
        return tuple(fds), msg.get("net")

    def recycle(self, net: int) -> None:
        """Give back network namespace ``net``: no process uses it any more. Noted, and sent
        with the next request or :meth:`flush` (no answer)."""
        self._returned.append(net)

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
    nets = _Nets(own["net"])
    known: dict[bytes, Recipe] = {}
    while isinstance(frame := control.recv(sock), bytes):
        recipe = known.get(frame)
        if recipe is None:
            kind, body = pickle.loads(frame)  # from our own caller, over a private socket
            if kind == "recycle":
                for net in body:
                    nets.recycle(net)
                continue
            recipe = body
            known = {frame: recipe}  # the same recipe over and over: decoded once
        try:
            fds, net = _make(recipe, own, nets)
        except OSError as e:
            control.send(sock, {"t": "error", "detail": str(e)})
            continue
        control.send(sock, {"t": "ready", "count": len(fds), "net": net})
        socket.send_fds(sock, [b"n"], fds)
        for fd in fds:
            os.close(fd)


class _Nets:  # pragma: no cover - runs in the server
    """The server's network namespaces: clean ones to reuse, and those lent out."""

    def __init__(self, own: int) -> None:
        self.own = own
        self.spare: list[tuple[int, list[object]]] = []
        self.lent: dict[int, tuple[int, list[object]]] = {}
        self.count = 0

    def reuse(self) -> int | None:
        """Enter a clean recycled namespace, if there is one, and lend it: its number."""
        if not self.spare:
            return None
        fd, state = self.spare.pop()
        _sys.setns(fd, _sys.CLONE_NEWNET)
        return self.lend(fd, state)

    def lend(self, fd: int, state: list[object]) -> int:
        """Keep ``fd`` (this process's own reference) until the namespace comes back."""
        self.count += 1
        self.lent[self.count] = (fd, state)
        while len(self.lent) > MAX_LENT:
            os.close(self.lent.pop(next(iter(self.lent)))[0])
        return self.count

    def recycle(self, net: int) -> None:
        fd, state = self.lent.pop(net, (-1, []))
        if fd < 0:
            return
        try:
            _sys.setns(fd, _sys.CLONE_NEWNET)
            try:
                clean = _net_state() == state
            finally:
                _sys.setns(self.own, _sys.CLONE_NEWNET)
        except OSError:
            clean = False
        if clean and len(self.spare) < MAX_SPARE:
            self.spare.append((fd, state))
        else:
            os.close(fd)  # the last reference: the kernel frees the namespace


def _net_state() -> list[object]:  # pragma: no cover - runs in the server
    """This process's network namespace: its counters, and its sockets per protocol."""
    seen: list[object] = []
    for name in (*NET_COUNTERS, *NET_SOCKETS):
        try:
            text = _read(f"/proc/self/net/{name}")
        except OSError as e:  # not in this kernel: the same for every namespace
            text = f"errno {e.errno}".encode()
        if name in NET_SOCKETS:
            for line in text.splitlines():
                label, *fields = line.split()
                seen += [
                    (label, key, value)
                    for key, value in zip(fields[::2], fields[1::2], strict=False)
                    if key in _PER_NAMESPACE
                ]
        else:
            seen.append(text)
    return seen


def _read(path: str) -> bytes:  # pragma: no cover - runs in the server
    """A whole ``/proc`` file in a few syscalls (no text layer: this runs per container)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _make(
    recipe: Recipe, own: dict[str, int], nets: _Nets
) -> tuple[list[int], int | None]:  # pragma: no cover - runs in the server
    """Enter new namespaces (or a recycled network namespace), set them up, keep
    descriptors, and always come back."""
    flags = recipe.flags
    net = nets.reuse() if flags & _sys.CLONE_NEWNET else None
    try:
        _sys.unshare(flags & ~_sys.CLONE_NEWNET if net else flags)
        # Opened first: after pivot_root, this process's view has no /proc.
        fds = [
            os.open(f"/proc/self/ns/{name}", os.O_RDONLY)
            for name, flag in NAMESPACES
            if flags & flag
        ]
        try:
            if net is None and flags & _sys.CLONE_NEWNET:
                _sys.set_loopback_up()
                net = nets.lend(os.open("/proc/self/ns/net", os.O_RDONLY), _net_state())
            # Every mount private first, so that the state's tmpfs never shows on the host.
            syscalls = _sys.RealSyscalls()
            rootfs.apply([rootfs.MAKE_PRIVATE], syscalls)
            _sys.mount("tmpfs", recipe.state.root, "tmpfs", _STATE_FLAGS, "mode=0711")
            state.populate(recipe.state, recipe.layout, dict(recipe.etc_files))
            rootfs.apply(recipe.ops, syscalls)
            socket.sethostname(recipe.hostname)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds, net
    except BaseException:
        if net is not None:
            nets.recycle(net)  # nothing ran in it: kept if it is clean
        raise
    finally:
        for name, flag in NAMESPACES:
            if flags & flag:
                _sys.setns(own[name], flag)
