"""Resolution inside a root: the pure algorithm against a table of hostile symlinks, then the
same table on a real directory through both the path and the fd-based walk."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from runtime.image import safepath

# (id, symlinks as {path relative to the root: target}, path to resolve, expected or errno)
CASES: list[tuple[str, dict[str, str], str, str | int]] = [
    ("plain", {}, "a/b/c", "a/b/c"),
    ("absolute name", {}, "/etc/passwd", "etc/passwd"),
    ("dotdot above the root", {}, "../../etc/passwd", "etc/passwd"),
    ("dotdot in the middle", {}, "a/../../b", "b"),
    ("slashes and dots", {}, "//a/./b//c/", "a/b/c"),
    ("empty is the root", {}, "", ""),
    ("only dotdots", {}, "../..", ""),
    ("absolute symlink", {"evil": "/etc"}, "evil/passwd", "etc/passwd"),
    ("relative symlink climbing", {"d/evil": "../../../../etc"}, "d/evil/passwd", "etc/passwd"),
    ("symlink to the root", {"r": "/"}, "r/../x", "x"),
    ("chain of symlinks", {"a": "b", "b": "c/d", "c/d": "/etc"}, "a/shadow", "etc/shadow"),
    ("symlink inside a target", {"l1": "/x/l2/y", "x/l2": "../z"}, "l1/f", "z/y/f"),
    ("dotdot after a symlink is physical", {"l": "a/b"}, "l/..", "a"),
    ("last component followed", {"l": "/etc/passwd"}, "l", "etc/passwd"),
    ("symlink to dotdot", {"up": ".."}, "up/up/up/x", "x"),
    ("symlink with dotdot and slash", {"s": "../../..//etc/./"}, "s/x", "etc/x"),
    ("self loop", {"a": "a"}, "a", errno.ELOOP),
    ("two-link loop", {"a": "b", "b": "a"}, "a/x", errno.ELOOP),
    ("loop through itself", {"a": "a/b"}, "a", errno.ELOOP),
    ("40 links are fine", {f"l{i}": f"l{i + 1}" for i in range(40)}, "l0", "l40"),
    ("41 links are a loop", {f"l{i}": f"l{i + 1}" for i in range(41)}, "l0", errno.ELOOP),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("links", "path", "expected"), [c[1:] for c in CASES], ids=IDS)
def test_resolve_against_a_fake_filesystem(
    links: dict[str, str], path: str, expected: str | int
) -> None:
    if isinstance(expected, int):
        with pytest.raises(OSError) as info:
            safepath.resolve(path, links.get)
        assert info.value.errno == expected
        assert info.value.filename == path
    else:
        assert safepath.resolve(path, links.get) == expected


def _materialize(root: Path, links: dict[str, str]) -> None:
    root.mkdir()
    for rel, target in links.items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)


def _tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


@pytest.mark.parametrize(("links", "path", "expected"), [c[1:] for c in CASES], ids=IDS)
def test_secure_join_and_fd_walk_agree_on_a_real_tree(
    tmp_path: Path, links: dict[str, str], path: str, expected: str | int
) -> None:
    root = tmp_path / "root"
    _materialize(root, links)
    outside = tmp_path / "outside"
    outside.mkdir()
    root_fd = safepath.open_root(root)
    try:
        if isinstance(expected, int):
            with pytest.raises(OSError) as info:
                safepath.secure_join(root, path)
            assert info.value.errno == expected
            with pytest.raises(OSError) as info:
                safepath.resolve_parent(root_fd, path, mkdir_mode=0o755, follow_last=True)
            assert info.value.errno == expected
            return
        joined = safepath.secure_join(root, path)
        assert joined == (os.path.join(root, expected) if expected else str(root))
        # The fd walk creates what is missing on the way; the result must be the same place.
        with safepath.resolve_parent(root_fd, path, mkdir_mode=0o755, follow_last=True) as p:
            assert p.relpath == expected
            where = Path(os.readlink(f"/proc/self/fd/{p.fd}"))
            assert where == (root / expected).parent if p.name != "." else root / expected
    finally:
        os.close(root_fd)
    assert _tree(outside) == set()


def test_fd_walk_creates_inside_the_root_through_hostile_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    _materialize(root, {"abs": str(outside), "rel": "../outside", "up": "../../.."})
    root_fd = safepath.open_root(root)
    try:
        for name in ("abs/x", "rel/x", "up/outside/x", "/../outside/y"):
            with safepath.resolve_parent(root_fd, name, mkdir_mode=0o700) as p:
                os.close(os.open(p.name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=p.fd))
    finally:
        os.close(root_fd)
    assert _tree(outside) == set()
    inside = str(outside).lstrip("/")
    assert (root / inside / "x").is_file()
    assert (root / "outside" / "x").is_file() and (root / "outside" / "y").is_file()


def test_fd_walk_holds_the_directory_when_a_symlink_is_swapped_in(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    root_fd = safepath.open_root(root)
    try:
        with safepath.resolve_parent(root_fd, "d/x") as p:
            # An attacker moves the directory away and plants a symlink to outside.
            (root / "d").rename(root / "moved")
            (root / "d").symlink_to(outside)
            os.close(os.open(p.name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, dir_fd=p.fd))
    finally:
        os.close(root_fd)
    assert _tree(outside) == set()
    assert (root / "moved" / "x").is_file()


def test_fd_walk_reports_missing_and_non_directory_components(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_text("x")
    root_fd = safepath.open_root(root)
    try:
        with pytest.raises(FileNotFoundError) as missing:
            safepath.resolve_parent(root_fd, "no/such/x")
        assert missing.value.filename == "no"
        with pytest.raises(NotADirectoryError) as notdir:
            safepath.resolve_parent(root_fd, "file/x", mkdir_mode=0o755)
        assert notdir.value.filename == "file"
        # A missing last component is fine: the caller is about to create it.
        with safepath.resolve_parent(root_fd, "new") as p:
            assert (p.name, p.relpath) == ("new", "new")
        # The path string form does not look at types; its caller's open tells.
        assert safepath.secure_join(root, "file/x") == str(root / "file" / "x")
    finally:
        os.close(root_fd)


def test_open_in_root_follows_symlinks_inside_and_nofollow_refuses(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host")
    _materialize(root, {"etc/passwd": "/real", "esc": str(outside / "secret"), "d": "../../etc"})
    (root / "real").write_text("inside")
    root_fd = safepath.open_root(root)
    try:
        fd = safepath.open_in_root(root_fd, "etc/passwd", os.O_RDONLY)
        with open(fd, "rb") as f:
            assert f.read() == b"inside"
        with pytest.raises(OSError) as loop:
            safepath.open_in_root(root_fd, "etc/passwd", os.O_RDONLY, follow_last=False)
        assert loop.value.errno == errno.ELOOP
        # The symlink to the host's file is taken inside the root, where it does not exist.
        with pytest.raises(FileNotFoundError):
            safepath.open_in_root(root_fd, "esc", os.O_RDONLY)
        os.close(safepath.open_in_root(root_fd, "d/new", os.O_CREAT | os.O_WRONLY))
        fd = safepath.open_in_root(root_fd, "/..", os.O_RDONLY | os.O_DIRECTORY)
        assert os.path.samestat(os.fstat(fd), os.stat(root))
        os.close(fd)
    finally:
        os.close(root_fd)
    assert (outside / "secret").read_text() == "host"
    assert (root / "etc" / "new").is_file()


def test_no_descriptor_leaks_on_success_or_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _materialize(root, {"a": "b", "b": "a", "l": "/d"})
    (root / "d").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    root_fd = safepath.open_root(root)
    for _ in range(50):
        with safepath.resolve_parent(root_fd, "l/x/y", mkdir_mode=0o755):
            pass
        with pytest.raises(OSError):
            safepath.resolve_parent(root_fd, "a/x")
    os.close(root_fd)
    assert len(os.listdir("/proc/self/fd")) == before


def test_parent_closes_its_descriptor(tmp_path: Path) -> None:
    root_fd = safepath.open_root(tmp_path)
    try:
        p = safepath.resolve_parent(root_fd, "x")
        fd = p.fd
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        with p:
            pass
        assert p.fd == -1
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        os.close(root_fd)
