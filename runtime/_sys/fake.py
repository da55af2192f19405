"""A recording fake of :class:`~runtime._sys.Syscalls` for unit tests of mount plans.

It records every call in order (:attr:`FakeSyscalls.calls`) and keeps just enough of a
filesystem and mount table in memory to refuse what the kernel would refuse, so a test that runs
a whole plan through :func:`runtime.rootfs.apply` proves more than "the list came out as typed":

* a mount target must exist (created earlier by ``mkdir``/``touch``, seeded, or on the real
  filesystem): mounting before ``Mkdir`` fails with ``ENOENT``, as it would for real;
* a bind source must exist; a remount or a propagation change needs a mount point (``EINVAL``);
* ``pivot_root`` needs the working directory to be a mount point; afterwards absolute paths
  resolve below the new root, as they do in the container.

Nothing here touches the real filesystem except to *look* (``os.path.lexists``): a path the host
really has counts as existing. Paths under a mounted proc, sysfs, devpts or mqueue count as
existing too, since their content is the kernel's. :meth:`FakeSyscalls.fail` injects an error
for one call, to test how :func:`~runtime.rootfs.apply` reports it.
"""

from __future__ import annotations

import errno
import os
import posixpath
from dataclasses import dataclass
from typing import NoReturn

from runtime._sys import MNT_DETACH, MS_BIND, MS_PRIVATE, MS_RDONLY, MS_REMOUNT, MS_SLAVE

MS_SHARED = 1 << 20
MS_UNBINDABLE = 1 << 17
_PROPAGATION = MS_PRIVATE | MS_SLAVE | MS_SHARED | MS_UNBINDABLE

KERNEL_FILLED = frozenset(["proc", "sysfs", "devpts", "mqueue"])
"""Filesystem types whose content the fake cannot know: every path below them exists."""


@dataclass(frozen=True)
class Call:
    """One recorded call: the method name and its arguments exactly as passed."""

    name: str
    args: tuple[object, ...]


@dataclass
class FakeMount:
    """An entry of the fake mount table (``target`` is a host path)."""

    source: str | None
    target: str
    fstype: str | None
    flags: int
    data: str | None

    @property
    def readonly(self) -> bool:
        return bool(self.flags & MS_RDONLY)


@dataclass(frozen=True)
class _Failure:
    name: str
    path: str | None
    err: int


class FakeSyscalls:
    """:class:`~runtime._sys.Syscalls` in memory, recording calls; see the module docstring.

    ``existing`` seeds directories that exist before the first call (say, the rootfs directory
    the engine prepares). The host's ``/`` starts as a mount point, as it is for real.
    """

    def __init__(self, existing: tuple[str, ...] | list[str] = ()) -> None:
        self.calls: list[Call] = []
        self.dirs: set[str] = {"/"}
        self.files: set[str] = set()
        self.links: dict[str, str] = {}
        self.written: dict[str, str] = {}
        self.mounts: list[FakeMount] = [FakeMount(None, "/", "rootfs", 0, None)]
        self.root = "/"
        """The host path that is ``/`` for the caller (changes with ``pivot_root``)."""
        self.cwd = "/"
        """The working directory, as a host path."""
        self.old_root_attached = False
        """``True`` between ``pivot_root`` and the ``umount2`` that detaches the old root."""
        self._failures: list[_Failure] = []
        for d in existing:
            self._add_dir(_norm(d))

    # --- what tests ask ---

    def names(self) -> list[str]:
        """The names of the recorded calls, in order."""
        return [c.name for c in self.calls]

    def mount_calls(self) -> list[Call]:
        return [c for c in self.calls if c.name == "mount"]

    def mounts_at(self, path: str) -> list[FakeMount]:
        """Mounts stacked on the host path ``path``, bottom first."""
        p = _norm(path)
        return [m for m in self.mounts if m.target == p]

    def is_mount(self, path: str) -> bool:
        return bool(self.mounts_at(path))

    def exists(self, path: str) -> bool:
        """Whether the host path ``path`` exists for the fake (memory, kernel-filled, real)."""
        p = _norm(path)
        if p in self.dirs or p in self.files or p in self.links:
            return True
        if any(
            m.fstype in KERNEL_FILLED and p.startswith(m.target.rstrip("/") + "/")
            for m in self.mounts
        ):
            return True
        return os.path.lexists(p)

    def fail(self, name: str, path: str | None = None, err: int = errno.EPERM) -> None:
        """Make the next call ``name`` (on host path ``path``, if given) fail with ``err``."""
        self._failures.append(_Failure(name, None if path is None else _norm(path), err))

    # --- the Syscalls protocol ---

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._record("mount", source, target, fstype, flags, data)
        t = self._resolve(target)
        self._maybe_fail("mount", t)
        if not self.exists(t):
            self._raise(errno.ENOENT, "mount", target)
        if flags & MS_REMOUNT:
            if not self.is_mount(t):
                self._raise(errno.EINVAL, "mount (remount of a non-mount point)", target)
            top = self.mounts_at(t)[-1]
            top.flags = (top.flags & ~MS_RDONLY) | (flags & MS_RDONLY)
            return
        if flags & _PROPAGATION and fstype is None and not flags & MS_BIND:
            if not self.is_mount(t):
                self._raise(errno.EINVAL, "mount (propagation of a non-mount point)", target)
            return
        if flags & MS_BIND:
            if source is None or not self.exists(self._resolve(source)):
                self._raise(errno.ENOENT, "mount (bind source)", source or "")
            self.mounts.append(FakeMount(source, t, None, flags, data))
            return
        if fstype is None:
            self._raise(errno.EINVAL, "mount (no filesystem type)", target)
        self.mounts.append(FakeMount(source, t, fstype, flags, data))

    def umount2(self, target: str, flags: int = 0) -> None:
        self._record("umount2", target, flags)
        t = self._resolve(target)
        self._maybe_fail("umount2", t)
        if self.old_root_attached and t == self.root and flags & MNT_DETACH:
            self.old_root_attached = False  # the old root, stacked on the new one, goes away
            return
        if not self.is_mount(t):
            self._raise(errno.EINVAL, "umount2 (not a mount point)", target)
        self.mounts = [m for m in self.mounts if not _under(m.target, t)]

    def pivot_root(self, new_root: str, put_old: str) -> None:
        self._record("pivot_root", new_root, put_old)
        new = self._resolve(new_root)
        self._maybe_fail("pivot_root", new)
        if not self.is_mount(new):
            self._raise(errno.EINVAL, "pivot_root (new root is not a mount point)", new_root)
        old = self._resolve(put_old)
        if not _under(old, new):
            self._raise(errno.EINVAL, "pivot_root (put_old is not below the new root)", put_old)
        self.root = new
        self.old_root_attached = True

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._record("mkdir", path, mode)
        p = self._resolve(path)
        self._maybe_fail("mkdir", p)
        if p in self.files:
            self._raise(errno.EEXIST, "mkdir", path)
        self._add_dir(p)

    def touch(self, path: str) -> None:
        self._record("touch", path)
        p = self._resolve(path)
        self._maybe_fail("touch", p)
        if self.exists(p):
            return
        self._add_dir(posixpath.dirname(p))
        self.files.add(p)

    def mknod(self, path: str, mode: int, device: int) -> None:
        self._record("mknod", path, mode, device)
        p = self._resolve(path)
        self._maybe_fail("mknod", p)
        if self.exists(p):
            self._raise(errno.EEXIST, "mknod", path)
        if not self.exists(posixpath.dirname(p)):
            self._raise(errno.ENOENT, "mknod", path)
        self.files.add(p)

    def symlink(self, target: str, path: str) -> None:
        self._record("symlink", target, path)
        p = self._resolve(path)
        self._maybe_fail("symlink", p)
        if self.exists(p):
            return
        if not self.exists(posixpath.dirname(p)):
            self._raise(errno.ENOENT, "symlink", path)
        self.links[p] = target

    def chdir(self, path: str) -> None:
        self._record("chdir", path)
        p = self._resolve(path)
        self._maybe_fail("chdir", p)
        if p in self.files:
            self._raise(errno.ENOTDIR, "chdir", path)
        if not self.exists(p):
            self._raise(errno.ENOENT, "chdir", path)
        self.cwd = p

    def _record(self, name: str, *args: object) -> None:
        self.calls.append(Call(name, args))

    def _resolve(self, path: str) -> str:
        """The host path behind ``path`` as the caller sees it (after any ``pivot_root``)."""
        if path.startswith("/"):
            return _norm(posixpath.join(self.root, path.lstrip("/")))
        return _norm(posixpath.join(self.cwd, path))

    def _add_dir(self, path: str) -> None:
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def _maybe_fail(self, name: str, path: str) -> None:
        for f in self._failures:
            if f.name == name and f.path in (None, path):
                self._failures.remove(f)
                self._raise(f.err, name, path)

    @staticmethod
    def _raise(err: int, what: str, path: str) -> NoReturn:
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _norm(path: str) -> str:
    """``normpath`` without POSIX's special case of a leading ``//``."""
    p = posixpath.normpath(path)
    return "/" + p.lstrip("/") if p.startswith("//") else p


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")
