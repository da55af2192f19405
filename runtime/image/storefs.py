"""File-level helpers of the image store: locks, durable writes, tree walks and removal.

None of them needs a :class:`~runtime.image.store.Store`; each takes a path (or a directory fd)
and does one careful thing on it. They are kept apart from the store's bookkeeping (layout,
tags, cache, prune) because their care is what makes the store safe to share and to kill, and
it is easier to check in one short module:

* writes that become durable before they become visible (:func:`_write_synced`,
  :func:`_fsync_dir`, :func:`_flush_to_disk`), and flocks left in place (:func:`_flock`);
* removal and fingerprinting of trees that may hold read-only directories and symlinks to
  anywhere (:func:`_remove_tree`, :func:`tree_digest`): directory fds, ``O_NOFOLLOW``, owner
  permissions added only where needed and put back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from runtime.errors import ImageError

_CHUNK = 1 << 20


@contextmanager
def _flock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a flock on ``path`` (created if missing, left in place afterwards)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _disk_usage(root: Path) -> int:
    """Bytes of disk ``root``'s tree uses (hard links once; unreadable directories skipped)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return size


def _flush_to_disk() -> None:
    """Write all dirty data to disk before a layer becomes visible.

    One ``sync(2)`` instead of an fsync per file: a layer has thousands of files and each fsync
    costs a journal commit (measured: 3 s of fsyncs against 0.15 s of sync for 5000 files).
    ``syncfs(2)`` on the store's filesystem alone would be narrower, but Python has no binding
    and ctypes belongs in ``runtime._sys``.
    """
    os.sync()


def _remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it, never following a symlink.

    Works on directory file descriptors (``*at`` calls, ``O_NOFOLLOW``), so a symlink anywhere
    in the tree, or one swapped in meanwhile, is unlinked rather than followed. Directories we
    own but cannot write or search (a layer's read-only ``/usr``) get owner ``rwx`` first.
    Iterative, so a deep tree cannot exhaust Python's recursion limit.
    """
    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    frames: list[tuple[int, str, int, list[str]]] = []  # (parent fd, name, fd, names left)
    try:
        _remove_entry(parent, path.name, frames)
        while frames:
            dir_fd, name, fd, names = frames[-1]
            if names:
                _remove_entry(fd, names.pop(), frames)
            else:
                frames.pop()
                os.close(fd)
                os.rmdir(name, dir_fd=dir_fd)
    except OSError as e:
        raise ImageError(f"cannot remove {path} from the image store: {e}") from e
    finally:
        for _, _, fd, _ in frames:
            os.close(fd)
        os.close(parent)


def _remove_entry(dir_fd: int, name: str, frames: list[tuple[int, str, int, list[str]]]) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    _grant_owner(dir_fd, name, st, 0o700)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        names = os.listdir(fd)
    except BaseException:
        os.close(fd)
        raise
    frames.append((dir_fd, name, fd, names))


def _grant_owner(dir_fd: int, name: str, st: os.stat_result, bits: int) -> None:
    """Add owner permission ``bits`` to a directory we own and lack them on (not as root)."""
    if not _lacks_owner_bits(st, bits):
        return
    # chmod through an O_PATH descriptor opened with O_NOFOLLOW: if ``name`` was swapped for a
    # symlink since the stat, the open fails instead of chmod reaching the link's target.
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | bits)
    finally:
        os.close(fd)


def tree_digest(root: Path) -> str:
    """A digest of a directory tree's names, types, modes, owners, contents, targets and xattrs.

    Modification times are left out on purpose: they are not content, and overlay does not
    change lowers. Used by default to fingerprint unpacked layers for :meth:`Store.fsck`.
    """
    digest = hashlib.sha256()
    base = os.fsencode(root)
    # Paths to visit, and (directory, mode) to restore once its subtree is done: a directory we
    # opened up for reading stays open until then, since its children need it searchable.
    todo: list[bytes | tuple[bytes, int]] = [b""]
    try:
        while todo:
            item = todo.pop()
            if isinstance(item, tuple):
                os.chmod(*item)
                continue
            path = os.path.join(base, item) if item else base
            st = os.lstat(path)
            digest.update(_entry_line(item, path, st))
            if stat.S_ISDIR(st.st_mode):
                if _lacks_owner_bits(st, 0o500):
                    os.chmod(path, stat.S_IMODE(st.st_mode) | 0o500)
                    todo.append((path, stat.S_IMODE(st.st_mode)))
                children = sorted(os.listdir(path), reverse=True)
                todo.extend(os.path.join(item, c) if item else c for c in children)
    finally:
        for item in reversed(todo):
            if isinstance(item, tuple):
                with suppress(OSError):
                    os.chmod(*item)
    return "sha256:" + digest.hexdigest()


def _entry_line(rel: bytes, path: bytes, st: os.stat_result) -> bytes:
    mode = st.st_mode
    fields = [rel, b"%o" % mode, b"%d" % st.st_uid, b"%d" % st.st_gid]
    if stat.S_ISREG(mode):
        content = hashlib.sha256()
        with _owner_access(path, st, 0o400), open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                content.update(chunk)
        fields += [b"%d" % st.st_size, content.hexdigest().encode()]
    elif stat.S_ISLNK(mode):
        fields.append(os.readlink(path))
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        fields.append(b"%d,%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)))
    for name in sorted(_xattrs(path)):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        fields.append(os.fsencode(name) + b"=" + value.hex().encode())
    return b"\0".join(fields) + b"\n"


def _xattrs(path: bytes) -> list[str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    return [n for n in names if n != "security.selinux"]  # relabelled by the host, not content


def _lacks_owner_bits(st: os.stat_result, bits: int) -> bool:
    """Do we own this entry, miss owner ``bits`` on it, and lack root's override?"""
    uid = os.geteuid()
    return uid != 0 and st.st_uid == uid and st.st_mode & bits != bits


@contextmanager
def _owner_access(path: bytes, st: os.stat_result, bits: int) -> Iterator[None]:
    """Briefly add owner permission ``bits`` to a file we own but cannot read (not as root)."""
    if not _lacks_owner_bits(st, bits):
        yield
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) | bits)
    try:
        yield
    finally:
        os.chmod(path, stat.S_IMODE(st.st_mode))
