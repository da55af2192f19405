"""The supervisor's socket: one request per connection, answered with one reply.

Frames are :mod:`runtime.control`'s (JSON objects with a length header). A request is
``{"op": NAME, ...arguments}``; ``exec`` sends the caller's stdin, stdout and stderr right
after it as ``SCM_RIGHTS``, so the command in the container reads and writes them directly: no
copying through the supervisor, and no terminal needed. The reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": {...}}``; the error comes back as the same class from
:mod:`runtime.errors` (:func:`encode_error` / :func:`decode_error`), so ``exec`` into a stopped
container is a :class:`~runtime.errors.ContainerStateError` on both sides.

The socket lives in the container's state directory, whose path can be longer than the 107
bytes a socket address holds (``/tmp/pytest-of-root/.../<64-hex id>/ctl.sock``). Both sides
therefore reach it through ``/proc/self/fd/<directory fd>/ctl.sock``, which is always short.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from runtime import control, errors
from runtime.detached.record import SOCKET
from runtime.errors import ContainerError, IsolateError

__all__ = ["bind", "call", "connect", "decode_error", "encode_error", "request"]


@contextlib.contextmanager
def _short_path(directory: Path) -> Iterator[str]:
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET}"
    finally:
        os.close(fd)


def bind(directory: Path, backlog: int = 16) -> socket.socket:
    """Listen on ``directory/ctl.sock`` (mode 0600: only the owner may talk to it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _short_path(directory) as path:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(directory: Path) -> socket.socket:
    """A connection to the supervisor of the container in ``directory``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _short_path(directory) as path:
            sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


# --- errors across the socket (pure) ------------------------------------------------------------


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An exception as a reply's ``error``: its class name, message and constructor fields."""
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, errors.ExecError):
        out.update(argv0=exc.argv0, errno=exc.errno, detail=exc.detail)
    elif isinstance(exc, errors.SetupError):
        out.update(stage=exc.stage, errno=exc.errno, detail=exc.detail)
    elif isinstance(exc, errors.UnsupportedHostError):
        out.update(feature=exc.feature, reason=exc.reason, how_to_fix=exc.how_to_fix)
    elif not isinstance(exc, IsolateError):
        out["type"] = "ContainerError"
        out["message"] = f"the supervisor failed: {type(exc).__name__}: {exc}"
    return out


_PLAIN = {
    cls.__name__: cls
    for cls in (
        errors.IsolateError,
        errors.SpecError,
        errors.ContainerError,
        errors.ContainerStateError,
        errors.ImageError,
        errors.ImageNotFound,
        errors.LayerError,
        errors.UnsafePathError,
        errors.StoreCorruptError,
        errors.RegistryError,
        errors.AuthError,
        errors.BuildError,
    )
}
"""The error classes whose constructor takes just the message."""


def decode_error(data: dict[str, Any]) -> IsolateError:
    """The exception :func:`encode_error` described (a :class:`ContainerError` for a class
    this side does not know)."""
    kind = str(data.get("type", ""))
    message = str(data.get("message", "the supervisor reported an error"))
    if kind == "ExecError":
        return errors.ExecError(data["argv0"], int(data["errno"]), data.get("detail", ""))
    if kind in ("SetupError", "IdMapError"):
        cls = errors.IdMapError if kind == "IdMapError" else errors.SetupError
        return cls(data["stage"], int(data["errno"]), data.get("detail", ""))
    if kind == "UnsupportedHostError":
        return errors.UnsupportedHostError(data["feature"], data["reason"], data["how_to_fix"])
    return _PLAIN.get(kind, ContainerError)(message)


# --- the client side ----------------------------------------------------------------------------


def request(
    directory: Path,
    message: dict[str, Any],
    fds: Sequence[int] = (),
    timeout: float | None = None,
) -> tuple[dict[str, Any], socket.socket]:
    """Send ``message`` (and ``fds``) to the supervisor; return its reply and the connection.

    The connection stays open for the caller: after ``remove`` it reads the end of stream,
    which comes when the supervisor has exited. An error reply is raised as its class; no
    reply within ``timeout`` seconds (``None``: wait for ever) is a :class:`ContainerError`.
    """
    cid = directory.name[:12]
    try:
        sock = connect(directory)
    except OSError as e:
        raise ContainerError(f"cannot reach the supervisor of container {cid}: {e}") from e
    try:
        sock.settimeout(timeout)
        control.send(sock, message)
        if fds:
            socket.send_fds(sock, [b"F"], list(fds))
        reply = control.recv(sock)
    except TimeoutError as e:
        sock.close()
        raise ContainerError(
            f"the supervisor of container {cid} did not answer {message.get('op')!r} within "
            f"{timeout} s"
        ) from e
    except BaseException:
        sock.close()
        raise
    if not isinstance(reply, dict):
        sock.close()
        raise ContainerError(
            f"the supervisor of container {directory.name[:12]} closed the connection without "
            "a reply (it was removed or killed)"
        )
    if not reply.get("ok"):
        sock.close()
        raise decode_error(reply.get("error") or {})
    return reply, sock


def call(
    directory: Path,
    message: dict[str, Any],
    fds: Sequence[int] = (),
    timeout: float | None = None,
) -> dict[str, Any]:
    """:func:`request` for the requests whose connection ends with the reply."""
    reply, sock = request(directory, message, fds, timeout)
    sock.close()
    return reply
