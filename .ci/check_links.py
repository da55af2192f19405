"""Check that the relative links in Markdown files point to files (and headings) that exist.

Usage: ``python .ci/check_links.py README.md docs`` (a directory means its ``*.md`` files).
Prints ``file:line: target: reason`` for each broken link and exits 1 if there was any.

Web links are not fetched (CI has no network to spare and a flaky site should not fail a
build); links that leave the repository are reported, since they break on every other clone.
Code blocks and code spans are skipped: a ``[x](y)`` there is an example, not a link.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent

_INLINE = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+).*?\1")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines outside fenced code blocks, with code spans blanked out."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, _CODE_SPAN.sub("", line)


def links(text: str) -> Iterator[tuple[int, str]]:
    """Every link target in ``text`` with its line number."""
    for number, line in _prose_lines(text):
        for inline in _INLINE.finditer(line):
            yield number, inline.group(1).strip("<>")
        reference = _REFERENCE.match(line)
        if reference:
            yield number, reference.group(1).strip("<>")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings, with GitHub's ``-1``, ``-2`` for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in _prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def problem(source: Path, target: str, repo: Path = REPO) -> str | None:
    """Why ``target``, linked from ``source``, is broken; None when it is fine or not checked."""
    if _SCHEME.match(target):
        return None  # http:, https:, mailto: - not fetched
    path_part, _, fragment = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if path_part.startswith("/"):
        resolved = (repo / path_part.lstrip("/")).resolve()
    else:
        resolved = (source.parent / path_part).resolve() if path_part else source.resolve()
    if not resolved.is_relative_to(repo.resolve()):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file"
    if not fragment or resolved.suffix != ".md" or not resolved.is_file():
        return None
    if fragment.lower() not in anchors(resolved.read_text(encoding="utf-8")):
        return f"no heading with anchor #{fragment} in {resolved.relative_to(repo.resolve())}"
    return None


def markdown_files(args: list[str]) -> Iterator[Path]:
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            yield from sorted(p.rglob("*.md"))
        elif p.is_file():
            yield p
        else:
            raise FileNotFoundError(f"{arg}: no such file or directory")


def main(argv: list[str]) -> int:
    try:
        files = list(markdown_files(argv or ["README.md", "docs"]))
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    broken = 0
    for path in files:
        for number, target in links(path.read_text(encoding="utf-8")):
            why = problem(path, target)
            if why is not None:
                print(f"{path}:{number}: {target}: {why}")
                broken += 1
    print(f"{len(files)} files checked, {broken} broken links", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
