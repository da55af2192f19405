""".dockerignore matching (docker's rules) and walking a real context directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.build.ignore import (
    ContextEntry,
    DockerIgnore,
    clean_path,
    ignore_file_for,
    walk_context,
)
from runtime.errors import BuildError


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        ("", "."),
        (".", "."),
        ("./a", "a"),
        ("a//b/", "a/b"),
        ("a/./b", "a/b"),
        ("a/../b", "b"),
        ("../a", "../a"),
        ("/../a", "/a"),
        ("//a", "/a"),
        ("a/b/../..", "."),
    ],
)
def test_clean_path(path: str, cleaned: str) -> None:
    assert clean_path(path) == cleaned


CASES: list[tuple[list[str], str, bool]] = [
    # plain names match at the root only, and everything below a matched directory
    (["foo"], "foo", True),
    (["foo"], "foo/bar.txt", True),
    (["foo"], "a/foo", False),
    (["foo/bar"], "foo/bar/baz", True),
    # cleaning: ./rel, /abs, trailing slash, dot segments
    (["./rel"], "rel", True),
    (["/abs"], "abs", True),
    (["/abs/"], "abs/x", True),
    (["a/./b/../c"], "a/c", True),
    # * and ? do not cross /
    (["*.md"], "README.md", True),
    (["*.md"], "docs/README.md", False),
    (["*/*.md"], "docs/README.md", True),
    (["?.txt"], "a.txt", True),
    (["?.txt"], "ab.txt", False),
    (["a?b"], "a/b", False),
    # ** any number of directories
    (["**/*.pyc"], "x.pyc", True),
    (["**/*.pyc"], "a/b/c/x.pyc", True),
    (["**/*.pyc"], "a/b/c/x.py", False),
    (["**/__pycache__"], "pkg/__pycache__/m.cpython-311.pyc", True),
    (["a/**/b"], "a/b", True),
    (["a/**/b"], "a/x/y/b", True),
    (["a/**"], "a/x", True),
    (["a/**"], "a", False),
    (["**"], "anything/at/all", True),
    (["**.txt"], "dir/x.txt", True),
    # character classes
    (["[a-c].txt"], "b.txt", True),
    (["[a-c].txt"], "d.txt", False),
    (["[^a].txt"], "a.txt", False),
    (["[^a].txt"], "b.txt", True),
    (["[]x].txt"], "].txt", True),
    (["\\*.txt"], "*.txt", True),
    (["\\*.txt"], "a.txt", False),
    (["file[.]txt"], "file.txt", True),
    (["a+b(c)"], "a+b(c)", True),  # regex characters are literal
    (["$x"], "$x", True),
    # ! exceptions and last match wins
    (["*.txt", "!keep.txt"], "keep.txt", False),
    (["*.txt", "!keep.txt"], "drop.txt", True),
    (["!keep.txt", "*.txt"], "keep.txt", True),
    (["*.txt", "!keep.txt", "keep.txt"], "keep.txt", True),
    (["build", "!build/dist"], "build/dist/app.whl", False),
    (["build", "!build/dist"], "build/other", True),
    (["build", "!build/dist", "build/dist/*.map"], "build/dist/a.map", True),
    (["**/*.log", "!important/*.log"], "important/x.log", False),
    (["**/*.log", "!important/*.log"], "other/x.log", True),
    # comments are not patterns
    (["# foo"], "# foo", False),
    ([], "anything", False),
]


@pytest.mark.parametrize(("patterns", "path", "excluded"), CASES)
def test_matching(patterns: list[str], path: str, excluded: bool) -> None:
    ignore = DockerIgnore.parse("\n".join(patterns))
    assert ignore.excluded(path) is excluded


@pytest.mark.parametrize(("patterns", "path", "excluded"), CASES)
def test_incremental_state_agrees_with_full_matching(
    patterns: list[str], path: str, excluded: bool
) -> None:
    """What a walk computes from the parents' state equals matching the full path."""
    ignore = DockerIgnore.parse("\n".join(patterns))
    state = tuple(False for _ in ignore.patterns)
    parts = path.split("/")
    for i in range(len(parts)):
        state = ignore.state("/".join(parts[: i + 1]), state)
    assert ignore.decide(state) is excluded


def test_parse_comments_blanks_and_line_numbers() -> None:
    text = "\ufeff# comment\n\n  *.tmp  \n ! keep.tmp\n  # not a comment: leading blank\n"
    ignore = DockerIgnore.parse(text)
    assert [(p.pattern, p.exception, p.line) for p in ignore.patterns] == [
        ("*.tmp", False, 3),
        ("keep.tmp", True, 4),
        ("# not a comment: leading blank", False, 5),
    ]
    assert ignore.has_exceptions


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("a\n!\n", ".dockerignore:2: illegal exclusion pattern"), ("ok\n[abc\n", ":2: bad pattern")],
)
def test_parse_errors_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(BuildError, match=fragment.replace("[", "\\[")):
        DockerIgnore.parse(text)


def test_context_root_is_never_excluded() -> None:
    assert not DockerIgnore.parse("*\n**\n.\n").excluded(".")


@pytest.mark.parametrize(
    ("patterns", "directory", "skip"),
    [
        (["node_modules"], "node_modules", True),
        (["node_modules", "!node_modules/keep"], "node_modules", False),
        (["node_modules", "!other/keep"], "node_modules", True),
        (["build", "!**/*.keep"], "build", False),
        (["build", "!*/x"], "build", False),
        (["build", "!b*/x"], "build", False),
        (["build", "!c*/x"], "build", True),
        (["build", "!build"], "build", False),  # not excluded at all
        (["a"], "a/b", True),
        (["a", "!a/b/c"], "a/b", False),
        (["a", "!a/x/c"], "a/b", True),
        (["src"], "lib", False),
    ],
)
def test_can_skip_dir(patterns: list[str], directory: str, skip: bool) -> None:
    assert DockerIgnore.from_patterns(patterns).can_skip_dir(directory) is skip


# ---- walking a real directory ------------------------------------------------------------------


def make_tree(root: Path, files: list[str]) -> None:
    for name in files:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)


def paths(entries: list[ContextEntry]) -> list[str]:
    return [e.path + ("/" if e.is_dir else "") for e in entries]


def test_walk_without_ignore_lists_everything_sorted(tmp_path: Path) -> None:
    make_tree(tmp_path, ["b.txt", "a/z.txt", "a/c/", "Dockerfile"])
    assert paths(list(walk_context(tmp_path))) == [
        "Dockerfile",
        "a/",
        "a/c/",
        "a/z.txt",
        "b.txt",
    ]


def test_walk_reincludes_inside_an_excluded_directory(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        ["keep/x.txt", "cache/a/b/wanted.keep", "cache/a/junk", "cache/other/", "m.pyc", "p/m.pyc"],
    )
    ignore = DockerIgnore.parse("cache\n!cache/a/b/*.keep\n**/*.pyc\n")
    assert paths(list(walk_context(tmp_path, ignore))) == [
        "cache/",  # listed only because something below it is re-included
        "cache/a/",
        "cache/a/b/",
        "cache/a/b/wanted.keep",
        "keep/",
        "keep/x.txt",
        "p/",
    ]


def test_walk_does_not_descend_into_skippable_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, ["node_modules/a/b/c.js", "src/main.py", ".git/HEAD"])
    scanned: list[str] = []
    real_scandir = os.scandir

    def spy(path: os.PathLike[str]) -> object:
        scanned.append(os.path.relpath(path, tmp_path))
        return real_scandir(path)

    monkeypatch.setattr("runtime.build.ignore.os.scandir", spy)
    ignore = DockerIgnore.parse("node_modules\n.git\n")
    assert paths(list(walk_context(tmp_path, ignore))) == ["src/", "src/main.py"]
    assert sorted(scanned) == [".", "src"]


def test_walk_yields_symlinks_without_following_them(tmp_path: Path) -> None:
    make_tree(tmp_path, ["real/f.txt"])
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "dangling").symlink_to("/nonexistent")
    entries = {e.path: e for e in walk_context(tmp_path)}
    assert entries["link"] == ContextEntry("link", is_dir=False, is_symlink=True)
    assert entries["dangling"].is_symlink
    assert "link/f.txt" not in entries


def test_walk_unreadable_directory_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="cannot read build context directory"):
        list(walk_context(tmp_path / "missing"))


def test_ignore_file_for_prefers_the_dockerfile_specific_one(tmp_path: Path) -> None:
    assert ignore_file_for(tmp_path, "Dockerfile") is None
    (tmp_path / ".dockerignore").write_text("x")
    assert ignore_file_for(tmp_path, "Dockerfile") == tmp_path / ".dockerignore"
    (tmp_path / "build").mkdir()
    specific = tmp_path / "build" / "app.Dockerfile.dockerignore"
    specific.write_text("y")
    assert ignore_file_for(tmp_path, "build/app.Dockerfile") == specific
    assert ignore_file_for(tmp_path, tmp_path / "build" / "app.Dockerfile") == specific
    assert ignore_file_for(tmp_path) == tmp_path / ".dockerignore"
