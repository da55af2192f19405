"""COPY/ADD source selection and checksums, on small real directories."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from runtime.build import context as context_module
from runtime.build.context import (
    BuildContext,
    DigestMemo,
    Source,
    _BigFiles,  # its size threshold
    checksum,
    has_wildcards,
    load_memo,
    match_component,
    save_memo,
)
from runtime.build.ignore import DockerIgnore
from runtime.errors import BuildError


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def ctx(root: Path, ignore: str = "") -> BuildContext:
    return BuildContext(root, DockerIgnore.parse(ignore) if ignore else None)


def paths(sources: list[Source]) -> list[str]:
    return [s.path for s in sources]


def rels(source: Source) -> list[str]:
    return [e.rel for e in source.entries]


# --- Go's filepath.Match ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", ".txt", True),
        ("*.txt", "a.txt.bak", False),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("[a-c]x", "bx", True),
        ("[a-c]x", "dx", False),
        ("[^a-c]x", "dx", True),
        ("[^a-c]x", "ax", False),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("*", "", True),
        ("hom*", "home", True),
    ],
)
def test_match_component_follows_go_filepath_match(pattern: str, name: str, expected: bool) -> None:
    assert match_component(pattern, name) is expected


@pytest.mark.parametrize("bad", ["[abc", "a\\"])
def test_match_component_refuses_malformed_patterns(bad: str) -> None:
    with pytest.raises(ValueError, match="syntax error"):
        match_component(bad, "abc")


def test_has_wildcards_ignores_escaped_ones() -> None:
    assert has_wildcards("src/*.py")
    assert has_wildcards("a[bc]")
    assert not has_wildcards("plain/path.txt")
    assert not has_wildcards("a\\*b")


# --- selection -------------------------------------------------------------------------------


def test_a_file_a_directory_and_the_root(tmp_path: Path) -> None:
    c = ctx(tree(tmp_path, {"a.txt": "a", "src/x.py": "x", "src/sub/y.py": "y"}))
    [f] = c.select("a.txt")
    assert (f.path, f.is_dir, f.name, rels(f)) == ("a.txt", False, "a.txt", [""])
    [d] = c.select("/src/")
    assert d.is_dir and rels(d) == ["", "sub", "sub/y.py", "x.py"]
    [root] = c.select(".")
    assert root.path == "." and "src/sub/y.py" in rels(root)


def test_wildcards_match_one_component_at_a_time(tmp_path: Path) -> None:
    c = ctx(tree(tmp_path, {"a.txt": "", "b.txt": "", "c.md": "", "d/e.txt": "", "f/g/h.txt": ""}))
    assert paths(c.select("*.txt")) == ["a.txt", "b.txt"]
    assert paths(c.select("*/*.txt")) == ["d/e.txt"]
    assert paths(c.select("[ab].*")) == ["a.txt", "b.txt"]
    with pytest.raises(BuildError, match="no file in the build context"):
        c.select("*.rs")


def test_missing_and_outside_sources_are_errors(tmp_path: Path) -> None:
    c = ctx(tree(tmp_path, {"a": ""}))
    with pytest.raises(BuildError, match="'nope': not found in the build context"):
        c.select("nope")
    with pytest.raises(BuildError, match="outside the build context"):
        c.select("../a")


def test_dockerignored_files_do_not_exist(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {"keep.txt": "", "secret.env": "", "logs/a.log": "", "logs/keep.log": "", "b.pyc": ""},
    )
    c = ctx(root, "*.env\nlogs\n!logs/keep.log\n**/*.pyc\n")
    with pytest.raises(BuildError, match=r"excluded by \.dockerignore"):
        c.select("secret.env")
    [everything] = c.select(".")
    assert rels(everything) == ["", "keep.txt", "logs", "logs/keep.log"]
    assert paths(c.select("*")) == ["keep.txt", "logs"]


def test_the_source_symlink_is_followed_inside_the_context_only(tmp_path: Path) -> None:
    root = tree(tmp_path / "c", {"real/f.txt": "data", "dir/inner.txt": ""})
    (root / "link").symlink_to("real")
    (root / "dir" / "rel-link").symlink_to("../real/f.txt")
    (root / "escape").symlink_to("/etc/passwd")
    c = ctx(root)
    [followed] = c.select("link")
    assert followed.path == "link" and followed.is_dir and rels(followed) == ["", "f.txt"]
    [d] = c.select("dir")
    kept = {e.rel: e for e in d.entries}["rel-link"]
    assert kept.kind == "symlink" and kept.link == "../real/f.txt"
    # /etc/passwd is looked up inside the context, where it does not exist.
    with pytest.raises(BuildError, match="not found"):
        c.select("escape")


def test_exclude_patterns_are_relative_to_the_copied_directory(tmp_path: Path) -> None:
    c = ctx(tree(tmp_path, {"app/main.py": "", "app/main.pyc": "", "app/cache/x": "", "t.md": ""}))
    [app] = c.select("app", excludes=["*.pyc", "cache"])
    assert rels(app) == ["", "main.py"]
    assert paths(c.select("*.md")) == ["t.md"]
    with pytest.raises(BuildError, match="no file"):
        c.select("t.md", excludes=["*.md"])


def test_load_reads_the_dockerfile_specific_ignore_file_first(tmp_path: Path) -> None:
    root = tree(
        tmp_path, {"a": "", "b": "", ".dockerignore": "a\n", "ci.Dockerfile.dockerignore": "b\n"}
    )
    assert not BuildContext.load(root).exists("a")
    special = BuildContext.load(root, root / "ci.Dockerfile")
    assert special.exists("a") and not special.exists("b")


# --- checksums -------------------------------------------------------------------------------


def sum_of(root: Path, pattern: str = ".", ignore: str = "") -> str:
    return checksum(ctx(root, ignore).select(pattern))


def test_checksum_follows_content_mode_type_and_link_target(tmp_path: Path) -> None:
    root = tree(tmp_path, {"f": "one", "d/g": "two"})
    (root / "l").symlink_to("f")
    first = sum_of(root)
    assert sum_of(root) == first
    (root / "f").write_text("ONE")
    changed_content = sum_of(root)
    assert changed_content != first
    (root / "d" / "g").chmod(0o755)
    changed_mode = sum_of(root)
    assert changed_mode != changed_content
    (root / "l").unlink()
    (root / "l").symlink_to("d/g")
    changed_link = sum_of(root)
    assert changed_link != changed_mode
    (root / "l").unlink()
    (root / "l").write_text("f")
    assert sum_of(root) != changed_link  # a file with the link's target as content


def test_checksum_ignores_mtimes_and_owners(tmp_path: Path) -> None:
    root = tree(tmp_path, {"f": "same", "d/g": "x"})
    first = sum_of(root)
    os.utime(root / "f", (1, 1))
    os.utime(root / "d", (2, 2))
    if os.geteuid() == 0:
        os.chown(root / "f", 1234, 5678)
    assert sum_of(root) == first


def test_checksum_follows_xattrs(tmp_path: Path) -> None:
    root = tree(tmp_path, {"f": "x"})
    first = sum_of(root)
    try:
        os.setxattr(root / "f", "user.note", b"hello")
    except OSError as e:
        pytest.skip(f"no user xattrs on {tmp_path}: {e}")
    assert sum_of(root) != first


def test_checksum_follows_names_but_not_ignored_files(tmp_path: Path) -> None:
    root = tree(tmp_path, {"a.txt": "x", "notes.log": "1"})
    first = sum_of(root, ignore="*.log")
    (root / "notes.log").write_text("2")
    assert sum_of(root, ignore="*.log") == first
    (root / "a.txt").rename(root / "b.txt")
    assert sum_of(root, ignore="*.log") != first


def test_file_digests_are_memoised_by_inode_state(tmp_path: Path) -> None:
    root = tree(tmp_path, {"f": "abc"})
    memo: dict[tuple[int, int, int, int, int], str] = {}
    [src] = BuildContext(root, memo=memo).select("f")
    assert list(memo.values()) == [src.entries[0].digest]
    # A stale memo entry for the same inode state is trusted: the memo is what avoids rereading.
    key = next(iter(memo))
    memo[key] = "f" * 64
    [again] = BuildContext(root, memo=memo).select("f")
    assert again.entries[0].digest == "f" * 64
    (root / "f").write_text("abd")  # any write changes mtime/ctime, so the memo misses
    [fresh] = BuildContext(root, memo=memo).select("f")
    assert fresh.entries[0].digest not in ("f" * 64, src.entries[0].digest)


def test_the_memo_survives_a_save_and_load_and_a_broken_one_is_empty(tmp_path: Path) -> None:
    memo = {(1, 2, 3, 4, 5): "a" * 64, (6, 7, 8, 9, 10): "b" * 64}
    path = tmp_path / "builder" / "checksums.json"
    save_memo(path, memo)
    assert load_memo(path) == memo
    assert [p.name for p in path.parent.iterdir()] == ["checksums.json"]
    path.write_text("{not json")
    assert load_memo(path) == {}
    path.write_text('{"v": 999, "entries": [[1, 2, 3, 4, 5, "x"]]}')
    assert load_memo(path) == {}
    assert load_memo(tmp_path / "missing.json") == {}


def test_big_files_are_hashed_on_other_threads_with_the_same_result(tmp_path: Path) -> None:
    big = os.urandom(_BigFiles.SIZE + 1)
    root = tree(tmp_path, {"d/a.txt": "a", "d/z.txt": "z"})
    (root / "d" / "m.bin").write_bytes(big)
    (root / "d" / "n.bin").write_bytes(big[::-1])
    memo: dict[tuple[int, int, int, int, int], str] = {}
    [src] = BuildContext(root, memo=memo).select("d")
    assert rels(src) == ["", "a.txt", "m.bin", "n.bin", "z.txt"]
    expected = [hashlib.sha256(b).hexdigest() for b in (b"a", big, big[::-1], b"z")]
    assert [e.digest for e in src.entries[1:]] == expected
    assert sorted(memo.values()) == sorted(expected)
    # Memoised now: the same selection is answered without threads, with the same checksum.
    assert checksum([src]) == checksum(BuildContext(root, memo=memo).select("d"))


def test_a_big_file_that_cannot_be_read_is_a_build_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree(tmp_path, {"d/a.txt": "a"})
    (root / "d" / "big.bin").write_bytes(b"\0" * _BigFiles.SIZE)

    real = context_module._file_digest

    def unreadable(path: str, st: os.stat_result, memo: DigestMemo | None) -> str:
        if path.endswith("big.bin"):  # root reads anything: fail the way a 0600 file would
            raise PermissionError(13, "Permission denied", path)
        return real(path, st, memo)

    monkeypatch.setattr(context_module, "_file_digest", unreadable)
    with pytest.raises(BuildError, match=r"cannot read .*big\.bin in the build context"):
        BuildContext(root).select("d")
