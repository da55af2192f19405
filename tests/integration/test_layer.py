"""Layer tars on a real filesystem: hostile tars, round trips, whiteouts under a real overlay.

Hostile tars are built here with ``tarfile``; after each one, nothing outside the destination
may have changed (a snapshot of the test's directory and the host's ``/etc/passwd``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import LayerError, UnsafePathError
from runtime.image import layer
from runtime.image.layer import EntryPlan, LayerStats, plan_entry

IS_ROOT = os.geteuid() == 0
T0 = 1_600_000_000
CAP_NET_BIND = bytes.fromhex("0100000200040000000000000000000000000000")
"""A v2 file capability: cap_net_bind_service=ep (what ``setcap`` would write)."""

Member = tuple[tarfile.TarInfo, bytes | None]


# --- building tars -------------------------------------------------------------------------------


def _info(name: str, kind: bytes, mode: int, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = kw.pop("mtime", T0)
    info.uid = kw.pop("uid", 0)
    info.gid = kw.pop("gid", 0)
    xattrs: dict[str, bytes] = kw.pop("xattrs", {})
    info.pax_headers = {
        "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
    }
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def reg(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Member:
    raw = data.encode() if isinstance(data, str) else data
    return _info(name, tarfile.REGTYPE, mode, size=len(raw), **kw), raw


def dir_(name: str, mode: int = 0o755, **kw: Any) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, **kw), None


def sym(name: str, target: str) -> Member:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=target), None


def hard(name: str, target: str) -> Member:
    return _info(name, tarfile.LNKTYPE, 0o644, linkname=target), None


def dev(name: str, major: int, minor: int) -> Member:
    return _info(name, tarfile.CHRTYPE, 0o666, devmajor=major, devminor=minor), None


def tar_bytes(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entries(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


# --- looking at trees ----------------------------------------------------------------------------


def xattrs_of(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def is_whiteout(path: Path, st: os.stat_result) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == 0
        and any(k.endswith(".overlay.whiteout") for k in xattrs_of(path))
    )


def describe(path: Path) -> str:
    """One word for what a path is: file:<content>, dir, link:<target>, whiteout, missing."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing"
    if is_whiteout(path, st):
        return "whiteout"
    if stat.S_ISREG(st.st_mode):
        return "file:" + path.read_bytes().decode(errors="backslashreplace")
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "link:" + os.readlink(path)
    return f"other:{stat.filemode(st.st_mode)}"


def snapshot(top: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything under ``top`` but ``skip``, plus the host's /etc/passwd: what must not change."""
    seen: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            p = here / name
            st = p.lstat()
            body = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            seen[str(p)] = (st.st_mode, st.st_nlink, st.st_mtime_ns, body, xattrs_of(p))
    st = os.stat("/etc/passwd")
    seen["/etc/passwd"] = (st.st_size, st.st_mtime_ns, st.st_nlink, st.st_ino)
    return seen


def tree_state(top: Path, *, rootless: bool) -> dict[str, tuple[object, ...]]:
    """What a layer directory means, entry by entry, whatever whiteout form it uses."""
    ours = "user.overlay." if rootless else "trusted.overlay."
    state: dict[str, tuple[object, ...]] = {}
    first_name: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(top).as_posix()
            st = p.lstat()
            xa = xattrs_of(p)
            plain = {k: v for k, v in xa.items() if ".overlay." not in k}
            if is_whiteout(p, st):
                state[rel] = ("whiteout",)
                continue
            group = first_name.setdefault(st.st_ino, rel) if not stat.S_ISDIR(st.st_mode) else rel
            common = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_uid, st.st_gid)
            mtime = st.st_mtime_ns
            if stat.S_ISDIR(st.st_mode):
                opaque = xa.get(ours + "opaque") == b"y"
                state[rel] = (*common, mtime, plain, opaque)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                state[rel] = (*common, mtime, plain, digest, group)
            elif stat.S_ISLNK(st.st_mode):
                state[rel] = (stat.S_IFLNK, os.readlink(p), st.st_uid, st.st_gid, mtime, group)
            else:
                state[rel] = (*common, mtime, plain, st.st_rdev, group)
    return state


def set_mtimes(top: Path) -> None:
    """Whole-second, distinct mtimes on everything, children before parents."""
    paths = [Path(d) / n for d, ds, fs in os.walk(top, topdown=False) for n in sorted(fs + ds)]
    for i, p in enumerate(paths):
        os.utime(p, ns=((T0 + i) * 10**9,) * 2, follow_symlinks=False)
    os.utime(top, ns=((T0 - 1) * 10**9,) * 2)


def chardev_whiteouts_allowed(where: Path) -> bool:
    probe = where / ".probe-whiteout"
    try:
        os.mknod(probe, stat.S_IFCHR, os.makedev(0, 0))
    except PermissionError:
        return False
    probe.unlink()
    return True


def pack(tree: Path, *, rootless: bool) -> tuple[str, int, bytes]:
    buf = io.BytesIO()
    diff_id, size = layer.pack_layer(tree, buf, rootless=rootless)
    return diff_id, size, buf.getvalue()


# --- pure: what an entry name means --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "plan"),
    [
        ("etc/passwd", EntryPlan("create", "etc/passwd")),
        ("/abs//./x/", EntryPlan("create", "abs/x")),
        ("a/b/../c", EntryPlan("create", "a/c")),
        ("./", EntryPlan("create", "")),
        ("d/.wh.x", EntryPlan("whiteout", "d/x")),
        (".wh.x", EntryPlan("whiteout", "x")),
        ("d/.wh..wh..opq", EntryPlan("opaque", "d")),
        (".wh..wh..opq", EntryPlan("opaque", "")),
        (".wh..wh.plnk", EntryPlan("skip", ".wh..wh.plnk")),
        (".wh..wh.plnk/123", EntryPlan("skip", ".wh..wh.plnk/123")),
        ("d/.wh.", None),
        ("d/.wh..", None),
        ("d/.wh...", None),
        ("../x", None),
        ("a/../../x", None),
        ("x/../../.wh.y", None),
    ],
)
def test_plan_entry(name: str, plan: EntryPlan | None) -> None:
    if plan is None:
        with pytest.raises(LayerError, match=repr(name).replace(".", r"\.")):
            plan_entry(name, oci_whiteouts=True)
    else:
        assert plan_entry(name, oci_whiteouts=True) == plan


def test_plan_entry_without_oci_whiteouts_keeps_wh_names() -> None:
    assert plan_entry("d/.wh.x", oci_whiteouts=False) == EntryPlan("create", "d/.wh.x")
    assert plan_entry(".wh..wh..opq", oci_whiteouts=False) == EntryPlan("create", ".wh..wh..opq")
    with pytest.raises(UnsafePathError):
        plan_entry("../x", oci_whiteouts=False)


def test_overlay_kind_and_tar_xattrs() -> None:
    chr_, reg_, dir_mode = stat.S_IFCHR, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755
    t = "trusted.overlay."
    assert layer.overlay_kind(chr_, 0, 0, {}, t, "x") == "whiteout"
    assert layer.overlay_kind(chr_, os.makedev(1, 3), 0, {}, t, "x") == "plain"
    assert layer.overlay_kind(reg_, 0, 0, {t + "whiteout": b"y"}, t, "x") == "whiteout"
    assert layer.overlay_kind(reg_, 0, 5, {t + "whiteout": b"y"}, t, "x") == "plain"
    # The other namespace's xattrs are ordinary data for this mount.
    assert layer.overlay_kind(reg_, 0, 0, {"user.overlay.whiteout": b""}, t, "x") == "plain"
    assert layer.overlay_kind(dir_mode, 0, 0, {t + "opaque": b"y"}, t, "x") == "opaque"
    assert layer.overlay_kind(dir_mode, 0, 0, {t + "opaque": b"x"}, t, "x") == "plain"
    with pytest.raises(LayerError, match=r"d/e: has trusted\.overlay\.redirect"):
        layer.overlay_kind(dir_mode, 0, 0, {t + "redirect": b"/a"}, t, "d/e")
    assert layer.tar_xattrs(
        {
            "user.b": b"2",
            "trusted.overlay.origin": b"..",
            "user.overlay.opaque": b"y",
            "security.selinux": b"label",
            "security.capability": CAP_NET_BIND,
            "user.a": b"\xff",
        }
    ) == {
        "SCHILY.xattr.security.capability": CAP_NET_BIND.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.a": "\udcff",
        "SCHILY.xattr.user.b": "2",
    }


# --- hostile tars --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    id: str
    members: Callable[[str], list[Member]]
    """Builds the tar's members from the absolute path of the ``outside`` directory."""
    expect: Callable[[str], dict[str, str]] = lambda o: {}
    """Paths under the destination (``describe`` words) after an unpack that succeeds."""
    error: type[LayerError] | None = None
    match: str = ""


def _in(o: str, *rest: str) -> str:
    """Where the absolute host path ``o`` lands inside the layer."""
    return "/".join([o.lstrip("/"), *rest])


HOSTILE = [
    Hostile("absolute name", lambda o: [reg("/abs/f", "1")], lambda o: {"abs/f": "file:1"}),
    Hostile(
        "absolute name of the outside dir",
        lambda o: [reg(o + "/x", "1")],
        lambda o: {_in(o, "x"): "file:1"},
    ),
    Hostile("dotdot", lambda o: [reg("../outside/x")], error=UnsafePathError, match="climbs"),
    Hostile(
        "nested dotdot",
        lambda o: [reg("a/../../outside/x")],
        error=UnsafePathError,
        match="climbs",
    ),
    Hostile("dotdot directory", lambda o: [dir_("..")], error=UnsafePathError, match="climbs"),
    Hostile(
        "absolute symlink then a file through it",
        lambda o: [sym("ln", o), reg("ln/x", "1")],
        lambda o: {"ln": "link:" + o, _in(o, "x"): "file:1"},
    ),
    Hostile(
        "relative symlink then a file through it",
        lambda o: [sym("ln", "../outside"), reg("ln/x", "1")],
        lambda o: {"outside/x": "file:1"},
    ),
    Hostile(
        "symlink to /etc then write passwd",
        lambda o: [sym("e", "/etc"), reg("e/passwd", "pwned")],
        lambda o: {"etc/passwd": "file:pwned"},
    ),
    Hostile(
        "etc as a symlink to /etc is a loop",
        lambda o: [sym("etc", "/etc"), reg("etc/passwd", "pwned")],
        error=LayerError,
        match="symlinks",
    ),
    Hostile(
        "chain of symlinks",
        lambda o: [sym("a", "b"), sym("b", o), reg("a/x", "1")],
        lambda o: {_in(o, "x"): "file:1"},
    ),
    Hostile(
        "symlink to dotdot",
        lambda o: [sym("up", ".."), reg("up/up/up/x", "1")],
        lambda o: {"x": "file:1"},
    ),
    Hostile(
        "symlink loop",
        lambda o: [sym("a", "b"), sym("b", "a"), reg("a/x", "1")],
        error=LayerError,
        match="symlinks",
    ),
    Hostile(
        "directory replaces a planted symlink",
        lambda o: [sym("d", o), dir_("d"), reg("d/x", "1")],
        lambda o: {"d": "dir", "d/x": "file:1"},
    ),
    Hostile(
        "file replaces a symlink to a host file",
        lambda o: [sym("f", o + "/secret"), reg("f", "pwned")],
        lambda o: {"f": "file:pwned"},
    ),
    Hostile(
        "hard link to /etc/passwd",
        lambda o: [hard("x", "/etc/passwd")],
        error=LayerError,
        match="'/etc/passwd' is not in the layer",
    ),
    Hostile(
        "hard link with dotdot",
        lambda o: [hard("x", "../outside/secret")],
        error=UnsafePathError,
        match="hard link 'x'",
    ),
    Hostile(
        "hard link through a planted symlink",
        lambda o: [sym("e", o), hard("x", "e/secret")],
        error=LayerError,
        match="is not in the layer",
    ),
    Hostile(
        "hard link to a symlink, then a write to it",
        lambda o: [sym("s", o + "/secret"), hard("h", "s"), reg("h", "pwned")],
        lambda o: {"s": "link:" + o + "/secret", "h": "file:pwned"},
    ),
    Hostile(
        "hard link to a directory",
        lambda o: [dir_("d"), hard("h", "d")],
        error=LayerError,
        match="is a directory",
    ),
    Hostile(
        "whiteout outside", lambda o: [reg("../.wh.secret")], error=UnsafePathError, match="climbs"
    ),
    Hostile(
        "whiteout through a planted symlink",
        lambda o: [sym("e", o), reg("e/.wh.secret")],
        lambda o: {_in(o, "secret"): "whiteout"},
    ),
    Hostile(
        "whiteout for dotdot",
        lambda o: [dir_("a"), reg("a/.wh...")],
        error=UnsafePathError,
        match="whiteout for '..'",
    ),
    Hostile("whiteout with no name", lambda o: [reg("a/.wh.")], error=LayerError, match="no name"),
    Hostile(
        "opaque marker through a planted symlink",
        lambda o: [sym("e", o), reg("e/.wh..wh..opq")],
        lambda o: {_in(o): "dir"},
    ),
    Hostile(
        "long names",
        lambda o: [reg("/".join(["d" * 200] * 5) + "/" + "f" * 255, "1")],
        lambda o: {"/".join(["d" * 200] * 5) + "/" + "f" * 255: "file:1"},
    ),
    Hostile("name too long", lambda o: [reg("x" * 300)], error=LayerError, match="too long"),
    Hostile(
        "file used as a directory",
        lambda o: [reg("f"), reg("f/x")],
        error=LayerError,
        match="Not a directory",
    ),
    Hostile("file replaces the root", lambda o: [reg(".")], error=LayerError, match="the root"),
    Hostile(
        "AUFS bookkeeping is skipped",
        lambda o: [dir_(".wh..wh.plnk"), reg(".wh..wh.plnk/1.2", "x")],
        lambda o: {".wh..wh.plnk": "missing"},
    ),
]

MODES = [pytest.param(False, marks=pytest.mark.needs_root, id="root"), pytest.param(True, id="rl")]


@pytest.mark.rootless
@pytest.mark.parametrize("rootless", MODES)
@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_tar_never_writes_outside(tmp_path: Path, case: Hostile, rootless: bool) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    dest = tmp_path / "layer"
    data = tar_bytes(*case.members(str(outside)))
    before = snapshot(tmp_path, dest)
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            layer.unpack_layer(io.BytesIO(data), dest, rootless=rootless)
    else:
        layer.unpack_layer(io.BytesIO(data), dest, rootless=rootless)
        for rel, what in case.expect(str(outside)).items():
            assert describe(dest / rel) == what, rel
    assert snapshot(tmp_path, dest) == before


@pytest.mark.rootless
def test_a_whiteout_never_hides_an_entry_of_the_same_layer(tmp_path: Path) -> None:
    data = tar_bytes(reg("a", "1"), reg(".wh.a"), reg(".wh.b"), reg("b", "2"), reg("d/.wh.c"))
    stats = layer.unpack_layer(io.BytesIO(data), tmp_path / "l", rootless=True)
    assert describe(tmp_path / "l" / "a") == "file:1"
    assert describe(tmp_path / "l" / "b") == "file:2"
    assert describe(tmp_path / "l" / "d" / "c") == "whiteout"
    assert stats.whiteouts == 2 and stats.whiteout_form in ("chardev", "xattr")


@pytest.mark.rootless
def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    data = tar_bytes(
        dir_("d"),
        reg("d/old", "1"),
        reg("d", "now a file"),
        reg("f", "1"),
        dir_("f"),
        reg("f/inner", "2"),
        dir_("keep", mode=0o700),
        reg("keep/a", "a"),
        dir_("keep", mode=0o750),
    )
    dest = tmp_path / "l"
    layer.unpack_layer(io.BytesIO(data), dest, rootless=True)
    assert describe(dest / "d") == "file:now a file"
    assert describe(dest / "f/inner") == "file:2"
    assert describe(dest / "keep/a") == "file:a"
    assert stat.S_IMODE((dest / "keep").stat().st_mode) == 0o750


@pytest.mark.rootless
def test_hard_link_to_a_symlink_is_the_symlink_itself(tmp_path: Path) -> None:
    dest = tmp_path / "l"
    stats = layer.unpack_layer(
        io.BytesIO(tar_bytes(sym("s", "/etc/passwd"), hard("h", "s"))), dest, rootless=True
    )
    s, h = (dest / "s").lstat(), (dest / "h").lstat()
    assert stat.S_ISLNK(h.st_mode) and (s.st_ino, s.st_nlink) == (h.st_ino, 2)
    assert stats.hardlinks == 1 and stats.symlinks == 1


# --- round trips ---------------------------------------------------------------------------------


def build_root_tree(src: Path) -> None:
    """Everything a layer can hold, as root: owners, devices, caps, trusted xattrs, whiteouts."""
    (src / "bin").mkdir(parents=True)
    tool = src / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    os.chown(tool, 0, 0)
    os.chmod(tool, 0o4755)
    os.setxattr(tool, "security.capability", CAP_NET_BIND)
    os.link(tool, src / "bin" / "alias")
    (src / "etc").mkdir()
    conf = src / "etc" / "conf"
    conf.write_text("k=v\n")
    os.chown(conf, 1234, 5678)
    os.chmod(conf, 0o2640)
    os.setxattr(conf, "user.note", b"\x00\xffbinary")
    os.setxattr(conf, "trusted.t", b"t")
    (src / "etc" / "link").symlink_to("conf")
    (src / "etc" / "dangling").symlink_to("/nope/nothing")
    os.lchown(src / "etc" / "link", 1234, 5678)
    (src / "empty").mkdir(mode=0o755)
    os.chmod(src / "empty", 0o1777)
    (src / "ro").mkdir()
    (src / "ro" / "locked").write_text("secret")
    os.chmod(src / "ro" / "locked", 0o000)
    os.chmod(src / "ro", 0o555)
    (src / "dev").mkdir()
    os.mknod(src / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "dev" / "loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mkfifo(src / "fifo", 0o600)
    os.mknod(src / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (src / "opq").mkdir()
    (src / "opq" / "new").write_text("new")
    os.setxattr(src / "opq", "trusted.overlay.opaque", b"y")
    (src / "xdir").mkdir()
    (src / "xdir" / "xw").touch()
    os.setxattr(src / "xdir" / "xw", "trusted.overlay.whiteout", b"y")
    os.setxattr(src / "xdir", "trusted.overlay.opaque", b"x")
    (src / "名前").mkdir()
    (src / "名前" / "ü").write_text("unicode")
    deep = src / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / "file").write_text("deep")
    set_mtimes(src)


def build_rootless_tree(src: Path) -> None:
    """What an unprivileged user can make: no foreign owners, devices, caps or trusted xattrs."""
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(bytes(range(256)) * 10)
    os.chmod(src / "bin" / "tool", 0o4755)
    os.link(src / "bin" / "tool", src / "bin" / "alias")
    (src / "etc").mkdir()
    (src / "etc" / "conf").write_text("k=v\n")
    os.setxattr(src / "etc" / "conf", "user.note", b"\x00\xffbinary")
    (src / "etc" / "link").symlink_to("conf")
    (src / "empty").mkdir()
    (src / "ro").mkdir()
    (src / "ro" / "readonly").write_text("r")
    os.chmod(src / "ro" / "readonly", 0o400)
    os.chmod(src / "ro", 0o555)
    os.mkfifo(src / "fifo", 0o640)
    (src / os.fsdecode(b"not-utf8-\xff")).write_text("raw bytes in the name")
    if chardev_whiteouts_allowed(src):
        os.mknod(src / "gone", stat.S_IFCHR, os.makedev(0, 0))
    else:
        (src / "gone").touch()
        os.setxattr(src / "gone", "user.overlay.whiteout", b"y")
        os.setxattr(src, "user.overlay.opaque", b"x")
    (src / "opq").mkdir()
    (src / "opq" / "new").write_text("new")
    os.setxattr(src / "opq", "user.overlay.opaque", b"y")
    set_mtimes(src)


@pytest.mark.needs_root
def test_round_trip_as_root_gives_the_same_tree_and_diff_id(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_root_tree(src)
    diff_id, size, data = pack(src, rootless=False)
    assert size == len(data) and diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    stats = layer.unpack_layer(io.BytesIO(data), dst, rootless=False)
    assert (stats.diff_id, stats.size) == (diff_id, size)
    assert stats.whiteouts == 2 and stats.opaque_dirs == 1 and stats.whiteout_form == "chardev"
    assert (stats.devices, stats.fifos, stats.hardlinks) == (2, 1, 1)
    assert (stats.devices_skipped, stats.ownership_dropped, stats.xattrs_skipped) == (0, 0, 0)
    assert tree_state(dst, rootless=False) == tree_state(src, rootless=False)
    assert os.getxattr(dst / "bin" / "tool", "security.capability") == CAP_NET_BIND
    assert stat.S_IMODE((dst / "bin" / "tool").stat().st_mode) == 0o4755
    assert pack(dst, rootless=False) == (diff_id, size, data)


@pytest.mark.rootless
def test_round_trip_rootless_gives_the_same_tree_and_diff_id(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_rootless_tree(src)
    diff_id, size, data = pack(src, rootless=True)
    stats = layer.unpack_layer(io.BytesIO(data), dst, rootless=True)
    assert stats.diff_id == diff_id
    assert stats.whiteouts == 1 and stats.opaque_dirs == 1
    assert os.getxattr(dst / "opq", "user.overlay.opaque") == b"y"
    assert tree_state(dst, rootless=True) == tree_state(src, rootless=True)
    assert pack(dst, rootless=True) == (diff_id, size, data)


@pytest.mark.rootless
@pytest.mark.parametrize("form", ["chardev", "xattr"])
def test_both_whiteout_forms_pack_to_the_same_layer(tmp_path: Path, form: str) -> None:
    if form == "chardev" and not chardev_whiteouts_allowed(tmp_path):
        pytest.skip("mknod of a 0/0 char device is refused here")
    data = tar_bytes(dir_("d"), reg("d/.wh.gone"), reg(".wh.top"), dir_("o"), reg("o/.wh..wh..opq"))
    dest = tmp_path / "l"
    stats = layer.unpack_layer(io.BytesIO(data), dest, rootless=True, whiteout_form=form)  # type: ignore[arg-type]
    assert stats.whiteout_form == form
    assert describe(dest / "d" / "gone") == describe(dest / "top") == "whiteout"
    if form == "xattr":
        assert os.getxattr(dest / "d" / "gone", "user.overlay.whiteout") == b"y"
        assert os.getxattr(dest / "d", "user.overlay.opaque") == b"x"
    assert os.getxattr(dest / "o", "user.overlay.opaque") == b"y"
    names = [m.name for m in entries(pack(dest, rootless=True)[2])]
    assert names == ["d", "d/.wh.gone", "o", "o/.wh..wh..opq", ".wh.top"]


@pytest.mark.rootless
def test_packing_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_rootless_tree(src)
    first = pack(src, rootless=True)
    conf = src / "etc" / "conf"
    os.utime(conf, ns=(12345, conf.stat().st_mtime_ns))  # atime is not content
    assert pack(src, rootless=True) == first
    os.chmod(conf, 0o600)
    assert pack(src, rootless=True)[0] != first[0]
    os.chmod(conf, 0o644)
    assert pack(src, rootless=True)[0] == first[0]
    clamped = io.BytesIO()
    layer.pack_layer(src, clamped, rootless=True, mtime_clamp=T0 + 3)
    assert max(m.mtime for m in entries(clamped.getvalue())) == T0 + 3


@pytest.mark.needs_root
def test_packed_headers_are_plain_and_canonical(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_root_tree(src)
    data = pack(src, rootless=False)[2]
    members = {m.name: m for m in entries(data)}
    names = list(members)
    assert names.index("opq/.wh..wh..opq") == names.index("opq") + 1
    assert "xdir/xw" not in members and "gone" not in members
    for name in (".wh.gone", "xdir/.wh.xw", "opq/.wh..wh..opq"):
        m = members[name]
        assert (m.type, m.size, m.mode, m.uid, m.mtime) == (tarfile.REGTYPE, 0, 0o600, 0, 0)
    # The first name in sorted order carries the data; later names link to it.
    alias, tool = members["bin/alias"], members["bin/tool"]
    assert (tool.type, tool.linkname, tool.size) == (tarfile.LNKTYPE, "bin/alias", 0)
    assert (
        alias.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
        == CAP_NET_BIND
    )
    assert members["etc/conf"].pax_headers["SCHILY.xattr.trusted.t"] == "t"
    assert not any("overlay" in k for m in members.values() for k in m.pax_headers)
    assert (members["dev/null"].devmajor, members["dev/null"].devminor) == (1, 3)
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    # Raw ustar headers: the device fields are empty except for devices.
    offset = 0
    while offset < len(data) and data[offset : offset + 512] != bytes(512):
        header = tarfile.TarInfo.frombuf(data[offset : offset + 512], "utf-8", "surrogateescape")
        devfields = data[offset + 329 : offset + 345]
        if header.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            assert devfields != bytes(16)
        else:
            assert devfields == bytes(16), header.name
        offset += 512 + (header.size + 511) // 512 * 512
    assert len(data) % 10240 == 0


@pytest.mark.rootless
def test_redirect_and_metacopy_cannot_be_packed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "moved").mkdir(parents=True)
    os.setxattr(src / "moved", "user.overlay.redirect", b"/orig")
    with pytest.raises(LayerError, match=r"moved: has user\.overlay\.redirect"):
        layer.pack_layer(src, io.BytesIO(), rootless=True)


@pytest.mark.rootless
def test_sockets_are_left_out_of_a_layer(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        assert [m.name for m in entries(pack(src, rootless=True)[2])] == ["f"]


@pytest.mark.rootless
def test_unprivileged_root_mode_unpack_says_what_to_do(tmp_path: Path) -> None:
    if IS_ROOT:
        pytest.skip("shows the message an unprivileged user gets")
    with pytest.raises(LayerError, match=r"'f': cannot set owner 0:0.*rootless=True"):
        layer.unpack_layer(io.BytesIO(tar_bytes(reg("f"))), tmp_path / "l", rootless=False)


# --- rootless: what is kept, what is dropped ------------------------------------------------------


def _run_as_nobody(fn: Callable[[], LayerStats]) -> LayerStats:
    """Run ``fn`` in a child that dropped to uid/gid 65534, and return its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            result: object = fn()
        except BaseException as e:
            result, code = e, 1
        with os.fdopen(w, "wb") as f:
            pickle.dump(result, f)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = pickle.load(f)
    os.waitpid(pid, 0)
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, LayerStats)
    return result


@pytest.mark.rootless
def test_rootless_unpack_keeps_what_it_can_and_counts_the_rest(tmp_path: Path) -> None:
    data = tar_bytes(
        dir_("bin"),
        reg("bin/su", "x", mode=0o4755, uid=0, gid=0, xattrs={"security.capability": CAP_NET_BIND}),
        reg("etc/conf", "c", uid=1234, gid=5678, xattrs={"user.k": b"v", "trusted.t": b"t"}),
        dev("dev/null", 1, 3),
        hard("dev/again", "dev/null"),
        reg(".wh.gone"),
        reg("x", xattrs={"trusted.overlay.redirect": b"/etc", "user.overlay.metacopy": b""}),
    )
    with contextlib.ExitStack() as cleanup:
        if IS_ROOT:
            # pytest's own tmp directories are 0700: nobody needs one it can reach.
            top = Path(tempfile.mkdtemp(prefix="layer-nobody-"))
            cleanup.callback(shutil.rmtree, top)
            top.chmod(0o755)
            dest = top / "l"
            dest.mkdir()
            os.chown(dest, 65534, 65534)
            stats = _run_as_nobody(
                lambda: layer.unpack_layer(io.BytesIO(data), dest, rootless=True)
            )
        else:
            dest = tmp_path / "l"
            stats = layer.unpack_layer(io.BytesIO(data), dest, rootless=True)
        _check_rootless_unpack(dest, stats)


def _check_rootless_unpack(dest: Path, stats: LayerStats) -> None:
    assert (stats.devices, stats.devices_skipped) == (0, 2)
    assert not (dest / "dev" / "null").exists() and not (dest / "dev" / "again").exists()
    assert stats.ownership_dropped >= 4  # bin, bin/su, etc/conf, x: none owned by us
    assert stat.S_IMODE((dest / "bin" / "su").stat().st_mode) == 0o4755
    assert (dest / "etc" / "conf").stat().st_uid == (65534 if IS_ROOT else os.getuid())
    assert os.getxattr(dest / "etc" / "conf", "user.k") == b"v"
    # Overlay xattrs from the tar are always dropped; trusted.* and caps need privileges.
    assert xattrs_of(dest / "x") == {}
    assert stats.xattrs_skipped == 4
    assert "security.capability" not in xattrs_of(dest / "bin" / "su")
    assert describe(dest / "gone") == "whiteout"
    assert any("dev/null" in n for n in stats.notes)


# --- compression, streams, corrupt input ----------------------------------------------------------


@pytest.mark.rootless
def test_gzip_layer_and_the_diff_id_of_its_uncompressed_tar(tmp_path: Path) -> None:
    data = tar_bytes(dir_("d"), reg("d/f", "hello" * 1000))
    stats = layer.unpack_layer(io.BytesIO(gzip.compress(data)), tmp_path / "l", rootless=True)
    assert stats.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert stats.size == len(data)
    assert (tmp_path / "l" / "d" / "f").read_text() == "hello" * 1000


@pytest.mark.rootless
def test_zstd_layer(tmp_path: Path) -> None:
    data = tar_bytes(reg("f", "z"))
    if importlib.util.find_spec("zstandard") is None:
        fake = b"\x28\xb5\x2f\xfd" + bytes(64)
        with pytest.raises(LayerError, match="zstandard"):
            layer.unpack_layer(io.BytesIO(fake), tmp_path / "l", rootless=True)
        return
    import zstandard  # type: ignore[import-not-found]

    compressed = zstandard.ZstdCompressor().compress(data)
    stats = layer.unpack_layer(io.BytesIO(compressed), tmp_path / "l", rootless=True)
    assert stats.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.rootless
def test_other_compressions_and_corrupt_tars_are_clear_errors(tmp_path: Path) -> None:
    import bz2

    data = tar_bytes(reg("a", "1"), reg("big", "x" * 5000), reg("c", "3"))
    with pytest.raises(LayerError, match="bzip2"):
        layer.unpack_layer(io.BytesIO(bz2.compress(data)), tmp_path / "l1", rootless=True)
    with pytest.raises(LayerError, match="'big'"):
        layer.unpack_layer(io.BytesIO(data[:3000]), tmp_path / "l2", rootless=True)
    with pytest.raises(LayerError, match="unreadable"):
        layer.unpack_layer(io.BytesIO(b"not a tar at all" * 64), tmp_path / "l3", rootless=True)
    with pytest.raises(LayerError, match="no-such-file"):
        layer.unpack_layer(tmp_path / "no-such-file", tmp_path / "l4", rootless=True)
    compressed = gzip.compress(data)
    broken = bytearray(compressed)
    broken[-8] ^= 0xFF  # the CRC
    with pytest.raises(LayerError, match="CRC"):
        layer.unpack_layer(io.BytesIO(bytes(broken)), tmp_path / "l5", rootless=True)
    with pytest.raises(LayerError, match="end-of-stream"):
        layer.unpack_layer(io.BytesIO(compressed[:-20]), tmp_path / "l6", rootless=True)
    broken = bytearray(compressed)
    broken[40:60] = bytes(20)
    with pytest.raises(LayerError):
        layer.unpack_layer(io.BytesIO(bytes(broken)), tmp_path / "l7", rootless=True)


@contextlib.contextmanager
def _pipe_writer(produce: Callable[[io.BufferedWriter], Any]) -> Iterator[io.BufferedReader]:
    """A pipe fed by ``produce`` in a thread; yields the read end, re-raises the producer's error."""
    r, w = os.pipe()
    errors: list[BaseException] = []
    results: list[Any] = []

    def run() -> None:
        try:
            with os.fdopen(w, "wb") as out:
                results.append(produce(out))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        with os.fdopen(r, "rb") as reader:
            yield reader
    finally:
        thread.join()
    if errors:
        raise errors[0]


@pytest.mark.rootless
def test_pack_and_unpack_through_a_pipe(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_rootless_tree(src)
    expected = pack(src, rootless=True)[0]
    with _pipe_writer(lambda out: layer.pack_layer(src, out, rootless=True)) as reader:
        stats = layer.unpack_layer(reader, tmp_path / "dst", rootless=True)
    assert stats.diff_id == expected
    assert tree_state(tmp_path / "dst", rootless=True) == tree_state(src, rootless=True)


# --- pack_tree / unpack_tree: copying into and out of a container ---------------------------------


@pytest.mark.rootless
def test_copy_a_directory_into_a_container_root(tmp_path: Path) -> None:
    src, root, outside = tmp_path / "ctx" / "app", tmp_path / "root", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("f")
    (src / ".wh.x").write_text("an ordinary file")
    (src / "ln").symlink_to("/etc/passwd")
    (root / "srv").mkdir(parents=True)
    (root / "opt").symlink_to("/srv")  # resolved inside the container's root
    outside.mkdir()
    (root / "esc").symlink_to(outside)
    before = snapshot(tmp_path, root)

    with _pipe_writer(lambda out: layer.pack_tree(src.parent, out, path="app")) as reader:
        stats = layer.unpack_tree(reader, root, into="/opt", rootless=True)
    assert describe(root / "srv" / "app" / "sub" / "f") == "file:f"
    assert describe(root / "srv" / "app" / ".wh.x") == "file:an ordinary file"
    assert describe(root / "srv" / "app" / "ln") == "link:/etc/passwd"
    assert stats.whiteouts == 0 and stats.files == 2

    single = io.BytesIO()
    layer.pack_tree(src, single, path="sub/f", arcname="renamed")
    assert [m.name for m in entries(single.getvalue())] == ["renamed"]
    single.seek(0)
    layer.unpack_tree(single, root, into="srv", rootless=True)
    assert describe(root / "srv" / "renamed") == "file:f"

    with pytest.raises(LayerError, match="cannot unpack into '/esc'"):
        layer.unpack_tree(io.BytesIO(single.getvalue()), root, into="/esc", rootless=True)
    with pytest.raises(LayerError, match="cannot pack '/esc/x'"):
        layer.pack_tree(root, io.BytesIO(), path="/esc/x")
    assert snapshot(tmp_path, root) == before


@pytest.mark.rootless
def test_copy_out_of_a_container_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("box")
    (root / "link").symlink_to("/etc")
    whole = io.BytesIO()
    layer.pack_tree(root, whole)
    assert [m.name for m in entries(whole.getvalue())] == [".", "./etc", "./etc/hostname", "./link"]
    # A path through a symlink is resolved inside the root; the last component is not followed.
    via = io.BytesIO()
    layer.pack_tree(root, via, path="/link/hostname")
    assert [(m.name, m.size) for m in entries(via.getvalue())] == [("hostname", 3)]
    link_itself = io.BytesIO()
    layer.pack_tree(root, link_itself, path="link")
    assert [(m.name, m.linkname) for m in entries(link_itself.getvalue())] == [("link", "/etc")]
    dest = tmp_path / "host"
    dest.mkdir()
    via.seek(0)
    layer.unpack_tree(via, dest, rootless=True)
    assert (dest / "hostname").read_text() == "box"


# --- a real overlay -------------------------------------------------------------------------------


def _mount_overlay(mnt: Path, options: str) -> None:
    done = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(mnt)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"mount -o {options}: {done.stderr}"


@contextlib.contextmanager
def overlay(mnt: Path, options: str) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    _mount_overlay(mnt, options)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _base_layer(lower: Path) -> None:
    (lower / "od").mkdir(parents=True)
    (lower / "od" / "old").write_text("old")
    (lower / "sub").mkdir()
    (lower / "sub" / "x").write_text("x")
    (lower / "sub" / "y").write_text("y")
    (lower / "keep").write_text("keep")
    (lower / "gone").write_text("gone")


HIDING_LAYER = [
    reg(".wh.gone"),
    dir_("od"),
    reg("od/.wh..wh..opq"),
    reg("od/new", "new"),
    dir_("sub"),
    reg("sub/.wh.x"),
]


def _listing(top: Path) -> dict[str, str]:
    return {
        p.relative_to(top).as_posix(): describe(p)
        for p in sorted(top.rglob("*"))
        if not p.name.startswith(".probe")
    }


MERGED = {
    "keep": "file:keep",
    "od": "dir",
    "od/new": "file:new",
    "sub": "dir",
    "sub/y": "file:y",
}


@pytest.mark.needs_root
@pytest.mark.needs_overlay
@pytest.mark.parametrize("form", ["chardev", "xattr"])
def test_overlay_hides_whited_out_and_opaque_lower_entries(tmp_path: Path, form: str) -> None:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    _base_layer(l1)
    stats = layer.unpack_layer(
        io.BytesIO(tar_bytes(*HIDING_LAYER)),
        l2,
        rootless=False,
        whiteout_form=form,  # type: ignore[arg-type]
    )
    assert stats.whiteout_form == form
    with overlay(tmp_path / "m", f"lowerdir={l2}:{l1}") as merged:
        assert _listing(merged) == MERGED


@pytest.mark.rootless
@pytest.mark.needs_userns
@pytest.mark.needs_overlay
@pytest.mark.parametrize("form", ["auto", "xattr"])
def test_rootless_forms_work_under_a_userxattr_overlay_in_a_user_namespace(
    tmp_path: Path, form: str
) -> None:
    l1, l2, mnt = tmp_path / "l1", tmp_path / "l2", tmp_path / "m"
    _base_layer(l1)
    mnt.mkdir()
    layer.unpack_layer(io.BytesIO(tar_bytes(*HIDING_LAYER)), l2, rootless=True, whiteout_form=form)  # type: ignore[arg-type]
    script = (
        f"mount -t overlay overlay -o userxattr,lowerdir={l2}:{l1} {mnt} && cd {mnt} && "
        "find . -mindepth 1 | sort"
    )
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["./" + k for k in sorted(MERGED)]


@pytest.mark.needs_root
@pytest.mark.needs_overlay
def test_a_real_upper_dir_packs_to_a_layer_that_reproduces_the_merged_view(
    tmp_path: Path,
) -> None:
    """The builder's path: changes made through an overlay, packed from its upper, replayed."""
    l1, upper, work = tmp_path / "l1", tmp_path / "upper", tmp_path / "work"
    _base_layer(l1)
    upper.mkdir()
    work.mkdir()
    options = f"lowerdir={l1},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off"
    with overlay(tmp_path / "m", options) as merged:
        (merged / "gone").unlink()
        (merged / "sub" / "x").unlink()
        for p in (merged / "od").iterdir():
            p.unlink()
        (merged / "od").rmdir()
        (merged / "od").mkdir()
        (merged / "od" / "new").write_text("new")
        (merged / "sub" / "y").write_text("y2")
        os.setxattr(merged / "keep", "user.tag", b"1")
        (merged / "added").write_text("added")
        os.link(merged / "added", merged / "added-link")
        expected = _listing(merged)
        expected_state = tree_state(merged, rootless=False)

    diff_id, _, data = pack(upper, rootless=False)
    names = [m.name for m in entries(data)]
    assert ".wh.gone" in names and "sub/.wh.x" in names and "od/.wh..wh..opq" in names
    l2 = tmp_path / "l2"
    stats = layer.unpack_layer(io.BytesIO(data), l2, rootless=False)
    assert stats.diff_id == diff_id
    with overlay(tmp_path / "m2", f"lowerdir={l2}:{l1}") as merged:
        assert _listing(merged) == expected
        got = tree_state(merged, rootless=False)
    # Directory mtimes in the merged view come from whichever layer is on top: compare the rest.
    strip = lambda s: {k: v[:4] + v[5:] for k, v in s.items()}  # noqa: E731
    assert strip(got) == strip(expected_state)


# --- size -----------------------------------------------------------------------------------------


@pytest.mark.rootless
def test_unpack_and_pack_of_many_small_files_and_one_large_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        (src / f"f{i:03}").write_bytes(os.urandom(512))
    (src / "big").write_bytes(os.urandom(20 << 20))
    diff_id, _, data = pack(src, rootless=True)
    stats = layer.unpack_layer(io.BytesIO(data), tmp_path / "dst", rootless=True)
    assert stats.files == 201 and stats.diff_id == diff_id
    assert (tmp_path / "dst" / "big").stat().st_size == 20 << 20


def test_layer_digest_hashes_on_another_thread_to_the_same_digest_and_stops_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "big").write_bytes(os.urandom(3 * layer.CHUNK + 5))
    (tmp_path / "dir" / "small").write_bytes(b"x")
    out = io.BytesIO()
    written = layer.pack_layer(tmp_path, out, rootless=not IS_ROOT, owner=(0, 0))
    # The digest of the tar pack_layer writes, hashed in the caller's thread.
    assert written[0] == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    assert layer.layer_digest(tmp_path, rootless=not IS_ROOT) == written
    with pytest.raises(LayerError):
        layer.layer_digest(tmp_path / "missing", rootless=not IS_ROOT)
    assert not [t for t in threading.enumerate() if t.name == "layer-sha256"]


def test_through_pipe_returns_the_read_and_raises_the_writers_error_first() -> None:
    def write(out: Any) -> None:
        out.write(b"x" * 100_000)

    assert layer.through_pipe(write, lambda r: len(r.read()), "t") == 100_000

    def broken_writer(out: Any) -> None:
        out.write(b"partial")
        raise ValueError("the packer failed")

    def strict_reader(r: Any) -> int:
        data = r.read()
        raise LayerError(f"truncated after {len(data)} bytes")

    # The reader fails because the writer stopped: the writer's error says why.
    with pytest.raises(ValueError, match="the packer failed"):
        layer.through_pipe(broken_writer, strict_reader, "t")
    with pytest.raises(LayerError, match="truncated after 100000"):
        layer.through_pipe(write, strict_reader, "t")
    assert not [t for t in threading.enumerate() if t.name == "t"]
