"""What a container is: frozen, validated dataclasses and no behaviour.

A :class:`ContainerSpec` says everything the engine needs to build a container; the engine turns
it into plans (mounts, id maps, process settings) with pure functions and applies them.
Parsing of user-facing strings (``-v src:dst:ro``, ``-e K=V``) lives here too, because the CLI,
the pytest marker and the Python API must agree on them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from runtime.errors import SpecError

HOST = "host"
"""The image name that means "the host's own root filesystem, read-only, with a private layer"."""

NETWORK_MODES = ("none", "host")
"""``none``: a private network namespace with only loopback. ``host``: the host's network
(no network namespace), as ``docker run --network=host``; the builder uses it for ``RUN``."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class BindMount:
    """A host path made visible inside the container (``-v SRC:DST[:ro]``)."""

    source: str
    target: str
    readonly: bool = False

    def __post_init__(self) -> None:
        if not os.path.isabs(self.source):
            raise SpecError(f"bind mount source must be an absolute path: {self.source!r}")
        _check_target(self.target, "bind mount")


@dataclass(frozen=True)
class TmpfsMount:
    """A private tmpfs inside the container (``--tmpfs DST[:size=64m,mode=1777]``)."""

    target: str
    options: str = "mode=1777"

    def __post_init__(self) -> None:
        _check_target(self.target, "tmpfs")


def _check_target(target: str, what: str) -> None:
    if not target.startswith("/"):
        raise SpecError(f"{what} target must be an absolute path inside the container: {target!r}")
    if ".." in target.split("/"):
        raise SpecError(f"{what} target must not contain '..': {target!r}")
    if target.strip("/") == "":
        raise SpecError(f"{what} target must not be the root directory: {target!r}")


@dataclass(frozen=True)
class Rootfs:
    """The layers of the root filesystem.

    ``lowers`` are read-only directories, topmost first (overlayfs order). ``host=True`` means the
    host's own ``/`` as the bottom layer (the "host" image); ``lowers`` then go on top of it.
    ``host_paths`` are host directories shown at the same paths on top of an image, each
    copy-on-write (the pytest plugin shows the project and the Python installation this way).
    """

    lowers: tuple[str, ...] = ()
    host: bool = False
    host_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.lowers and not self.host:
            raise SpecError("a root filesystem needs at least one layer (or host=True)")
        for d in (*self.lowers, *self.host_paths):
            if not os.path.isabs(d):
                raise SpecError(f"layer directory must be absolute: {d!r}")
        if self.host and self.host_paths:
            raise SpecError("host_paths are for images; the host image shows every host path")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything that makes one container.

    ``argv`` is the command (``None`` for a container that only runs a Python callable or waits
    for ``exec``). ``env`` is the complete environment: nothing leaks in from the caller.
    ``userns`` is ``None`` for "only when needed" (always as an unprivileged user, never as root).
    """

    rootfs: Rootfs
    argv: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({"PATH": DEFAULT_PATH}))
    cwd: str = "/"
    user: str | None = None
    hostname: str = "isolate"
    binds: tuple[BindMount, ...] = ()
    tmpfs: tuple[TmpfsMount, ...] = ()
    read_only: bool = False
    userns: bool | None = None
    network: str = "none"
    tty: bool = False
    init: bool = True
    pass_fds: tuple[int, ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        if self.argv is not None and not self.argv:
            raise SpecError("the command must not be empty")
        if self.argv is not None and any("\0" in a for a in self.argv):
            raise SpecError(f"the command must not contain NUL characters: {self.argv!r}")
        if not self.cwd.startswith("/"):
            raise SpecError(f"working directory must be absolute: {self.cwd!r}")
        if not _HOSTNAME_RE.match(self.hostname):
            raise SpecError(f"invalid hostname: {self.hostname!r}")
        if self.network not in NETWORK_MODES:
            raise SpecError(
                f"unsupported network mode {self.network!r} (supported: {', '.join(NETWORK_MODES)})"
            )
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key:
                raise SpecError(f"invalid environment variable name: {key!r}")
            if "\0" in value:
                raise SpecError(f"environment variable {key!r} contains a NUL character")
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "argv", None if self.argv is None else tuple(self.argv))


def parse_volume(text: str) -> BindMount:
    """Parse docker's ``-v SRC:DST[:ro|rw]``."""
    parts = text.split(":")
    if len(parts) == 2:
        src, dst, mode = parts[0], parts[1], "rw"
    elif len(parts) == 3:
        src, dst, mode = parts
    else:
        raise SpecError(f"invalid volume {text!r}: expected SRC:DST[:ro]")
    if mode not in ("ro", "rw"):
        raise SpecError(f"invalid volume {text!r}: mode must be 'ro' or 'rw', not {mode!r}")
    return BindMount(os.path.abspath(src), dst, readonly=mode == "ro")


def parse_tmpfs(text: str) -> TmpfsMount:
    """Parse docker's ``--tmpfs DST[:OPTIONS]``."""
    target, _, options = text.partition(":")
    return TmpfsMount(target, options or "mode=1777")


def parse_env(items: Sequence[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Apply docker's ``-e K=V`` items (``-e K`` copies K from ``base``, if set there)."""
    env: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise SpecError(f"invalid environment item {item!r}: expected KEY=VALUE")
        if eq:
            env[key] = value
        elif base is not None and key in base:
            env[key] = base[key]
    return env
