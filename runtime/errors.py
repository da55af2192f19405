"""The error tree of the engine.

Every error the engine raises on purpose is an :class:`IsolateError`. Lower-layer errors
(``OSError`` from a syscall, a parse failure) are re-raised as the most specific class below,
``from`` the original, so callers can catch by meaning and still see the cause::

    IsolateError
    ├── UnsupportedHostError        the host lacks a feature (user namespaces, overlayfs, ...)
    ├── SpecError (ValueError)      a container spec, option or mount string is invalid
    ├── ContainerError              something went wrong with a container
    │   ├── SetupError              the child failed while building the container (stage, errno)
    │   │   └── IdMapError          uid/gid maps could not be written (newuidmap, /etc/subuid)
    │   ├── ExecError               the container's process could not be executed (argv[0])
    │   ├── ContainerStateError     the operation needs another state (e.g. exec into a stopped one)
    │   └── CallableError           a Python callable run inside raised; carries the remote traceback
    ├── ImageError                  images and the store
    │   ├── ImageNotFound (LookupError)
    │   ├── LayerError              a layer tar could not be read or unpacked
    │   │   └── UnsafePathError     an entry would resolve outside the layer root
    │   ├── StoreCorruptError       a digest does not match its content
    │   └── RegistryError           a registry refused or failed a request (names URL and status)
    │       └── AuthError           credentials are missing, wrong or refused
    └── BuildError                  a Dockerfile build failed
        └── DockerfileSyntaxError   with file and line
"""

from __future__ import annotations

import errno as _errno
import os


class IsolateError(Exception):
    """Base of every error raised on purpose by the engine."""


class UnsupportedHostError(IsolateError):
    """The host cannot do what was asked; ``how_to_fix`` says what to change."""

    def __init__(self, feature: str, reason: str, how_to_fix: str = "") -> None:
        self.feature = feature
        self.reason = reason
        self.how_to_fix = how_to_fix
        msg = f"{feature} is not available on this host: {reason}"
        if how_to_fix:
            msg += f"\n  fix: {how_to_fix}"
        super().__init__(msg)


class SpecError(IsolateError, ValueError):
    """A container spec, a command-line option or a mount string is invalid."""


class ContainerError(IsolateError):
    """Something went wrong with a container."""


class SetupError(ContainerError):
    """The container's setup failed in the child before the process ran.

    The child never runs the workload un-isolated: it reports the ``stage`` that failed and the
    ``errno`` to the parent and exits.
    """

    def __init__(self, stage: str, err: int, detail: str = "") -> None:
        self.stage = stage
        self.errno = err
        self.detail = detail
        name = _errno.errorcode.get(err, str(err)) if err else ""
        text = f"container setup failed at stage {stage!r}"
        if detail:
            text += f": {detail}"
        if err:
            text += f" ({name}: {os.strerror(err)})"
        super().__init__(text)


class IdMapError(SetupError):
    """The user namespace's uid/gid maps could not be written."""


class ExecError(ContainerError):
    """The container's command could not be executed (not found, not executable)."""

    def __init__(self, argv0: str, err: int, detail: str = "") -> None:
        self.argv0 = argv0
        self.errno = err
        self.detail = detail
        text = f"cannot execute {argv0!r} in the container: {detail or os.strerror(err)}"
        super().__init__(text)


class ContainerStateError(ContainerError):
    """The operation needs the container in another state (running, stopped)."""


class CallableError(ContainerError):
    """A Python callable run inside a container raised an exception that could not be re-raised.

    When the exception itself could be pickled, the engine re-raises it directly; this class is
    used when it could not, and carries the remote traceback text.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}\n\nRemote traceback:\n{remote_traceback}")


class ImageError(IsolateError):
    """Images and the image store."""


class ImageNotFound(ImageError, LookupError):
    """No image with that reference in the store."""


class LayerError(ImageError):
    """A layer tar could not be read or unpacked; names the entry."""


class UnsafePathError(LayerError):
    """A layer entry would resolve outside the layer root (tar-slip, symlink escape)."""


class StoreCorruptError(ImageError):
    """Content in the store does not match its digest."""


class RegistryError(ImageError):
    """Talking to a registry failed: names the registry, the request and the status or cause.

    Content that does not match its digest is a :class:`RegistryError` too (the registry sent
    it), and nothing of it is stored.
    """


class AuthError(RegistryError):
    """The registry wants credentials that are missing, or refused the ones given."""


class BuildError(IsolateError):
    """A Dockerfile build failed."""


class DockerfileSyntaxError(BuildError):
    """The Dockerfile could not be parsed; names the file and line."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line
        super().__init__(f"{path}:{line}: {message}")
