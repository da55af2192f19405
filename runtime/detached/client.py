"""Detached containers as a command sees them: list, find, and ask their supervisors.

Every entry point sweeps the state root first (:func:`runtime.state.sweep`), so a container
whose supervisor was killed never shows up half-dead: the command after the kill removes its
directory, and it is gone from ``ps -a``. Listing reads the records on disk and asks no one;
the other operations are one request each to the container's supervisor
(:mod:`runtime.detached.protocol`).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runtime import control, state
from runtime.detached import logs, protocol
from runtime.detached.record import LOG, ContainerRecord, live_records, read_record, resolve
from runtime.diff import Change
from runtime.errors import ContainerError

if TYPE_CHECKING:
    from runtime.detached.supervisor import Launch

__all__ = [
    "commit",
    "containers",
    "diff",
    "exec_in",
    "find",
    "images_in_use",
    "kill",
    "read_logs",
    "remove",
    "start",
    "stop",
    "wait",
]

ANSWER_TIMEOUT = 60.0
"""Seconds a supervisor gets to answer a request that does not wait for the container (kill,
diff, remove) or, for ``stop``, beyond the stop timeout. A supervisor that cannot answer is
stuck (its container's PID 1 cannot finish); the command then fails instead of hanging."""

REMOVE_TIMEOUT = 30.0
"""Seconds ``remove`` waits for the supervisor to exit after it replied."""

FOLLOW_POLL = 0.1
"""Seconds between looks at the log file while following it."""


def containers(root: Path) -> list[ContainerRecord]:
    """Every detached container under ``root`` (stale state swept first), oldest first."""
    state.sweep(root)
    return live_records(root)


def find(root: Path, key: str) -> ContainerRecord:
    """The container ``key`` names (id, name or unique id prefix); :class:`ContainerError`
    names the key when there is none."""
    return resolve(containers(root), key)


def images_in_use(root: Path) -> set[str]:
    """Image ids that detached containers run on (``rmi`` refuses them without ``-f``)."""
    return {r.image_id for r in containers(root) if r.image_id}


def start(launch: Launch) -> ContainerRecord:
    """Start a detached container (see :func:`runtime.detached.supervisor.spawn`)."""
    from runtime.detached.supervisor import spawn  # the engine's code, only for commands that run

    cid = spawn(launch)
    record = read_record(Path(launch.state_root) / cid)
    if record is None:
        raise ContainerError(f"container {cid[:12]} started but has no record (removed already?)")
    return record


def _dir(root: Path, record: ContainerRecord) -> Path:
    return root / record.id


def stop(root: Path, record: ContainerRecord, timeout: float | None, sig: str | None) -> int:
    """Stop the container: its stop signal (or ``sig``), SIGKILL after ``timeout`` seconds
    (``None``: wait for ever). Returns its exit code; a stopped container is left as it is."""
    request = {"op": "stop", "timeout": timeout, "signal": sig}
    limit = None if timeout is None else timeout + ANSWER_TIMEOUT
    reply = protocol.call(_dir(root, record), request, timeout=limit)
    return int(reply["exit_code"])


def kill(root: Path, record: ContainerRecord, sig: str | None = None) -> None:
    """Send ``sig`` (default SIGKILL) to the container's PID 1."""
    protocol.call(_dir(root, record), {"op": "kill", "signal": sig}, timeout=ANSWER_TIMEOUT)


def wait(root: Path, record: ContainerRecord) -> int:
    """Block until the container has ended; its exit code."""
    return int(protocol.call(_dir(root, record), {"op": "wait"})["exit_code"])


def exec_in(
    root: Path,
    record: ContainerRecord,
    argv: Sequence[str],
    stdio: Sequence[int],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
) -> int:
    """Run ``argv`` in the running container with ``stdio`` (three fds) as its stdin, stdout
    and stderr; return its exit code. Interrupting the wait (Ctrl-C) ends the command."""
    if len(stdio) != 3:
        raise ValueError("exec needs three file descriptors: stdin, stdout, stderr")
    message = {"op": "exec", "argv": list(argv), "env": dict(env or {}), "cwd": cwd, "user": user}
    reply = protocol.call(_dir(root, record), message, fds=stdio)
    return int(reply["exit_code"])


def diff(root: Path, record: ContainerRecord) -> list[Change]:
    """What the container changed in its filesystem (``A``/``C``/``D``), running or stopped."""
    reply = protocol.call(_dir(root, record), {"op": "diff"}, timeout=ANSWER_TIMEOUT)
    return [Change(path, kind) for kind, path in reply["changes"]]


def commit(
    root: Path,
    record: ContainerRecord,
    store_root: Path,
    ref: str | None = None,
    changes: Sequence[str] = (),
    message: str = "",
    author: str | None = None,
) -> str:
    """Make the container's changes a new image in the store at ``store_root``; its id."""
    request = {
        "op": "commit",
        "store": str(store_root),
        "ref": ref,
        "changes": list(changes),
        "message": message,
        "author": author,
    }
    return str(protocol.call(_dir(root, record), request)["image_id"])


def remove(root: Path, record: ContainerRecord, force: bool = False) -> None:
    """Remove the container and everything of it; returns once its supervisor has exited.

    A running container needs ``force`` (it is killed); without it the supervisor refuses
    with :class:`~runtime.errors.ContainerStateError`.
    """
    message = {"op": "remove", "force": force}
    _, sock = protocol.request(_dir(root, record), message, timeout=ANSWER_TIMEOUT)
    try:
        sock.settimeout(REMOVE_TIMEOUT)
        while sock.recv(4096):
            pass
    except TimeoutError as e:
        raise ContainerError(
            f"the supervisor of {record.name} ({record.short_id}) did not exit after removing it"
        ) from e
    finally:
        sock.close()


def read_logs(
    root: Path, record: ContainerRecord, *, follow: bool = False, tail: int | None = None
) -> Iterator[logs.LogRecord]:
    """The container's output so far; with ``follow``, then what it writes until it ends.

    Following holds a ``wait`` request open: its reply (or the supervisor going away) says the
    container ended, and then the rest of the log is read and the iteration stops.
    """
    directory = _dir(root, record)
    try:
        f = open(directory / LOG, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError as e:
        raise ContainerError(f"no such container: {record.name} (removed meanwhile)") from e
    with f:
        pending = b""

        def new_records() -> list[logs.LogRecord]:
            nonlocal pending
            data = pending + f.read()
            cut = data.rfind(b"\n") + 1
            pending = data[cut:]
            return list(logs.records(data[:cut].splitlines(keepends=True)))

        yield from logs.tail(new_records(), tail)
        if not follow:
            return
        waiter = _open_wait(directory)
        try:
            while True:
                ended = waiter is None or select.select([waiter], [], [], FOLLOW_POLL)[0]
                yield from new_records()
                if ended:
                    return
        finally:
            if waiter is not None:
                waiter.close()


def _open_wait(directory: Path) -> socket.socket | None:
    """A connection with a ``wait`` request sent (not yet answered); ``None`` when the
    supervisor is gone already."""
    try:
        sock = protocol.connect(directory)
    except OSError:
        return None
    try:
        control.send(sock, {"op": "wait"})
    except OSError:
        sock.close()
        return None
    return sock
