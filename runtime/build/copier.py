"""COPY and ADD without a container: plan the entries of the new layer, then write them.

A RUN layer is captured from a container's overlay; a COPY/ADD layer is not. It is decided entry by
entry from the sources (the build context, another stage's or image's layers read through
:class:`~runtime.image.images.LayeredView`, a downloaded URL, a heredoc) and written straight into
the layer directory the store hands out. That is a job of its own, apart from driving the build
(:mod:`.builder`), and it is the part of the builder that writes untrusted names, so it is kept
where it can be read whole:

* plan (no writes): :func:`_plan_copy` applies docker's placement rules, ``--chown``,
  ``--chmod`` and ``--parents``, and keeps the metadata of the directories the image already
  has; the result is one :class:`_Put` a path;
* apply: :func:`_write_items` creates them under a root fd, each relative to a directory fd
  from :func:`runtime.image.safepath.resolve_parent` (a symlink planted by an earlier entry
  cannot lead a write outside the layer), and sends ADD archives through the safe unpacker
  (:func:`runtime.image.layer.unpack_tree`).

``RUN --mount=type=bind`` uses the same two halves for its private copies of a source.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runtime.build.context import Entry, Source, has_wildcards, selinux_free_xattrs
from runtime.build.context import match_component as _match
from runtime.build.ignore import clean_path
from runtime.errors import BuildError, IsolateError
from runtime.image import layer, safepath
from runtime.image.images import Found, LayeredView
from runtime.process import resolve_user

_CHMOD = re.compile(r"[0-7]{3,4}")


@dataclass(frozen=True)
class _Input:
    """One thing a COPY/ADD puts in place; ``name`` is what it is called in a directory."""

    name: str
    path: str
    context: Source | None = None
    source_view: LayeredView | None = None
    top: Found | None = None
    data: bytes | None = None
    host: str | None = None
    digest: str = ""
    mtime: int = 0
    file_mode: int = 0o644
    archive: bool = False

    @property
    def is_dir(self) -> bool:
        if self.context is not None:
            return self.context.is_dir
        if self.top is not None:
            return self.top.is_dir
        return False


@dataclass
class _Put:
    """One entry of the new layer."""

    path: str
    mode: int
    uid: int
    gid: int
    mtime: int
    xattrs: tuple[tuple[str, bytes], ...] = ()
    host: str | None = None
    data: bytes | None = None
    link: str = ""
    inode: tuple[int, int] | None = None
    rdev: int = 0
    archive: bool = False


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _is_archive(path: str) -> bool:
    """Is this file a tar archive (plain, gzip, bzip2 or xz)? Docker decides by content."""
    try:
        with tarfile.open(path, "r:*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False


def _select_view(view: LayeredView, pattern: str, op: str) -> list[_Input]:
    cleaned = clean_path(pattern.lstrip("/") or ".")
    rel = "" if cleaned == "." else cleaned
    if has_wildcards(rel):
        found = [""]
        for part in rel.split("/"):
            nxt = []
            for base in found:
                if has_wildcards(part):
                    nxt += [
                        f"{base}/{n}" if base else n for n in view.listdir(base) if _match(part, n)
                    ]
                else:
                    nxt.append(f"{base}/{part}" if base else part)
            found = nxt
        paths = [p for p in found if view.lookup(p) is not None]
    else:
        paths = [rel]
    inputs = []
    for path in paths:
        top = view.lookup(path)
        if top is None:
            raise BuildError(f"{op} --from source {pattern!r}: not found in the source stage")
        # The tree below is walked only when the step runs, not when the cache has it.
        inputs.append(_Input(path.rpartition("/")[2], path, source_view=view, top=top))
    if not inputs:
        raise BuildError(f"{op} --from source {pattern!r}: nothing matches in the source stage")
    return inputs


def _chown(spec: str, view: LayeredView) -> tuple[int, int]:
    """``--chown=user[:group]``: names from the image's ``/etc/passwd`` and ``/etc/group``; a
    user without a group gets the same number as gid, as docker does."""
    user, _, group = spec.partition(":")
    if not user:
        raise BuildError(f"--chown={spec}: no user")
    if user.isdigit():
        uid = int(user)
    else:
        try:
            uid = resolve_user(user, view.read_text("/etc/passwd"), "").uid
        except IsolateError as e:
            raise BuildError(f"--chown={spec}: {e}") from e
    if not group:
        return uid, uid
    if group.isdigit():
        return uid, int(group)
    for line in view.read_text("/etc/group").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == group and fields[2].isdigit():
            return uid, int(fields[2])
    raise BuildError(f"--chown={spec}: no group {group!r} in the image's /etc/group")


def _chmod(spec: str) -> int:
    if not _CHMOD.fullmatch(spec):
        raise BuildError(f"--chmod={spec}: only octal modes (like 0755) are supported")
    return int(spec, 8)


def _parent_dirs(
    items: dict[str, _Put], view: LayeredView, path: str, owner: tuple[int, int] | None
) -> None:
    """Entries for the directories above ``path``: as the image has them, or new (0755)."""
    head = path.rpartition("/")[0]
    if head:
        _dirs_to(items, view, head, owner)


def _dirs_to(
    items: dict[str, _Put], view: LayeredView, path: str, owner: tuple[int, int] | None
) -> None:
    """Entries for ``path`` and every directory above it."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        _ensure_dir(items, view, "/".join(parts[:i]), owner)


def _ensure_dir(
    items: dict[str, _Put], view: LayeredView, path: str, owner: tuple[int, int] | None
) -> None:
    if path in items:
        return
    found = view.lookup(path, follow=False)
    if found is not None and found.is_dir:
        st = found.st
        items[path] = _Put(
            path,
            st.st_mode,
            st.st_uid,
            st.st_gid,
            int(st.st_mtime),
            _xattrs(found.path),
        )
    else:
        uid, gid = owner or (0, 0)
        items[path] = _Put(path, stat.S_IFDIR | 0o755, uid, gid, 0)


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    return tuple(
        (n, v)
        for n, v in selinux_free_xattrs(path)
        if not n.startswith(layer.OVERLAY_XATTR_PREFIXES)
    )


def _put_entry(
    items: dict[str, _Put],
    path: str,
    entry: Entry,
    owner: tuple[int, int] | None,
    mode: int | None,
    keep_owner: bool,
) -> None:
    st = entry.st
    uid, gid = owner or ((st.st_uid, st.st_gid) if keep_owner else (0, 0))
    perms = stat.S_IMODE(st.st_mode) if mode is None or stat.S_ISLNK(st.st_mode) else mode
    items[path] = _Put(
        path,
        stat.S_IFMT(st.st_mode) | perms,
        uid,
        gid,
        int(st.st_mtime),
        entry.xattrs,
        host=entry.path if stat.S_ISREG(st.st_mode) else None,
        link=entry.link,
        inode=(st.st_dev, st.st_ino) if st.st_nlink > 1 and stat.S_ISREG(st.st_mode) else None,
        rdev=st.st_rdev,
    )


def _put_found(
    items: dict[str, _Put],
    path: str,
    found: Found,
    owner: tuple[int, int] | None,
    mode: int | None,
) -> None:
    st = found.st
    link = os.readlink(found.path) if stat.S_ISLNK(st.st_mode) else ""
    entry = Entry("", found.path, st, link, "", _xattrs(found.path))
    _put_entry(items, path, entry, owner, mode, True)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _plan_copy(
    view: LayeredView,
    inputs: Sequence[_Input],
    dest: str,
    *,
    dest_is_dir: bool,
    owner: tuple[int, int] | None,
    mode: int | None,
    parents: bool,
    keep_owner: bool,
) -> dict[str, _Put]:
    """The entries of a COPY/ADD layer, keyed by path (docker's placement rules).

    A directory source puts its contents into ``dest``; a file goes to ``dest/name`` when
    ``dest`` is a directory (a trailing ``/``, several sources, or an existing directory),
    else to ``dest`` itself; an ADD archive is unpacked into ``dest``. The destination is
    resolved through the image's symlinks; the directories above it keep their metadata.
    """
    items: dict[str, _Put] = {}
    existing = view.lookup(dest) if dest else None
    into_dir = dest_is_dir or (existing is not None and existing.is_dir)
    for inp in inputs:
        into = dest
        if parents:
            into = _join(dest, posixpath.dirname(inp.path))
        # Resolve the destination's directories through the image's symlinks.
        if inp.is_dir or inp.archive or into_dir:
            into = view.resolve(into) if into else ""
            target_dir = into
        else:
            head, _, tail = into.rpartition("/")
            head = view.resolve(head) if head else ""
            into = _join(head, tail)
            target_dir = head
        if target_dir:
            _dirs_to(items, view, target_dir, owner)
        if inp.is_dir:
            base = _join(into, inp.name) if parents else into
            if base:
                _parent_dirs(items, view, base, owner)
            _copy_tree(items, view, base, inp, owner, mode, keep_owner)
        elif inp.archive:
            if into:
                _ensure_dir(items, view, into, owner)
            assert inp.context is not None
            items[f"{into}/\0archive\0{len(items)}"] = _Put(
                into, 0, *(owner or (-1, -1)), 0, host=inp.context.entries[0].path, archive=True
            )
        else:
            path = _join(into, inp.name) if into_dir or parents else into
            if not path:
                raise BuildError(f"cannot copy {inp.path!r} onto the root directory")
            if path.rpartition("/")[0]:
                _parent_dirs(items, view, path, owner)
            _copy_file(items, path, inp, owner, mode, keep_owner)
    return items


def _copy_tree(
    items: dict[str, _Put],
    view: LayeredView,
    base: str,
    inp: _Input,
    owner: tuple[int, int] | None,
    mode: int | None,
    keep_owner: bool,
) -> None:
    if inp.context is not None:
        for entry in inp.context.entries:
            path = _join(base, entry.rel)
            if entry.rel == "" and (not base or _existing_dir(view, base)):
                continue  # the destination directory exists: it keeps its own metadata
            if path:
                _put_entry(items, path, entry, owner, mode, keep_owner)
        return
    assert inp.source_view is not None
    for rel, found in inp.source_view.walk(inp.path):
        path = _join(base, rel)
        if rel == "" and (not base or _existing_dir(view, base)):
            continue
        if path:
            _put_found(items, path, found, owner, mode)


def _existing_dir(view: LayeredView, path: str) -> bool:
    found = view.lookup(path)
    return found is not None and found.is_dir


def _copy_file(
    items: dict[str, _Put],
    path: str,
    inp: _Input,
    owner: tuple[int, int] | None,
    mode: int | None,
    keep_owner: bool,
) -> None:
    if inp.context is not None:
        _put_entry(items, path, inp.context.entries[0], owner, mode, keep_owner)
    elif inp.top is not None:
        _put_found(items, path, inp.top, owner, mode)
    else:
        uid, gid = owner or (0, 0)
        perms = inp.file_mode if mode is None else mode
        items[path] = _Put(
            path, stat.S_IFREG | perms, uid, gid, inp.mtime, host=inp.host, data=inp.data
        )


def _archive_members(tar: tarfile.TarFile, put: _Put, source: str) -> None:
    """Re-emit the members of an ADD archive below ``put.path`` (names cleaned, never above)."""
    try:
        with tarfile.open(source, "r:*") as archive:
            for member in archive:
                name = layer.clean_name(member.name, what=f"entry of {source}")
                if not name:
                    continue
                info = copy.copy(member)  # TarInfo.replace is 3.12 (and late 3.11) only
                info.name = _join(put.path, name)
                if member.islnk():
                    info.linkname = _join(
                        put.path, layer.clean_name(member.linkname, what=f"hard link in {source}")
                    )
                if put.uid >= 0:
                    info.uid, info.gid = put.uid, put.gid
                info.uname = info.gname = ""
                data = archive.extractfile(member) if member.isreg() else None
                tar.addfile(info, data)
    except (tarfile.TarError, EOFError) as e:
        raise BuildError(f"ADD: cannot unpack {source}: {e}") from e


def _write_items(items: Mapping[str, _Put], directory: Path, *, rootless: bool) -> None:
    """Write the planned entries into the empty ``directory``.

    ADD archives go through the safe unpacker first; everything else is written directly
    (``copy_file_range``, no tar in between), relative to directory fds found by
    :func:`runtime.image.safepath.resolve_parent`, so even a symlink planted by an earlier
    entry cannot lead a write outside ``directory``.
    """
    archives = {k: v for k, v in items.items() if v.archive}
    if archives:
        _unpack_archives(archives, directory, rootless=rootless)
    writer = _DirectWriter(directory, rootless=rootless)
    try:
        for key in sorted(items, key=lambda k: k.split("/")):
            if not items[key].archive:
                writer.put(items[key])
        writer.finish()
    finally:
        writer.close()


_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _DirectWriter:
    """Creates planned entries under a root fd: owner, then mode, xattrs, mtime (as tar does).

    Directories are made ``0700`` and get their mode and mtime last, deepest first: writing into
    a directory changes its mtime, and a read-only one would stop an unprivileged writer.
    """

    def __init__(self, root: Path, *, rootless: bool) -> None:
        self.root_fd = safepath.open_root(root)
        self.rootless = rootless
        self.dirs: list[_Put] = []
        self.first_link: dict[tuple[int, int], str] = {}

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def put(self, item: _Put) -> None:
        kind = stat.S_IFMT(item.mode)
        try:
            with safepath.resolve_parent(self.root_fd, item.path, mkdir_mode=0o700) as parent:
                if parent.name == ".":
                    return
                self._place(item, kind, parent)
        except OSError as e:
            raise BuildError(f"cannot write {item.path!r} into the layer: {e}") from e

    def _place(self, item: _Put, kind: int, parent: safepath.Parent) -> None:
        name, dfd = parent.name, parent.fd
        try:
            existing: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (kind == stat.S_IFDIR and stat.S_ISDIR(existing.st_mode)):
            if stat.S_ISDIR(existing.st_mode):
                raise BuildError(f"{item.path!r}: a directory is in the way")
            os.unlink(name, dir_fd=dfd)
        if item.inode is not None and item.inode in self.first_link:
            with safepath.resolve_parent(self.root_fd, self.first_link[item.inode]) as first:
                os.link(
                    first.name, name, src_dir_fd=first.fd, dst_dir_fd=dfd, follow_symlinks=False
                )
            return
        if kind == stat.S_IFDIR:
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=dfd)
            fd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
            )
            try:
                self._owner(fd, item)
                self._xattrs(fd, item)
            finally:
                os.close(fd)
            self.dirs.append(item)
        elif kind == stat.S_IFREG:
            fd = os.open(name, _O_NEW, 0o600, dir_fd=dfd)
            try:
                _fill(fd, item)
                self._owner(fd, item)
                os.fchmod(fd, stat.S_IMODE(item.mode))
                self._xattrs(fd, item)
                os.utime(fd, ns=(item.mtime * 10**9, item.mtime * 10**9))
            finally:
                os.close(fd)
            if item.inode is not None:
                self.first_link[item.inode] = item.path
        elif kind == stat.S_IFLNK:
            os.symlink(item.link, name, dir_fd=dfd)
            with contextlib.suppress(PermissionError):
                os.chown(name, item.uid, item.gid, dir_fd=dfd, follow_symlinks=False)
            ns = item.mtime * 10**9
            os.utime(name, ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)
        elif kind in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK):
            if kind == stat.S_IFIFO:
                os.mkfifo(name, 0o600, dir_fd=dfd)
            elif self.rootless:
                return  # device nodes cannot be made without privileges
            else:
                os.mknod(name, kind | 0o600, item.rdev, dir_fd=dfd)
            with contextlib.suppress(PermissionError):
                os.chown(name, item.uid, item.gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(item.mode), dir_fd=dfd)
            ns = item.mtime * 10**9
            os.utime(name, ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)

    def _owner(self, fd: int, item: _Put) -> None:
        try:
            os.fchown(fd, item.uid, item.gid)
        except PermissionError:
            if not self.rootless:
                raise  # rootless: entries stay the user's, who is root in the container

    def _xattrs(self, fd: int, item: _Put) -> None:
        for name, value in item.xattrs:
            try:
                os.setxattr(fd, name, value)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise

    def finish(self) -> None:
        for item in sorted(self.dirs, key=lambda d: d.path.count("/"), reverse=True):
            with safepath.resolve_parent(self.root_fd, item.path) as parent:
                fd = os.open(
                    parent.name,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=parent.fd,
                )
            try:
                os.fchmod(fd, stat.S_IMODE(item.mode))
                os.utime(fd, ns=(item.mtime * 10**9, item.mtime * 10**9))
            finally:
                os.close(fd)


def _fill(fd: int, item: _Put) -> None:
    """Write a regular file's content: in-kernel copy from the source file when there is one."""
    if item.data is not None:
        view = memoryview(item.data)
        while view:
            view = view[os.write(fd, view) :]
        return
    if item.host is None:
        return
    src = os.open(item.host, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            while os.copy_file_range(src, fd, 1 << 30):
                pass
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        os.lseek(src, 0, os.SEEK_SET)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        while chunk := os.read(src, 1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(src)


def _unpack_archives(items: Mapping[str, _Put], directory: Path, *, rootless: bool) -> None:
    """Unpack ADD archives (re-emitted below their destinations) with the safe unpacker."""

    def write(raw: IO[bytes]) -> None:
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for key in sorted(items):
                put = items[key]
                assert put.host is not None
                _archive_members(tar, put, put.host)

    layer.through_pipe(
        write, lambda reader: layer.unpack_tree(reader, directory, rootless=rootless), "add-archive"
    )
