"""The container's root filesystem: a pure plan of mounts, and a short loop that applies it.

The plan is a list of :data:`Op` values computed from the spec, the container's state paths and
the host's mount table. :func:`apply` runs them through a :class:`~runtime._sys.Syscalls`, so unit
tests can check the exact order and arguments with a recording fake.

The host image ("host") is the host's ``/`` as the read-only lower layer. As root one overlay with
``lowerdir=/`` does it (plus one per data filesystem mounted below ``/``). Inside a user namespace
the kernel refuses to use a directory with locked submounts as a lower layer ("failed to clone
lowerpath"), so the root is *split*: a small skeleton of the top-level entries is the root layer,
and each top-level directory gets its own overlay.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from runtime import _sys
from runtime._sys import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)
from runtime.spec import BindMount, ContainerSpec, TmpfsMount

PSEUDO_FS = frozenset(
    [
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "tmpfs",
        "cgroup",
        "cgroup2",
        "mqueue",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
        "efivarfs",
        "nsfs",
        "rpc_pipefs",
        "ramfs",
        "selinuxfs",
        "fuse.gvfsd-fuse",
        "fuse.portal",
    ]
)
"""Filesystem types that are not data: a container gets its own instance or nothing."""

PROVIDED = ("/proc", "/sys", "/dev")
"""Host paths a container never sees: it gets fresh instances."""

FRESH_TMPFS_ON_HOST_IMAGE = ("/run",)
"""On the host image these are fresh and empty, as on a new machine.

``/tmp`` is not among them: a project (or a pytester run) may live there, and the host image
promises the host's paths; it is copy-on-write like everything else.
"""

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SYMLINKS = (
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
    ("/proc/kcore", "core"),
)
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class HostMount:
    """One line of ``/proc/self/mountinfo`` that matters here."""

    target: str
    fstype: str


@dataclass(frozen=True)
class Overlay:
    """One overlayfs mount: ``lowers`` (topmost first) at ``target`` inside the container.

    ``mount_lowers``, when set, is what the mount really stacks (paths valid only inside the
    container's mount namespace, such as the layers view); ``lowers`` stays the host paths, for
    ``diff`` and ``commit``.
    """

    target: str
    lowers: tuple[str, ...]
    upper: str
    work: str
    mount_lowers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Mount:
    source: str | None
    target: str
    fstype: str | None
    flags: int = 0
    data: str | None = None


@dataclass(frozen=True)
class Mkdir:
    path: str


@dataclass(frozen=True)
class MountPoint:
    """Create ``path`` as a directory or an empty file, like ``source`` on the host."""

    path: str
    like: str


@dataclass(frozen=True)
class Symlink:
    target: str
    path: str


@dataclass(frozen=True)
class RemountReadOnly:
    """Bind-remount ``path`` read-only, keeping the flags the kernel locked (rootless).

    With ``bind_first`` the path is first bound onto itself (to make it a mount of its own), and a
    path that does not exist is skipped: kernels differ in what ``/proc`` holds.
    """

    path: str
    bind_first: bool = False


@dataclass(frozen=True)
class MaskPath:
    """Hide ``path``: /dev/null over a file, an empty read-only tmpfs over a directory."""

    path: str


@dataclass(frozen=True)
class PivotRoot:
    new_root: str


Op = Mount | Mkdir | MountPoint | Symlink | RemountReadOnly | MaskPath | PivotRoot


def parse_mountinfo(text: str) -> list[HostMount]:
    """The mount points and filesystem types of a ``/proc/PID/mountinfo`` text."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        if len(fields) < 5:
            continue
        target = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        mounts.append(HostMount(target, right.split()[0]))
    return mounts


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def data_mounts(mounts: Iterable[HostMount]) -> list[str]:
    """Host mount points below ``/`` that hold data a container should see (sorted, parents first)."""
    seen: dict[str, str] = {}
    for m in mounts:
        seen[m.target] = m.fstype  # a later mount on the same point hides the earlier one
    out = []
    for target, fstype in seen.items():
        if target == "/" or fstype in PSEUDO_FS:
            continue
        if any(_under(target, p) for p in (*PROVIDED, *FRESH_TMPFS_ON_HOST_IMAGE)):
            continue
        out.append(target)
    return sorted(out)


@dataclass(frozen=True)
class StatePaths:
    """Where one container's writable state lives on the host."""

    root: str

    @property
    def rootfs(self) -> str:
        return f"{self.root}/rootfs"

    @property
    def skeleton(self) -> str:
        return f"{self.root}/skeleton"

    @property
    def layers_view(self) -> str:
        """Where the image layers are stacked read-only when they go on top of the host."""
        return f"{self.root}/layers"

    @property
    def empty(self) -> str:
        return f"{self.root}/empty"

    def upper(self, index: int) -> str:
        return f"{self.root}/upper/{index}"

    def work(self, index: int) -> str:
        return f"{self.root}/work/{index}"

    def etc_file(self, name: str) -> str:
        return f"{self.root}/etc/{name}"


def plan_overlays(
    lowers: Sequence[str],
    host: bool,
    host_data_mounts: Sequence[str],
    host_top_dirs: Sequence[str],
    split: bool,
    state: StatePaths,
    host_mount_points: Sequence[str] = (),
    host_paths: Sequence[str] = (),
) -> list[Overlay]:
    """The overlay mounts that make the root filesystem, in mount order.

    ``host_top_dirs`` are the top-level directories of the host's ``/`` and
    ``host_mount_points`` every mount point of the host, data or not (both used when ``split``).
    """
    overlays: list[Overlay] = []

    def add(target: str, layer_lowers: tuple[str, ...]) -> None:
        i = len(overlays)
        overlays.append(Overlay(target, layer_lowers, state.upper(i), state.work(i)))

    if not host:
        add("/", tuple(lowers))
        for path in outermost(host_paths):
            add(path, (path,))
        return overlays
    # Image layers on top of the host: the kernel refuses lower layers where one lies inside
    # another ("overlapping lowerdir", ELOOP), and the store's layers lie inside "/". Stacking
    # the layers first, in an overlay of their own (another filesystem), avoids the overlap.
    view = state.layers_view

    def on_host(path: str, host_path: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        if path == "/":
            inside = list(lowers)
        else:
            inside = [low + path for low in lowers if os.path.isdir(low + path)]
        if not inside:
            return (host_path,), None
        return (*inside, host_path), (view + ("" if path == "/" else path), host_path)

    if not split:
        real, mounted = on_host("/", "/")
        overlays.append(Overlay("/", real, state.upper(0), state.work(0), mounted))
        for target in host_data_mounts:
            add(target, (target,))
        return overlays
    add("/", (*lowers, state.skeleton))
    mounted_below = set(host_mount_points) | set(host_data_mounts)
    for name in host_top_dirs:
        path = "/" + name
        if path in PROVIDED or path in FRESH_TMPFS_ON_HOST_IMAGE:
            continue
        if any(_under(m, path) and m != path for m in mounted_below):
            # A directory with submounts of its own cannot be a lower layer rootless; its
            # data submounts still get overlays below, its own files are not shown.
            continue
        real, mounted = on_host(path, path)
        i = len(overlays)
        overlays.append(Overlay(path, real, state.upper(i), state.work(i), mounted))
    for target in host_data_mounts:
        if target.count("/") > 1 or target not in {"/" + n for n in host_top_dirs}:
            add(target, (target,))
    return overlays


def outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without those inside another one (a mount of the outer shows them), sorted."""
    norm = sorted({os.path.normpath(p) for p in paths})
    return [p for p in norm if not any(q != p and _under(p, q) for q in norm)]


def _esc(p: str) -> str:
    """Escape a path for an overlay option list (``:`` separates layers, ``,`` options)."""
    return p.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(ov: Overlay, userxattr: bool) -> str:
    lowers = ov.mount_lowers or ov.lowers
    opts = f"lowerdir={':'.join(_esc(p) for p in lowers)},upperdir={_esc(ov.upper)},workdir={_esc(ov.work)}"
    if userxattr:
        opts += ",userxattr"  # redirect_dir and metacopy are off in a user namespace anyway
    else:
        # What a container writes must be expressible as a layer tar (commit, build): no
        # redirect or metacopy xattrs pointing into lower layers, whatever the module defaults.
        opts += ",redirect_dir=off,metacopy=off"
    return opts


def plan_mounts(
    spec: ContainerSpec,
    overlays: Sequence[Overlay],
    state: StatePaths,
    rootless: bool,
) -> list[Op]:
    """Every step from a private mount namespace to a pivoted, locked-down root."""
    r = state.rootfs
    nosuid_nodev_noexec = MS_NOSUID | MS_NODEV | MS_NOEXEC
    ops: list[Op] = [Mount(None, "/", None, MS_REC | MS_PRIVATE)]
    if spec.rootfs.host and spec.rootfs.lowers:
        # Read-only, so an empty directory stands in for the second layer the kernel requires.
        low = ":".join(_esc(p) for p in (*spec.rootfs.lowers, state.empty))
        ops += [
            Mkdir(state.empty),
            Mkdir(state.layers_view),
            Mount(
                "overlay",
                state.layers_view,
                "overlay",
                MS_RDONLY,
                f"lowerdir={low}" + (",userxattr" if rootless else ""),
            ),
        ]
    for ov in overlays:
        target = r if ov.target == "/" else r + ov.target
        if ov.target != "/":
            ops.append(Mkdir(target))
        ops.append(Mount("overlay", target, "overlay", 0, overlay_options(ov, rootless)))
    if spec.rootfs.host:
        for path in FRESH_TMPFS_ON_HOST_IMAGE:
            ops.append(Mkdir(r + path))
            ops.append(Mount("tmpfs", r + path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755"))
    ops += [
        Mkdir(r + "/proc"),
        Mount("proc", r + "/proc", "proc", nosuid_nodev_noexec),
        Mkdir(r + "/dev"),
        Mount("tmpfs", r + "/dev", "tmpfs", MS_NOSUID, "mode=755,size=65536k"),
    ]
    for dev in DEVICES:
        ops += [
            MountPoint(f"{r}/dev/{dev}", "/dev/null"),
            Mount(f"/dev/{dev}", f"{r}/dev/{dev}", None, MS_BIND),
        ]
    ops += [Symlink(target, f"{r}/dev/{name}") for target, name in DEV_SYMLINKS]
    ops += [
        Mkdir(r + "/dev/pts"),
        Mount(
            "devpts",
            r + "/dev/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        Mkdir(r + "/dev/shm"),
        Mount("shm", r + "/dev/shm", "tmpfs", nosuid_nodev_noexec, "mode=1777,size=65536k"),
        Mkdir(r + "/dev/mqueue"),
        Mount("mqueue", r + "/dev/mqueue", "mqueue", nosuid_nodev_noexec),
        Mkdir(r + "/sys"),
    ]
    if rootless and spec.network == "host":
        # A fresh sysfs needs a network namespace of our own; share the host's, read-only.
        ops += [Mount("/sys", r + "/sys", None, MS_BIND | MS_REC), RemountReadOnly(r + "/sys")]
    else:
        ops.append(Mount("sysfs", r + "/sys", "sysfs", nosuid_nodev_noexec | MS_RDONLY))
    for name in ("hostname", "hosts", "resolv.conf"):
        target = f"{r}/etc/{name}"
        ops += [
            MountPoint(target, state.etc_file(name)),
            Mount(state.etc_file(name), target, None, MS_BIND),
        ]
    ops += _user_mounts(r, spec.binds, spec.tmpfs)
    ops += [MaskPath(r + p) for p in MASKED_PATHS]
    for p in READONLY_PATHS:
        ops.append(RemountReadOnly(r + p, bind_first=True))
    ops.append(PivotRoot(r))
    if spec.read_only:
        # Every overlay, not only "/": the split host image has one per top-level directory.
        ops += [RemountReadOnly(ov.target) for ov in overlays]
    return ops


def _user_mounts(r: str, binds: Sequence[BindMount], tmpfs: Sequence[TmpfsMount]) -> list[Op]:
    ops: list[Op] = []
    # Shorter targets first, so a mount inside another mount's target is not hidden by it.
    for b in sorted(binds, key=lambda b: b.target.count("/")):
        ops += [
            MountPoint(r + b.target, b.source),
            Mount(b.source, r + b.target, None, MS_BIND | MS_REC),
        ]
        if b.readonly:
            ops.append(RemountReadOnly(r + b.target))
    for t in tmpfs:
        ops += [
            Mkdir(r + t.target),
            Mount("tmpfs", r + t.target, "tmpfs", MS_NOSUID | MS_NODEV, t.options),
        ]
    return ops


def skeleton_entries(host_root: str = "/") -> list[tuple[str, str | None]]:
    """Top-level entries of the host's root for the split host image: (name, symlink target or None)."""
    out: list[tuple[str, str | None]] = []
    with os.scandir(host_root) as it:
        for entry in it:
            if entry.is_symlink():
                out.append((entry.name, os.readlink(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                out.append((entry.name, None))
    return sorted(out)


def apply(ops: Iterable[Op], sys: _sys.Syscalls) -> None:
    """Run a mount plan. Stops at the first error, which names the op."""
    for op in ops:
        try:
            _apply_one(op, sys)
        except OSError as e:
            raise OSError(e.errno, f"{type(op).__name__} {_describe(op)}: {e.strerror}") from e


def _describe(op: Op) -> str:
    if isinstance(op, Mount):
        return f"{op.fstype or 'bind'} {op.source} on {op.target}"
    if isinstance(op, Symlink):
        return f"{op.path} -> {op.target}"
    if isinstance(op, PivotRoot):
        return op.new_root
    return op.path


def _apply_one(op: Op, sys: _sys.Syscalls) -> None:
    if isinstance(op, Mount):
        sys.mount(op.source, op.target, op.fstype, op.flags, op.data)
    elif isinstance(op, Mkdir):
        sys.mkdir(op.path)
    elif isinstance(op, MountPoint):
        if os.path.isdir(op.like):
            sys.mkdir(op.path)
        else:
            sys.touch(op.path)
    elif isinstance(op, Symlink):
        sys.symlink(op.target, op.path)
    elif isinstance(op, RemountReadOnly):
        if op.bind_first:
            if not os.path.lexists(op.path):
                return
            sys.mount(op.path, op.path, None, MS_BIND | MS_REC, None)
        flags = _locked_flags(op.path)
        sys.mount(None, op.path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, None)
    elif isinstance(op, MaskPath):
        if not os.path.lexists(op.path):
            return
        if os.path.isdir(op.path):
            sys.mount("tmpfs", op.path, "tmpfs", MS_RDONLY, None)
        else:
            sys.mount("/dev/null", op.path, None, MS_BIND, None)
    elif isinstance(op, PivotRoot):
        sys.chdir(op.new_root)
        sys.pivot_root(".", ".")
        sys.umount2(".", MNT_DETACH)
        sys.chdir("/")


def _locked_flags(path: str) -> int:
    """Flags a read-only bind remount must repeat, or the kernel refuses it in a user namespace."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    flags = 0
    for bit in (MS_NOSUID, MS_NODEV, MS_NOEXEC):
        if st.f_flag & bit:
            flags |= bit
    # ST_NOATIME / ST_NODIRATIME / ST_RELATIME share values with the MS_ flags.
    flags |= st.f_flag & (_sys.MS_NOATIME | _sys.MS_NODIRATIME | _sys.MS_RELATIME)
    return flags
