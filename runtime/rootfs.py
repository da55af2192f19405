"""The container's root filesystem: a pure plan of mounts, and a short loop that applies it.

The plan is a list of :data:`Op` values computed from the spec, the container's state paths and
the host's mount table. :func:`apply` runs them through a :class:`~runtime._sys.Syscalls`, so unit
tests can check the exact order and arguments with a recording fake.

The host image ("host") is the host's ``/`` as the read-only lower layer. As root one overlay with
``lowerdir=/`` does it (plus one per data filesystem mounted below ``/``). Image layers on top of
the host, as root, are one overlay too, over a read-only overlay of ``/`` (see
:attr:`Overlay.host_view`). Inside a user namespace the kernel refuses to use a directory with
locked submounts as a lower layer ("failed to clone lowerpath"), so the root is *split*: a small
skeleton of the top-level entries is the root layer, and each top-level directory gets its own
overlay.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

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
from runtime.image import safepath
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

DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
"""The devices of a container's ``/dev`` and their (major, minor) numbers, fixed by Linux."""
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
MOUNT_POINT_DIRS = ("/proc", "/dev", "/sys", *FRESH_TMPFS_ON_HOST_IMAGE)
"""Where every container mounts something of its own: most images (and the host) have them."""


@dataclass(frozen=True)
class HostMount:
    """One line of ``/proc/self/mountinfo`` that matters here."""

    target: str
    fstype: str


@dataclass(frozen=True)
class Overlay:
    """One overlayfs mount: ``lowers`` (topmost first) at ``target`` inside the container.

    ``optional``: a host directory found while splitting, which may vanish before the mount
    (another process's temporary directory); it is then simply not shown.
    """

    target: str
    lowers: tuple[str, ...]
    upper: str
    work: str
    optional: bool = False
    host_view: str | None = None
    """Where the last two ``lowers`` (a mask hiding the store, then ``/``) are first mounted as
    one read-only overlay that stands in for them in this one.

    The kernel refuses ``/`` as a lower layer beside image layers that lie inside it
    ("overlapping lowerdir"); an overlay *of* ``/`` is another filesystem, which it accepts. So
    an image on top of the host is, as root, one overlay instead of one per host directory (16
    on this machine) and a skeleton to make for each container.
    """

    @property
    def mount_lowers(self) -> tuple[str, ...]:
        """The lower directories the mount itself names."""
        if self.host_view is None:
            return self.lowers
        return (*self.lowers[:-2], self.host_view)


@dataclass(frozen=True)
class Mount:
    source: str | None
    target: str
    fstype: str | None
    flags: int = 0
    data: str | None = None
    optional: bool = False
    """Skip it, instead of failing, when its source or target no longer exists."""


@dataclass(frozen=True)
class Mkdir:
    path: str


@dataclass(frozen=True)
class MountPoint:
    """Create ``path`` as a directory or an empty file, like ``source`` on the host."""

    path: str
    like: str


@dataclass(frozen=True)
class DeviceNode:
    """A character device made with ``mknod``, mode 0666 (as root; rootless binds the host's)."""

    path: str
    major: int
    minor: int


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
    flags: int | None = None
    """The mount's flags to keep, when the plan knows them; else read with ``statvfs``."""


@dataclass(frozen=True)
class MaskPath:
    """Hide ``path``: /dev/null over a file, an empty read-only tmpfs over a directory.

    ``directory`` says which, when the plan knows; else the path is looked at (and skipped when
    this kernel does not have it).
    """

    path: str
    directory: bool | None = None


@dataclass(frozen=True)
class PivotRoot:
    new_root: str


Op = Mount | Mkdir | MountPoint | DeviceNode | Symlink | RemountReadOnly | MaskPath | PivotRoot


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

    def mask(self, index: int) -> str:
        return f"{self.root}/mask/{index}"

    @property
    def host_view(self) -> str:
        return f"{self.root}/host"

    def upper(self, index: int) -> str:
        return f"{self.root}/upper/{index}"

    def work(self, index: int) -> str:
        return f"{self.root}/work/{index}"

    def etc_file(self, name: str) -> str:
        return f"{self.root}/etc/{name}"


@dataclass(frozen=True)
class SkeletonEntry:
    """Something the skeleton layer of a split host root holds, at ``path`` (absolute)."""

    path: str
    kind: str  # "dir", "link" or "file" (a small file copied from the host)
    link: str | None = None


@dataclass(frozen=True)
class Mask:
    """A layer of whiteouts (``directory``) hiding ``hidden`` (relative paths) of a host directory."""

    directory: str
    hidden: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """The overlays of a root filesystem, and what the split host layout needs made first."""

    overlays: list[Overlay]
    skeleton: list[SkeletonEntry]
    masks: list[Mask] = field(default_factory=list)


HostLister = Callable[[str], Sequence[tuple[str, str, str | None]]]
"""``list_dir(path)`` -> ``(name, kind, link target)`` for each entry, kind dir/link/file."""

SKELETON_FILE_LIMIT = 1 << 20
"""Files in a split host directory larger than this are not shown (they would be copied)."""


def plan_overlays(
    lowers: Sequence[str],
    host: bool,
    host_data_mounts: Sequence[str],
    host_top: Sequence[tuple[str, str, str | None]],
    split: bool,
    state: StatePaths,
    host_mount_points: Sequence[str] = (),
    host_paths: Sequence[str] = (),
    list_dir: HostLister | None = None,
) -> Layout:
    """The overlay mounts that make the root filesystem, in mount order.

    The plain host image as root is one overlay on ``/``, and so are image layers on top of the
    host as root, over a read-only overlay of ``/`` (:attr:`Overlay.host_view`), when the store
    lies on the root filesystem and the container's state does not. Otherwise the host's root
    is *split*: a skeleton of its entries is the root layer and each host directory gets an
    overlay of its own, because the kernel refuses (1) rootless, a lower directory with locked
    submounts, and (2) a lower layer lying inside another ("overlapping lowerdir"), which image
    layers on top of the host would be, the store being somewhere below ``/``. A directory
    holding the layers is split again, recursively (``list_dir`` lists it), and the layers' own
    directory is not shown. Layers stay in the same overlay as the host directory below them,
    so their whiteouts and opaque directories hide host files as they must.

    ``host_top`` lists ``/`` like ``list_dir``; ``host_mount_points`` is every mount point of the
    host, data or not.
    """
    overlays: list[Overlay] = []

    def add(target: str, layer_lowers: tuple[str, ...]) -> None:
        i = len(overlays)
        overlays.append(Overlay(target, layer_lowers, state.upper(i), state.work(i)))

    if not host:
        add("/", tuple(lowers))
        for path in outermost(host_paths):
            add(path, (path,))
        return Layout(overlays, [])
    if not split and not lowers:
        add("/", ("/",))
        for target in host_data_mounts:
            add(target, (target,))
        return Layout(overlays, [])
    hidden = _hidden(lowers)
    if not split and _can_stack(hidden, state, host_mount_points):
        mask = Mask(state.mask(0), tuple(sorted(os.path.relpath(h, "/") for h in hidden)))
        root = (*lowers, mask.directory, "/")
        overlays.append(
            Overlay("/", root, state.upper(0), state.work(0), host_view=state.host_view)
        )
        for target in host_data_mounts:
            stack = _layers_at(lowers, target)
            if stack is not None:  # else a layer deleted or replaced it: the root shows that
                add(target, stack)
        return Layout(overlays, [], [mask])
    add("/", (*lowers, state.skeleton))
    submounted = set(host_mount_points) | set(host_data_mounts) if split else set()
    skeleton: list[SkeletonEntry] = []
    masks: list[Mask] = []
    shown: set[str] = set()

    def overlay(path: str, stack: tuple[str, ...], optional: bool) -> None:
        i = len(overlays)
        overlays.append(Overlay(path, stack, state.upper(i), state.work(i), optional))
        shown.add(path)

    def visit(directory: str, entries: Sequence[tuple[str, str, str | None]], depth: int) -> None:
        for name, kind, link in entries:
            path = directory.rstrip("/") + "/" + name
            if kind != "dir":
                skeleton.append(SkeletonEntry(path, kind, link))
                continue
            skeleton.append(SkeletonEntry(path, "dir"))
            if path in PROVIDED or path in FRESH_TMPFS_ON_HOST_IMAGE or path in hidden:
                continue
            if any(_under(m, path) and m != path for m in submounted):
                # A directory with submounts of its own cannot be a lower layer rootless; its
                # data submounts still get overlays below, its own files are not shown.
                continue
            inner = [h for h in hidden if _under(h, path)]
            stack = _layers_at(lowers, path)
            if inner and stack == (path,) and not _under(state.root, path):
                # No layer touches it: one overlay, with the layers' directory whited out by a
                # mask layer (in the container's state, which must not lie inside it either).
                mask = Mask(state.mask(len(masks)), tuple(os.path.relpath(h, path) for h in inner))
                masks.append(mask)
                overlay(path, (mask.directory, path), depth > 0)
            elif inner:
                visit(path, list_dir(path) if list_dir else (), depth + 1)
            elif stack is not None:
                overlay(path, stack, depth > 0)

    visit("/", host_top, 0)
    for target in host_data_mounts:
        if target not in shown and not any(_under(target, h) for h in hidden):
            add(target, (target,))
    return Layout(overlays, skeleton, masks)


def _can_stack(hidden: set[str], state: StatePaths, mount_points: Sequence[str]) -> bool:
    """Can the root be one overlay over a read-only overlay of ``/`` (:attr:`Overlay.host_view`)?

    Only when the store's layers lie on the root filesystem itself (under another mount, the
    overlay of that mount would hold them: overlapping again) and the container's state does
    not (its mask would lie inside ``/``, a lower layer of the same overlay).
    """

    def mount_of(path: str) -> str:
        return max((m for m in mount_points if _under(path, m)), key=len, default="/")

    return all(mount_of(h) == "/" for h in hidden) and mount_of(state.root) != "/"


def _hidden(lowers: Sequence[str]) -> set[str]:
    """Host paths a split layout must not show: the directory holding the image's layers."""
    if not lowers:
        return set()
    common = os.path.commonpath([os.path.normpath(p) for p in lowers])
    return {common} if common != "/" else {os.path.normpath(p) for p in lowers}


def _layers_at(lowers: Sequence[str], path: str) -> tuple[str, ...] | None:
    """The lower stack for host directory ``path``: the layers' own ``path``, then the host's.

    Topmost first; a layer that deletes ``path`` (whiteout), replaces it with a non-directory,
    or makes it opaque ends the stack there (the host's directory is then not below it).
    ``None`` means no overlay: the root overlay shows what the layers made of ``path``.
    """
    stack: list[str] = []
    for low in lowers:
        entry = low + path
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            return tuple(stack) if stack else None  # deleted or replaced by this layer
        stack.append(entry)
        if _is_opaque(entry):
            return tuple(stack)
    return (*stack, path)


def _is_opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) in (b"y", b"x"):
                return True
        except OSError:
            continue
    return False


def list_host_dir(path: str) -> list[tuple[str, str, str | None]]:
    """List a host directory for the split layout (``HostLister``); small files only."""
    out: list[tuple[str, str, str | None]] = []
    try:
        entries = list(os.scandir(path))
    except OSError:
        return out
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            if entry.is_symlink():
                out.append((entry.name, "link", os.readlink(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                out.append((entry.name, "dir", None))
            elif (
                entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_size <= SKELETON_FILE_LIMIT
            ):
                out.append((entry.name, "file", None))
        except OSError:
            continue
    return out


def outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without those inside another one (a mount of the outer shows them), sorted."""
    norm = sorted({os.path.normpath(p) for p in paths})
    return [p for p in norm if not any(q != p and _under(p, q) for q in norm)]


def _esc(p: str) -> str:
    """Escape a path for an overlay option list (``:`` separates layers, ``,`` options)."""
    return p.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(ov: Overlay, userxattr: bool) -> str:
    opts = f"lowerdir={':'.join(_esc(p) for p in ov.mount_lowers)},upperdir={_esc(ov.upper)},workdir={_esc(ov.work)}"
    if userxattr:
        opts += ",userxattr"  # redirect_dir and metacopy are off in a user namespace anyway
    else:
        # What a container writes must be expressible as a layer tar (commit, build): no
        # redirect or metacopy xattrs pointing into lower layers, whatever the module defaults.
        opts += ",redirect_dir=off,metacopy=off"
    return opts


@dataclass(frozen=True)
class Known:
    """What the engine looked up before the fork, so that the container's init need not.

    Each lookup there is a system call, an exception and copy-on-write faults in a fork of a
    large process; here it is a ``stat`` in the caller.
    """

    present: frozenset[str] = frozenset()
    """Of :data:`MOUNT_POINT_DIRS`, those the root's layers already have as directories."""
    masked: tuple[tuple[str, bool], ...] | None = None
    """The :data:`MASKED_PATHS` this kernel has, each with whether it is a directory."""
    resolve: Callable[[str], str] | None = None
    """A container path's place in the root, its links resolved inside it (:class:`RootView`)."""


class RootView:
    """The root a container will see, read from its layers before any of it is mounted.

    Mount targets are resolved inside the root before anything is created or mounted there,
    as runc does: a symlink in an image (``/etc -> /somewhere/on/the/host``, or a
    ``resolv.conf`` pointing into ``/run``) must lead to a place inside the root, never to a
    host path where the engine, still outside the root, would create files. For a path, the
    overlay with the deepest target above it answers (an overlay's own mount point is a name in
    the one below), and in it the topmost layer that has the path: a whiteout or a file there
    hides what lies below. What is below a ``fresh`` mount point (``/proc``, ``/dev``...) is
    the engine's own and has no links of the image.
    """

    def __init__(self, overlays: Sequence[Overlay], fresh: Iterable[str]) -> None:
        self._by_depth = sorted(overlays, key=lambda ov: len(ov.target), reverse=True)
        self._fresh = tuple(f + "/" for f in fresh)
        self._seen: dict[str, tuple[str, int] | None] = {}
        self._resolved: dict[str, str] = {}

    def resolve(self, path: str) -> str:
        """Container path ``path`` with its links resolved inside the root, relative to it."""
        if path not in self._resolved:
            self._resolved[path] = safepath.resolve(path, self.readlink)
        return self._resolved[path]

    def _entry(self, path: str) -> tuple[str, int] | None:
        """The host path and mode of the entry that shows at container path ``path``."""
        if path in self._seen:
            return self._seen[path]
        found = None
        ov = next((o for o in self._by_depth if _under(path, o.target) and path != o.target), None)
        if ov is not None and not path.startswith(self._fresh):
            sub = path if ov.target == "/" else path[len(ov.target) :]
            for low in ov.lowers:
                entry = low.rstrip("/") + sub
                try:
                    found = (entry, os.lstat(entry).st_mode)
                except OSError:
                    continue
                break
        self._seen[path] = found
        return found

    def readlink(self, rel: str) -> str | None:
        """For :func:`safepath.resolve`: the target of the link at ``/rel``, else ``None``."""
        found = self._entry("/" + rel)
        return os.readlink(found[0]) if found and stat.S_ISLNK(found[1]) else None

    def dirs(self, paths: Iterable[str] = MOUNT_POINT_DIRS) -> frozenset[str]:
        """Which of ``paths`` are directories already."""
        return frozenset(p for p in paths if (e := self._entry(p)) and stat.S_ISDIR(e[1]))


@functools.cache
def masked_paths() -> tuple[tuple[str, bool], ...]:
    """Which :data:`MASKED_PATHS` this kernel has, read once from the host's ``/proc`` and
    ``/sys``: a container's fresh instances of them show the same kernel."""
    found = []
    for path in MASKED_PATHS:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        found.append((path, stat.S_ISDIR(st.st_mode)))
    return tuple(found)


MAKE_PRIVATE = Mount(None, "/", None, MS_REC | MS_PRIVATE)
"""Every mount plan's first step: nothing mounted after it shows outside the namespace."""


def plan_mounts(
    spec: ContainerSpec,
    overlays: Sequence[Overlay],
    state: StatePaths,
    rootless: bool,
    known: Known = Known(),
) -> list[Op]:
    """Every step from a private mount namespace to a pivoted, locked-down root."""
    root = state.rootfs
    nosuid_nodev_noexec = MS_NOSUID | MS_NODEV | MS_NOEXEC

    def inside(path: str) -> str:
        """The host path of container path ``path``, its symlinks resolved inside the root."""
        if known.resolve is None:
            return root + path
        rel = known.resolve(path)
        return f"{root}/{rel}" if rel else root

    def mkdir(path: str) -> list[Op]:
        return [] if path in known.present else [Mkdir(inside(path))]

    proc, dev, sys_dir = inside("/proc"), inside("/dev"), inside("/sys")

    def on_ours(path: str) -> str:
        """A path on the engine's own fresh /proc or /sys, which has no links of the image."""
        top, _, rest = path.partition("/")[2].partition("/")
        return f"{proc if top == 'proc' else sys_dir}/{rest}"

    ops: list[Op] = [MAKE_PRIVATE]
    for ov in overlays:
        target = root if ov.target == "/" else inside(ov.target)
        if ov.target != "/":
            ops.append(Mkdir(target))
        if ov.host_view is not None:
            view = f"lowerdir={_esc(ov.lowers[-2])}:{_esc(ov.lowers[-1])}"
            ops.append(Mount("overlay", ov.host_view, "overlay", MS_RDONLY | MS_NODEV, view))
        # nodev: a device node in an image (or the host's root) opens nothing; see
        # process.DEFAULT_CAPS for why the container's /dev holds only the engine's own.
        options = overlay_options(ov, rootless)
        ops.append(Mount("overlay", target, "overlay", MS_NODEV, options, ov.optional))
    if spec.rootfs.host:
        for path in FRESH_TMPFS_ON_HOST_IMAGE:
            ops += mkdir(path)
            ops.append(Mount("tmpfs", inside(path), "tmpfs", MS_NOSUID | MS_NODEV, "mode=755"))
    ops += [
        *mkdir("/proc"),
        Mount("proc", proc, "proc", nosuid_nodev_noexec),
        *mkdir("/dev"),
        Mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k"),
    ]
    for name, (major, minor) in DEVICES.items():
        if rootless:  # mknod needs CAP_MKNOD in the initial user namespace: bind the host's
            ops += [
                MountPoint(f"{dev}/{name}", "/dev/null"),
                Mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND),
            ]
        else:  # as runc does: six mknods instead of six files and six mounts to make and undo
            ops.append(DeviceNode(f"{dev}/{name}", major, minor))
    ops += [Symlink(target, f"{dev}/{name}") for target, name in DEV_SYMLINKS]
    ops += [
        Mkdir(dev + "/pts"),
        Mount(
            "devpts",
            dev + "/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        Mkdir(dev + "/shm"),
        Mount("shm", dev + "/shm", "tmpfs", nosuid_nodev_noexec, "mode=1777,size=65536k"),
        Mkdir(dev + "/mqueue"),
        Mount("mqueue", dev + "/mqueue", "mqueue", nosuid_nodev_noexec),
        *mkdir("/sys"),
    ]
    if rootless and spec.network == "host":
        # A fresh sysfs needs a network namespace of our own; share the host's, read-only.
        ops += [Mount("/sys", sys_dir, None, MS_BIND | MS_REC), RemountReadOnly(sys_dir)]
    else:
        ops.append(Mount("sysfs", sys_dir, "sysfs", nosuid_nodev_noexec | MS_RDONLY))
    for name in ("hostname", "hosts", "resolv.conf"):
        target = inside(f"/etc/{name}")
        ops += [
            MountPoint(target, state.etc_file(name)),
            Mount(state.etc_file(name), target, None, MS_BIND),
        ]
    ops += _user_mounts(inside, spec.binds, spec.tmpfs)
    if known.masked is None:
        ops += [MaskPath(on_ours(p)) for p in MASKED_PATHS]
    else:
        ops += [MaskPath(on_ours(p), directory) for p, directory in known.masked]
    # The flags of the proc mount above (and the kernel's default relatime).
    proc_flags = nosuid_nodev_noexec | _sys.MS_RELATIME
    ops += [RemountReadOnly(on_ours(p), bind_first=True, flags=proc_flags) for p in READONLY_PATHS]
    ops.append(PivotRoot(root))
    if spec.read_only:
        # Every overlay, not only "/": the split host image has one per top-level directory.
        ops += [RemountReadOnly(ov.target) for ov in overlays]
    return ops


def split_for_prepare(ops: Sequence[Op], state: StatePaths) -> tuple[list[Op], list[Op]] | None:
    """Split a plan for a container set up ahead (:mod:`runtime.prepare`): what another
    process can do first, and what the container's PID 1 must still do after joining.

    A proc mount shows the pid namespace of the process that mounts it, so ``/proc`` and the
    masks and read-only remounts on it are left to the PID 1, after ``pivot_root``: their
    targets become paths in the container's root. ``None`` when the plan does not split
    cleanly (a user's mount on ``/proc``): then the container is set up the usual way.
    """
    root = state.rootfs
    proc = next((op.target for op in ops if isinstance(op, Mount) and op.fstype == "proc"), None)
    if proc is None or not proc.startswith(root + "/"):
        return None
    ahead: list[Op] = []
    inside: list[Op] = []
    for op in ops:
        path = op.target if isinstance(op, Mount) else getattr(op, "path", "")
        if path != proc and not path.startswith(proc + "/"):
            ahead.append(op)
        elif isinstance(op, Mount) and op.fstype == "proc":
            inside.append(dataclasses.replace(op, target=path[len(root) :]))
        elif isinstance(op, (MaskPath, RemountReadOnly)):
            inside.append(dataclasses.replace(op, path=path[len(root) :]))
        elif isinstance(op, Mkdir):
            ahead.append(op)
        else:
            return None
    return ahead, inside


def _user_mounts(
    inside: Callable[[str], str], binds: Sequence[BindMount], tmpfs: Sequence[TmpfsMount]
) -> list[Op]:
    ops: list[Op] = []
    # Shorter targets first, so a mount inside another mount's target is not hidden by it.
    for b in sorted(binds, key=lambda b: b.target.count("/")):
        target = inside(b.target)
        ops += [MountPoint(target, b.source), Mount(b.source, target, None, MS_BIND | MS_REC)]
        if b.readonly:
            ops.append(RemountReadOnly(target))
    for t in tmpfs:
        target = inside(t.target)
        ops += [
            Mkdir(target),
            Mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, t.options),
        ]
    return ops


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
        try:
            sys.mount(op.source, op.target, op.fstype, op.flags, op.data)
        except FileNotFoundError:
            if not op.optional:
                raise
    elif isinstance(op, Mkdir):
        sys.mkdir(op.path)
    elif isinstance(op, MountPoint):
        if os.path.isdir(op.like):
            sys.mkdir(op.path)
        else:
            sys.touch(op.path)
    elif isinstance(op, DeviceNode):
        sys.mknod(op.path, stat.S_IFCHR | 0o666, os.makedev(op.major, op.minor))
    elif isinstance(op, Symlink):
        sys.symlink(op.target, op.path)
    elif isinstance(op, RemountReadOnly):
        if op.bind_first:
            try:
                sys.mount(op.path, op.path, None, MS_BIND | MS_REC, None)
            except FileNotFoundError:
                return
        flags = _locked_flags(op.path) if op.flags is None else op.flags
        sys.mount(None, op.path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, None)
    elif isinstance(op, MaskPath):
        directory = op.directory
        if directory is None:
            try:
                directory = stat.S_ISDIR(os.lstat(op.path).st_mode)
            except FileNotFoundError:
                return
        try:
            if directory:
                sys.mount("tmpfs", op.path, "tmpfs", MS_RDONLY, None)
            else:
                sys.mount("/dev/null", op.path, None, MS_BIND, None)
        except FileNotFoundError:
            return  # not in this container's /proc or /sys after all
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
