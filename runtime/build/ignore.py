""".dockerignore: which files of the build context the builder may see.

Docker's rules (moby/patternmatcher), which this follows:

* one pattern a line; a line starting with ``#`` is a comment; blanks around are trimmed;
* a pattern is cleaned like Go's ``filepath.Clean`` (``./a`` -> ``a``, ``a//b/`` -> ``a/b``,
  ``a/../b`` -> ``b``) and a leading ``/`` is dropped: patterns are relative to the context;
* ``*`` matches any run of characters but ``/``, ``?`` one character but ``/``, ``[...]`` a
  character class (``[^...]`` negated), ``\\`` escapes; ``**`` matches any number of
  directories (``**/*.pyc``, ``a/**``, ``**`` alone);
* a pattern that matches a directory matches everything under it;
* ``!pattern`` re-includes; for each path the **last** matching pattern wins.

:func:`walk_context` lists what is included, skipping a whole excluded directory when no
``!`` pattern could re-include anything under it, and listing an excluded directory only when
something below it is re-included (as docker's file sync does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.errors import BuildError

__all__ = [
    "ContextEntry",
    "DockerIgnore",
    "IgnorePattern",
    "clean_path",
    "ignore_file_for",
    "walk_context",
]

_MatchKind = Literal["exact", "prefix", "suffix", "regex"]


def clean_path(path: str) -> str:
    """Lexically clean a slash path like Go's ``path.Clean`` (``""`` -> ``"."``)."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(seg)
    out = "/".join(parts)
    if rooted:
        return "/" + out
    return out or "."


def _class_regex(pattern: str, i: int) -> tuple[str, int]:
    """Translate the character class starting at ``pattern[i] == '['``; return (regex, next i)."""
    n = len(pattern)
    j = i + 1
    negate = j < n and pattern[j] == "^"
    if negate:
        j += 1
    parts: list[str] = []
    first = True
    while j < n and (pattern[j] != "]" or first):
        c = pattern[j]
        first = False
        if c == "\\":
            if j + 1 >= n:
                break
            parts.append(re.escape(pattern[j + 1]))
            j += 2
            continue
        parts.append("-" if c == "-" else re.escape(c))
        j += 1
    if j >= n or not parts:
        raise ValueError("syntax error in pattern (unclosed character class)")
    return f"[{'^' if negate else ''}{''.join(parts)}]", j + 1


def _compile(pattern: str) -> tuple[_MatchKind, re.Pattern[str] | None]:
    """Classify ``pattern`` like patternmatcher does, and build a regex where one is needed."""
    out: list[str] = ["^"]
    kind: _MatchKind = "exact"
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                start = i
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                if i >= n:
                    if kind == "exact":
                        kind = "prefix"
                    else:
                        out.append(".*")
                        kind = "regex"
                else:
                    out.append("(.*/)?")
                    kind = "regex"
                if start == 0:
                    kind = "suffix"
                continue
            out.append("[^/]*")
            kind = "regex"
        elif c == "?":
            out.append("[^/]")
            kind = "regex"
        elif c == "\\":
            if i + 1 < n:
                out.append(re.escape(pattern[i + 1]))
                kind = "regex"
                i += 2
                continue
            out.append(re.escape(c))
        elif c == "[":
            text, i = _class_regex(pattern, i)
            out.append(text)
            kind = "regex"
            continue
        else:
            out.append(re.escape(c))
        i += 1
    if kind != "regex":
        return kind, None
    out.append("$")
    return kind, re.compile("".join(out), re.DOTALL)


def _segment_regex(segment: str) -> re.Pattern[str]:
    _, regex = _compile(segment)
    if regex is None:
        return re.compile(re.escape(segment))
    return regex


@dataclass(frozen=True)
class IgnorePattern:
    """One cleaned pattern; ``exception`` for ``!pattern`` (re-include)."""

    pattern: str
    exception: bool = False
    line: int = 0
    _kind: _MatchKind = field(default="exact", repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def compile(cls, pattern: str, exception: bool = False, line: int = 0) -> IgnorePattern:
        """Build a pattern; raises ``ValueError`` for a malformed one (unclosed ``[``)."""
        kind, regex = _compile(pattern)
        return cls(pattern, exception, line, kind, regex)

    def matches(self, path: str) -> bool:
        """Does the pattern match ``path`` itself (a cleaned, slash-separated relative path)?"""
        if self._kind == "exact":
            return path == self.pattern
        if self._kind == "prefix":
            return path.startswith(self.pattern[:-2])
        if self._kind == "suffix":
            suffix = self.pattern[2:]
            if path.endswith(suffix):
                return True
            return suffix.startswith("/") and path == suffix[1:]
        assert self._regex is not None
        return self._regex.match(path) is not None

    def could_match_below(self, directory: str) -> bool:
        """Could this pattern match some path strictly under ``directory``?

        Conservative: ``True`` when unsure. Used to decide whether an excluded directory must
        still be walked because an exception might re-include something inside it.
        """
        if "**" in self.pattern:
            return True
        segments = self.pattern.split("/")
        parts = directory.split("/")
        if len(segments) <= len(parts):
            return False
        for segment, part in zip(segments, parts, strict=False):
            if "[" in segment:
                continue  # a class may match anything; stay conservative
            if not _segment_regex(segment).fullmatch(part):
                return False
        return True


@dataclass(frozen=True)
class DockerIgnore:
    """The patterns of a ``.dockerignore``, in order."""

    patterns: tuple[IgnorePattern, ...] = ()

    @classmethod
    def parse(cls, text: str, path: str = ".dockerignore") -> DockerIgnore:
        """Parse a ``.dockerignore`` file's text; a bad pattern is a BuildError naming the line."""
        out: list[IgnorePattern] = []
        for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
            if raw.startswith("#"):
                continue
            line = raw.strip()
            if not line:
                continue
            exception = line.startswith("!")
            if exception:
                line = line[1:].strip()
                if not line:
                    raise BuildError(f'{path}:{number}: illegal exclusion pattern: "!"')
            line = clean_path(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
            try:
                out.append(IgnorePattern.compile(line, exception, number))
            except ValueError as e:
                raise BuildError(f"{path}:{number}: bad pattern {raw.strip()!r}: {e}") from e
        return cls(tuple(out))

    @classmethod
    def from_patterns(cls, patterns: Sequence[str]) -> DockerIgnore:
        """Build from pattern strings (e.g. ``COPY --exclude``), one per item."""
        return cls.parse("\n".join(p for p in patterns if not p.startswith("#")), "<patterns>")

    @property
    def has_exceptions(self) -> bool:
        return any(p.exception for p in self.patterns)

    def state(self, path: str, parent: tuple[bool, ...] | None = None) -> tuple[bool, ...]:
        """For each pattern, whether it matches ``path`` or one of its parent directories.

        Pass the parent directory's state to avoid re-checking every ancestor (a walk does).
        """
        if parent is None:
            parents = path.split("/")[:-1]
            prefixes = ["/".join(parents[: i + 1]) for i in range(len(parents))]
            return tuple(
                p.matches(path) or any(p.matches(prefix) for prefix in prefixes)
                for p in self.patterns
            )
        return tuple(
            inherited or p.matches(path) for inherited, p in zip(parent, self.patterns, strict=True)
        )

    def decide(self, state: tuple[bool, ...]) -> bool:
        """Excluded or not, from a :meth:`state`: the last matching pattern wins."""
        for matched, pattern in zip(reversed(state), reversed(self.patterns), strict=True):
            if matched:
                return not pattern.exception
        return False

    def excluded(self, path: str) -> bool:
        """Is ``path`` (relative to the context, ``/``-separated) excluded from the context?"""
        path = clean_path(path)
        if path == ".":
            return False  # docker never excludes the context root itself
        return self.decide(self.state(path))

    def can_skip_dir(self, path: str, state: tuple[bool, ...] | None = None) -> bool:
        """True when the directory and everything under it is excluded, so a walk may skip it."""
        path = clean_path(path)
        if state is None:
            state = self.state(path)
        if not self.decide(state):
            return False
        return not any(p.exception and p.could_match_below(path) for p in self.patterns)


@dataclass(frozen=True)
class ContextEntry:
    """One included entry of the build context; ``path`` is relative and ``/``-separated."""

    path: str
    is_dir: bool
    is_symlink: bool = False


@dataclass
class _Pending:
    """An excluded directory that is listed only if something below it is included."""

    entry: ContextEntry
    parent: _Pending | None
    emitted: bool = False


def _emit_parents(pending: _Pending | None) -> list[ContextEntry]:
    chain: list[_Pending] = []
    node = pending
    while node is not None and not node.emitted:
        chain.append(node)
        node = node.parent
    for node in chain:
        node.emitted = True
    return [n.entry for n in reversed(chain)]


def walk_context(root: Path | str, ignore: DockerIgnore | None = None) -> Iterator[ContextEntry]:
    """Yield the included entries under ``root`` in sorted, depth-first order.

    Symlinks are yielded, never followed. A directory is yielded before its contents. Raises
    :class:`~runtime.errors.BuildError` if a directory cannot be read.
    """
    rules = ignore or DockerIgnore()
    root = Path(root)

    def visit(
        directory: Path, rel: str, parent: tuple[bool, ...], pending: _Pending | None
    ) -> Iterator[ContextEntry]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise BuildError(f"cannot read build context directory {directory}: {e}") from e
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            state = rules.state(path, parent)
            excluded = rules.decide(state)
            item = ContextEntry(path, is_dir, entry.is_symlink())
            if is_dir:
                if excluded:
                    if rules.can_skip_dir(path, state):
                        continue
                    yield from visit(Path(entry.path), path, state, _Pending(item, pending))
                    continue
                yield from _emit_parents(pending)
                yield item
                yield from visit(Path(entry.path), path, state, None)
            elif not excluded:
                yield from _emit_parents(pending)
                yield item

    yield from visit(root, "", tuple(False for _ in rules.patterns), None)


def ignore_file_for(context: Path | str, dockerfile: Path | str | None = None) -> Path | None:
    """The ignore file docker would use: ``<Dockerfile>.dockerignore`` next to the Dockerfile
    if it exists, else ``.dockerignore`` at the context root, else ``None``."""
    if dockerfile is not None:
        df = Path(dockerfile)
        if not df.is_absolute():
            df = Path(context) / df
        specific = df.with_name(df.name + ".dockerignore")
        if specific.is_file():
            return specific
    default = Path(context) / ".dockerignore"
    return default if default.is_file() else None
