"""Resolve paths inside a root directory as if that root were ``/``.

An image layer, a container's root filesystem or a build context is untrusted: it may hold
symlinks that point to ``/etc`` or climb out with ``..``. Everything here treats the root the
way the kernel treats a ``chroot``: an absolute symlink restarts at the root, ``..`` at the root
stays at the root, and a chain of symlinks is followed up to the kernel's limit of 40.

Two ways to use it:

* :func:`resolve` is the pure algorithm (the idea of umoci's ``SecureJoin``): it takes a
  ``readlink`` callback, so it can be tested with a dict, and :func:`secure_join` runs it on the
  real filesystem. A path string is fine to *compute* with, but between computing and using it a
  symlink could be swapped in, so code that writes should use the second way.
* :func:`resolve_parent` and :func:`open_in_root` walk the same way with file descriptors: every
  component is opened ``O_NOFOLLOW`` relative to the directory fd found before, and symlinks are
  read and re-resolved by us, never by the kernel. The caller then creates or opens the last
  component with ``*at`` calls relative to a directory fd it holds; a symlink planted on any
  component afterwards cannot move it outside the root.

Errors are plain :class:`OSError` with an errno (``ELOOP`` for symlink loops, ``ENOTDIR`` when a
component is a file) and the offending path, as the kernel's own ``openat2(RESOLVE_IN_ROOT)``
would report them. Callers turn them into their own errors (layer entries, mount targets).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import deque
from collections.abc import Callable

MAX_SYMLINKS = 40
"""Linux's MAXSYMLINKS: how many symlinks one resolution may follow before ``ELOOP``."""

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _components(path: str) -> deque[str]:
    return deque(c for c in path.split("/") if c not in ("", "."))


def _loop_error(path: str) -> OSError:
    return OSError(errno.ELOOP, f"more than {MAX_SYMLINKS} symlinks while resolving", path)


def resolve(path: str, readlink: Callable[[str], str | None]) -> str:
    """Resolve ``path`` inside a root; return it relative to that root (``""`` is the root).

    ``readlink(rel)`` answers for a root-relative path: the symlink's target, or ``None`` when
    it is not a symlink (or does not exist). Every symlink is followed, the last component's
    too; ``..`` is applied to the path resolved so far and stops at the root. Components that
    are missing or are not directories are taken as plain names: the caller's open tells.
    """
    todo = _components(path)
    done: list[str] = []
    followed = 0
    while todo:
        part = todo.popleft()
        if part == "..":
            if done:
                done.pop()
            continue
        target = readlink("/".join([*done, part]))
        if target is None:
            done.append(part)
            continue
        followed += 1
        if followed > MAX_SYMLINKS:
            raise _loop_error(path)
        if target.startswith("/"):
            done.clear()
        todo.extendleft(reversed(_components(target)))
    return "/".join(done)


def secure_join(root: str | os.PathLike[str], path: str) -> str:
    """``root`` joined with ``path`` resolved inside it (see :func:`resolve`).

    The answer is a path string: right when computed, but not proof against a symlink swapped
    in later. To create or open, use :func:`resolve_parent` or :func:`open_in_root`.
    """
    base = os.fspath(root)

    def readlink(rel: str) -> str | None:
        full = os.path.join(base, rel)
        try:
            return os.readlink(full) if stat.S_ISLNK(os.lstat(full).st_mode) else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    rel = resolve(path, readlink)
    return os.path.join(base, rel) if rel else base


def open_root(root: str | os.PathLike[str]) -> int:
    """An ``O_PATH`` directory fd of ``root``, the anchor for the ``*_in_root`` functions.

    ``root`` itself is trusted (the caller chose it), so symlinks in its own path are followed.
    """
    return os.open(root, _O_PATH_DIR)


class Parent:
    """Where a path's last component lives: a directory fd inside the root, and the name.

    ``fd`` is an ``O_PATH`` directory fd owned by this object (close it, or use ``with``);
    ``name`` is one plain component, or ``"."`` when the path is the directory ``fd`` itself
    (the root, or a path ending in ``..``). ``relpath`` is where that is, relative to the root,
    with every symlink resolved: for messages, and for finding the entry again later.
    """

    __slots__ = ("fd", "name", "relpath")

    def __init__(self, fd: int, name: str, relpath: str) -> None:
        self.fd = fd
        self.name = name
        self.relpath = relpath

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Parent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Parent(fd={self.fd}, name={self.name!r}, relpath={self.relpath!r})"


def resolve_parent(
    root_fd: int, path: str, *, mkdir_mode: int | None = None, follow_last: bool = False
) -> Parent:
    """Walk ``path`` inside the root held by ``root_fd``, with fds, up to its last component.

    Directories on the way are opened ``O_NOFOLLOW`` one at a time; a symlink among them is
    read and resolved inside the root (as in :func:`resolve`). The last component is not
    followed unless ``follow_last`` (then a symlink there is resolved too, and the answer names
    what it points to). With ``mkdir_mode``, missing directories on the way are created with
    that mode; otherwise a missing one raises ``FileNotFoundError``. The last component may be
    missing: creating it is the caller's job, relative to the returned fd.
    """
    # The stack holds (fd, name) of the directories entered so far; stack[0] is the root.
    stack: list[tuple[int, str]] = [(os.dup(root_fd), "")]
    todo = _components(path)
    followed = 0
    try:
        while todo:
            part = todo.popleft()
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            last = not todo
            here = stack[-1][0]
            if last and not follow_last:
                return _parent(stack, part)
            try:
                fd = os.open(part, _O_PATH_NOFOLLOW, dir_fd=here)
            except FileNotFoundError:
                if last:
                    return _parent(stack, part)
                if mkdir_mode is None:
                    raise FileNotFoundError(
                        errno.ENOENT, os.strerror(errno.ENOENT), _where(stack, part)
                    ) from None
                # Made meanwhile? Then the open below looks at what it is.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mkdir_mode, dir_fd=here)
                fd = os.open(part, _O_PATH_NOFOLLOW, dir_fd=here)
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                try:
                    target = os.readlink("", dir_fd=fd)
                finally:
                    os.close(fd)
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise _loop_error(path)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                todo.extendleft(reversed(_components(target)))
                continue
            if last:
                os.close(fd)
                return _parent(stack, part)
            if not stat.S_ISDIR(mode):
                os.close(fd)
                raise NotADirectoryError(
                    errno.ENOTDIR, os.strerror(errno.ENOTDIR), _where(stack, part)
                )
            stack.append((fd, part))
        return _parent(stack, ".")
    finally:
        for fd, _ in stack:
            if fd >= 0:
                os.close(fd)


def _where(stack: list[tuple[int, str]], name: str) -> str:
    return "/".join([n for _, n in stack[1:]] + [name])


def _parent(stack: list[tuple[int, str]], name: str) -> Parent:
    """Hand the top of ``stack`` to a :class:`Parent`; the caller's ``finally`` closes the rest."""
    fd, _ = stack[-1]
    stack[-1] = (-1, stack[-1][1])
    rel = "/".join(n for _, n in stack[1:])
    if name != ".":
        rel = f"{rel}/{name}" if rel else name
    return Parent(fd, name, rel)


def open_in_root(
    root_fd: int, path: str, flags: int, mode: int = 0o644, *, follow_last: bool = True
) -> int:
    """``open(path, flags)`` inside the root: symlinks resolved in the root, never the kernel's.

    With ``follow_last`` a symlink as last component is resolved inside the root as well;
    without it, such a symlink fails with ``ELOOP`` (as ``O_NOFOLLOW`` does). ``O_CREAT``
    creates the last component relative to the directory fd found by the walk.
    """
    with resolve_parent(root_fd, path, follow_last=follow_last) as parent:
        if parent.name == ".":
            return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=parent.fd)
        return os.open(parent.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent.fd)
