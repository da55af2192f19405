"""The build context as COPY and ADD see it: which files a source names, and their checksum.

Docker's rules, which this follows:

* a source is a path relative to the context root (a leading ``/`` too); one that climbs out of
  the context with ``..`` is refused;
* a source may hold wildcards, matched one path component at a time with Go's
  ``filepath.Match`` (``*``, ``?``, ``[a-z]``, ``[^a]``, ``\\`` escapes; ``*`` never crosses a
  ``/``); a pattern that matches nothing is an error, as is a missing path;
* files excluded by ``.dockerignore`` do not exist for the build: naming one is "not found",
  and they are left out of a directory that is copied;
* the source path itself is followed if it is a symlink (resolved inside the context, never
  outside it); symlinks *inside* a copied directory are copied as symlinks;
* ``--exclude`` patterns (``.dockerignore`` syntax) apply to paths relative to the copied
  directory, or to the file's name for a file source.

:func:`checksum` fingerprints what was selected -- for every entry its path below the source,
type, permission bits, content (sha256), link target and xattrs; never mtimes or owners -- so
the cache key of a COPY changes exactly when what it copies changes. File digests are memoised
by (device, inode, size, mtime, ctime): a file whose inode changed in any way is read again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.build.ignore import (
    ContextEntry,
    DockerIgnore,
    clean_path,
    ignore_file_for,
    walk_context,
)
from runtime.errors import BuildError
from runtime.image import safepath

__all__ = [
    "BuildContext",
    "DigestMemo",
    "Entry",
    "Source",
    "checksum",
    "entry_kind",
    "has_wildcards",
    "load_memo",
    "match_component",
    "save_memo",
    "selinux_free_xattrs",
]

_CHUNK = 1 << 20
_HOST_ONLY_XATTRS = frozenset({"security.selinux"})

DigestMemo = MutableMapping[tuple[int, int, int, int, int], str]
"""(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> sha256 hex of the file's content.

Any change to a file (content, mode, owner, xattrs, a rename over it) changes its ctime, so a
memo entry is never used for a file that changed since it was hashed.
"""

MEMO_LIMIT = 100_000
"""How many file digests :func:`save_memo` keeps (the most recently added)."""
_MEMO_VERSION = 1


def load_memo(path: str | os.PathLike[str]) -> dict[tuple[int, int, int, int, int], str]:
    """The file digests saved at ``path``; empty when missing or unreadable (it is only a memo)."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        if data.get("v") != _MEMO_VERSION:
            return {}
        return {
            (int(a), int(b), int(c), int(d), int(e)): str(h)
            for a, b, c, d, e, h in data.get("entries", [])
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def save_memo(
    path: str | os.PathLike[str], memo: Mapping[tuple[int, int, int, int, int], str]
) -> None:
    """Save ``memo`` at ``path`` atomically (a temporary file renamed over it); the last writer
    of concurrent builds wins, which loses nothing but time."""
    entries = [[*key, digest] for key, digest in list(memo.items())[-MEMO_LIMIT:]]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps({"v": _MEMO_VERSION, "entries": entries}))
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


@dataclass(frozen=True)
class Entry:
    """One thing to copy: ``rel`` is its path below the source (``""`` for the source itself)."""

    rel: str
    path: str
    """Where it is on the host."""
    st: os.stat_result
    link: str = ""
    """A symlink's target."""
    digest: str = ""
    """A regular file's sha256 (hex)."""
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @property
    def kind(self) -> str:
        return entry_kind(self.st.st_mode)


@dataclass(frozen=True)
class Source:
    """One matched source: ``path`` as matched (it names the copy), ``entries[0]`` the source
    itself (followed if a symlink) and, for a directory, its included contents in sorted order."""

    path: str
    entries: tuple[Entry, ...]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.entries[0].st.st_mode)

    @property
    def name(self) -> str:
        """The base name a file source gets in a destination directory."""
        return self.path.rsplit("/", 1)[-1] if self.path not in ("", ".") else ""


def entry_kind(mode: int) -> str:
    """``file``, ``dir``, ``symlink``, ``fifo``, ``char``, ``block`` or ``socket``."""
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
    ):
        if test(mode):
            return name
    return "socket"


# --- Go's filepath.Match, one component at a time (pure) -----------------------------------------

_WILDCARDS = re.compile(r"(?<!\\)[*?\[]")


def has_wildcards(pattern: str) -> bool:
    """Does ``pattern`` hold an unescaped ``*``, ``?`` or ``[``?"""
    return _WILDCARDS.search(pattern) is not None


def _component_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise ValueError(f"syntax error in pattern {pattern!r}: trailing backslash")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            parts: list[str] = []
            while j < n and (pattern[j] != "]" or not parts):
                ch = pattern[j]
                if ch == "\\" and j + 1 < n:
                    parts.append(re.escape(pattern[j + 1]))
                    j += 2
                    continue
                parts.append("-" if ch == "-" and parts and j + 1 < n else re.escape(ch))
                j += 1
            if j >= n:
                raise ValueError(f"syntax error in pattern {pattern!r}: unclosed '['")
            out.append(f"[{'^' if negate else ''}{''.join(parts)}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def match_component(pattern: str, name: str) -> bool:
    """Go's ``filepath.Match`` for one path component; ``ValueError`` for a bad pattern."""
    return _component_regex(pattern).fullmatch(name) is not None


# --- the context ---------------------------------------------------------------------------------


def selinux_free_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    """An entry's xattrs, sorted, without the host's own labels (not content)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        if name in _HOST_ONLY_XATTRS:
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _memo_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_digest(path: str, st: os.stat_result, memo: DigestMemo | None) -> str:
    key = _memo_key(st)
    if memo is not None:
        found = memo.get(key)
        if found is not None:
            return found
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    finally:
        os.close(fd)
    digest = h.hexdigest()
    if memo is not None:
        memo[key] = digest
    return digest


class BuildContext:
    """The files of a build context directory, with ``.dockerignore`` applied.

    The context is listed once, on first use (excluded directories that nothing re-includes are
    never entered), and every :meth:`select` works from that listing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        ignore: DockerIgnore | None = None,
        *,
        memo: DigestMemo | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise BuildError(f"build context {os.fspath(root)!r} is not a directory")
        self.ignore = ignore or DockerIgnore()
        self.memo: DigestMemo = {} if memo is None else memo
        self._index: dict[str, ContextEntry] | None = None
        self._children: dict[str, list[str]] = {}

    @classmethod
    def load(
        cls,
        root: str | os.PathLike[str],
        dockerfile: str | os.PathLike[str] | None = None,
        *,
        memo: DigestMemo | None = None,
    ) -> BuildContext:
        """The context at ``root`` with the ignore file docker would use for ``dockerfile``."""
        found = ignore_file_for(
            os.fspath(root), None if dockerfile is None else os.fspath(dockerfile)
        )
        ignore = None
        if found is not None:
            try:
                text = found.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise BuildError(f"cannot read {found}: {e}") from e
            ignore = DockerIgnore.parse(text, str(found))
        return cls(root, ignore, memo=memo)

    # -- the listing

    def _listing(self) -> dict[str, ContextEntry]:
        if self._index is None:
            index: dict[str, ContextEntry] = {}
            children: dict[str, list[str]] = {"": []}
            for entry in walk_context(self.root, self.ignore):
                index[entry.path] = entry
                parent = entry.path.rpartition("/")[0]
                children.setdefault(parent, []).append(entry.path)
                if entry.is_dir:
                    children.setdefault(entry.path, [])
            self._index, self._children = index, children
        return self._index

    def _readlink(self, rel: str) -> str | None:
        entry = self._listing().get(rel)
        if entry is None or not entry.is_symlink:
            return None
        try:
            return os.readlink(self.root / rel)
        except OSError:
            return None

    def exists(self, rel: str) -> bool:
        """Is ``rel`` (clean, relative) in the context, after ``.dockerignore``?"""
        return rel == "" or rel in self._listing()

    def _resolve(self, rel: str) -> str:
        """``rel`` with every symlink resolved inside the context."""
        try:
            return safepath.resolve(rel, self._readlink)
        except OSError as e:
            raise BuildError(f"cannot resolve {rel!r} in the build context: {e.strerror}") from e

    def _below(self, rel: str) -> Iterable[str]:
        """Every included path under the directory ``rel``, sorted depth first."""
        self._listing()
        stack = list(reversed(self._children.get(rel, [])))
        while stack:
            path = stack.pop()
            yield path
            stack.extend(reversed(self._children.get(path, [])))

    # -- selection

    def _expand(self, pattern: str) -> list[str]:
        """The context paths (clean, relative; ``""`` is the root) a source pattern names."""
        parts = [p for p in pattern.split("/") if p]
        found = [""]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt: list[str] = []
            for base in found:
                real = self._resolve(base) if base else ""
                if has_wildcards(part):
                    for child in self._children.get(real, []) if self._dir(real) else []:
                        name = child.rpartition("/")[2]
                        try:
                            if match_component(part, name):
                                nxt.append(f"{base}/{name}" if base else name)
                        except ValueError as e:
                            raise BuildError(f"bad source pattern {pattern!r}: {e}") from e
                else:
                    name = part.replace("\\", "") if "\\" in part else part
                    candidate = f"{base}/{name}" if base else name
                    if last or self._dir(self._resolve(candidate)):
                        nxt.append(candidate)
            found = sorted(nxt)
        return found

    def _dir(self, rel: str) -> bool:
        if rel == "":
            return True
        entry = self._listing().get(rel)
        return entry is not None and entry.is_dir

    def select(
        self, pattern: str, *, excludes: Sequence[str] = (), what: str = "COPY"
    ) -> list[Source]:
        """The sources one COPY/ADD source pattern names; :class:`BuildError` if none.

        ``excludes`` are ``--exclude`` patterns.
        """
        cleaned = clean_path(pattern.lstrip("/") or ".")
        if cleaned == ".." or cleaned.startswith("../"):
            raise BuildError(f"{what} source {pattern!r}: forbidden path outside the build context")
        rel = "" if cleaned == "." else cleaned
        self._listing()
        wild = has_wildcards(rel)
        paths = self._expand(rel) if wild else [re.sub(r"\\(.)", r"\1", rel)]
        exclude = DockerIgnore.from_patterns(excludes) if excludes else None
        sources = []
        for path in paths:
            real = self._resolve(path)
            if not self.exists(real):
                if wild:
                    continue
                raise BuildError(
                    f"{what} source {pattern!r}: not found in the build context "
                    f"{self.root} (or excluded by .dockerignore)"
                )
            source = self._source(path, real, exclude)
            if source is not None:
                sources.append(source)
        if not sources:
            raise BuildError(
                f"{what} source {pattern!r}: no file in the build context {self.root} matches "
                "(or all are excluded by .dockerignore)"
            )
        return sources

    def _source(self, path: str, real: str, exclude: DockerIgnore | None) -> Source | None:
        top = self._entry("", real)
        if not stat.S_ISDIR(top.st.st_mode):
            name = path.rpartition("/")[2]
            if exclude is not None and exclude.excluded(name):
                return None
            return Source(path or ".", (top,))
        entries = [top]
        prefix = f"{real}/" if real else ""
        with _BigFiles(self.memo) as big:
            for below in self._below(real):
                rel = below[len(prefix) :]
                if exclude is not None and exclude.excluded(rel):
                    continue
                entries.append(self._entry(rel, below, (big, len(entries))))
        for i, digest in big.digests():
            entries[i] = dataclasses.replace(entries[i], digest=digest)
        return Source(path or ".", tuple(entries))

    def _entry(self, rel: str, path: str, later: tuple[_BigFiles, int] | None = None) -> Entry:
        """The entry at ``path``; a big file's digest may be left to ``later`` (at that index)."""
        full = os.path.join(self.root, path) if path else os.fspath(self.root)
        try:
            st = os.lstat(full)
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
            digest = ""
            if stat.S_ISREG(st.st_mode) and not (later and later[0].take(later[1], full, st)):
                digest = _file_digest(full, st, self.memo)
        except OSError as e:
            raise BuildError(f"cannot read {full} in the build context: {e.strerror}") from e
        return Entry(rel, full, st, link, digest, selinux_free_xattrs(full))


class _BigFiles:
    """Hashes big files on other cores while the caller lists and hashes the small ones.

    File reads and ``hashlib`` release the GIL, so a 20 MB file in a context of small ones no
    longer adds its own hashing time (about 15 ms here) to the listing's. The threads start only
    when a big file turns up; leaving the ``with`` block waits for them.
    """

    SIZE = 4 << 20

    def __init__(self, memo: DigestMemo) -> None:
        self.memo = memo
        self._pool: Any = None
        self._futures: list[tuple[int, str, Any]] = []

    def take(self, index: int, path: str, st: os.stat_result) -> bool:
        """Hash ``path`` in a thread if it is big and not memoised; ``False``: do it yourself."""
        if st.st_size < self.SIZE or _memo_key(st) in self.memo:
            return False
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        self._futures.append((index, path, self._pool.submit(_file_digest, path, st, self.memo)))
        return True

    def digests(self) -> list[tuple[int, str]]:
        found = []
        for index, path, future in self._futures:
            try:
                found.append((index, future.result()))
            except OSError as e:
                raise BuildError(f"cannot read {path} in the build context: {e.strerror}") from e
        return found

    def __enter__(self) -> _BigFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def checksum(sources: Sequence[Source]) -> str:
    """The fingerprint of what the sources hold (see the module docstring): ``sha256:<hex>``."""
    h = hashlib.sha256()
    for source in sources:
        h.update(b"source\0" + os.fsencode(source.path) + b"\n")
        for e in source.entries:
            mode = e.st.st_mode
            fields = [
                os.fsencode(e.rel),
                e.kind.encode(),
                b"%o" % stat.S_IMODE(mode),
                e.digest.encode(),
                os.fsencode(e.link),
            ]
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                fields.append(b"%d,%d" % (os.major(e.st.st_rdev), os.minor(e.st.st_rdev)))
            fields += [os.fsencode(n) + b"=" + v.hex().encode() for n, v in e.xattrs]
            h.update(b"\0".join(fields) + b"\n")
    return "sha256:" + h.hexdigest()
