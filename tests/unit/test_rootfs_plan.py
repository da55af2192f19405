"""The root filesystem plan: order and arguments of every mount, checked without privileges.

``plan_mounts`` / ``plan_overlays`` are pure; :func:`runtime.rootfs.apply` is run through the
recording fake, which refuses what the kernel would refuse (a mount on a path not created yet, a
remount of a non-mount point, ``pivot_root`` onto a non-mount point).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime._sys import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
)
from runtime._sys.fake import Call, FakeSyscalls
from runtime.rootfs import (
    MASKED_PATHS,
    READONLY_PATHS,
    DeviceNode,
    HostMount,
    Known,
    Mask,
    MaskPath,
    Mkdir,
    Mount,
    MountPoint,
    Op,
    Overlay,
    PivotRoot,
    RemountReadOnly,
    RootView,
    StatePaths,
    Symlink,
    apply,
    data_mounts,
    masked_paths,
    overlay_options,
    parse_mountinfo,
    plan_mounts,
    plan_overlays,
    split_for_prepare,
)
from runtime.spec import BindMount, ContainerSpec, Rootfs, TmpfsMount

HOST_TOP = tuple(
    (name, "dir", None)
    for name in ("bin", "dev", "etc", "home", "proc", "run", "sys", "tmp", "usr", "var")
)


@pytest.fixture
def state(tmp_path: Path) -> StatePaths:
    """A container state directory laid out as the engine prepares it (rootfs, etc files)."""
    paths = StatePaths(str(tmp_path / "state"))
    Path(paths.rootfs).mkdir(parents=True)
    etc = Path(paths.etc_file(""))
    etc.mkdir()
    for name in ("hostname", "hosts", "resolv.conf"):
        (etc / name).write_text("x\n")
    return paths


def host_spec(**kw: object) -> ContainerSpec:
    return ContainerSpec(Rootfs(host=True), argv=("true",), **kw)  # type: ignore[arg-type]


def plan(
    spec: ContainerSpec, state: StatePaths, rootless: bool = False, data: tuple[str, ...] = ()
) -> list[Op]:
    overlays = plan_overlays(
        spec.rootfs.lowers, spec.rootfs.host, data, HOST_TOP, split=rootless, state=state
    ).overlays
    return plan_mounts(spec, overlays, state, rootless=rootless)


def index(ops: list[Op], pred: Callable[[Op], bool]) -> int:
    return next(i for i, op in enumerate(ops) if pred(op))


def is_mount(fstype: str, target: str) -> Callable[[Op], bool]:
    return lambda op: isinstance(op, Mount) and op.fstype == fstype and op.target == target


# --- plan_mounts: order ---------------------------------------------------------------------


def test_the_first_step_makes_every_mount_private(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    assert ops[0] == Mount(None, "/", None, MS_REC | MS_PRIVATE)


def test_overlays_are_mounted_before_proc_and_dev(state: StatePaths) -> None:
    ops = plan(host_spec(), state, data=("/srv/data",))
    r = state.rootfs
    overlay_at = [i for i, op in enumerate(ops) if isinstance(op, Mount) and op.fstype == "overlay"]
    assert len(overlay_at) == 2
    assert ops[overlay_at[0]].target == r  # type: ignore[union-attr]
    assert max(overlay_at) < index(ops, is_mount("proc", r + "/proc"))
    assert max(overlay_at) < index(ops, is_mount("tmpfs", r + "/dev"))


def test_a_nested_overlay_target_is_created_before_it_is_mounted(state: StatePaths) -> None:
    ops = plan(host_spec(), state, data=("/srv/data",))
    target = state.rootfs + "/srv/data"
    assert index(ops, lambda op: op == Mkdir(target)) < index(ops, is_mount("overlay", target))


def test_the_host_image_gets_a_fresh_run_and_keeps_the_hosts_tmp(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    r = state.rootfs
    run = ops[index(ops, is_mount("tmpfs", r + "/run"))]
    assert run == Mount("tmpfs", r + "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    assert ops[ops.index(run) - 1] == Mkdir(r + "/run")
    # /tmp is the host's, copy-on-write through the root overlay (a project may live there).
    assert not any(isinstance(op, Mount) and op.target == r + "/tmp" for op in ops)


def test_an_image_rootfs_keeps_its_own_run(state: StatePaths, tmp_path: Path) -> None:
    spec = ContainerSpec(Rootfs(lowers=(str(tmp_path / "layer"),)), argv=("true",))
    ops = plan(spec, state)
    assert not any(isinstance(op, Mount) and op.target == state.rootfs + "/run" for op in ops)


def test_proc_sys_and_devices_have_their_safety_flags(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    r = state.rootfs
    proc = ops[index(ops, is_mount("proc", r + "/proc"))]
    sysfs = ops[index(ops, is_mount("sysfs", r + "/sys"))]
    assert isinstance(proc, Mount) and isinstance(sysfs, Mount)
    assert proc.flags == MS_NOSUID | MS_NODEV | MS_NOEXEC
    assert sysfs.flags == MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
    dev = ops.index(Mount("tmpfs", r + "/dev", "tmpfs", MS_NOSUID, "mode=755,size=65536k"))
    # As root the devices are made in the fresh /dev, with Linux's fixed numbers.
    assert ops.index(DeviceNode(r + "/dev/null", 1, 3)) > dev
    assert DeviceNode(r + "/dev/tty", 5, 0) in ops
    assert not [op for op in ops if isinstance(op, Mount) and op.target == r + "/dev/null"]
    # Rootless, mknod is not allowed: the host's node is bound onto an empty file.
    ops = plan(host_spec(), state, rootless=True)
    null = ops[index(ops, lambda op: isinstance(op, Mount) and op.target == r + "/dev/null")]
    assert null == Mount("/dev/null", r + "/dev/null", None, MS_BIND)
    assert ops.index(MountPoint(r + "/dev/null", "/dev/null")) < ops.index(null)
    assert not [op for op in ops if isinstance(op, DeviceNode)]


def test_masked_and_read_only_proc_paths_come_after_proc_and_sys(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    r = state.rootfs
    proc_at = index(ops, is_mount("proc", r + "/proc"))
    sys_at = index(ops, is_mount("sysfs", r + "/sys"))
    masks = [(i, op) for i, op in enumerate(ops) if isinstance(op, MaskPath)]
    assert [op.path for _, op in masks] == [r + p for p in MASKED_PATHS]
    assert all(i > proc_at and i > sys_at for i, _ in masks)
    ro = [(i, op) for i, op in enumerate(ops) if isinstance(op, RemountReadOnly)]
    proc_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME  # the proc mount's own
    assert [op for _, op in ro] == [
        RemountReadOnly(r + p, bind_first=True, flags=proc_flags) for p in READONLY_PATHS
    ]
    assert all(i > proc_at for i, _ in ro)


def test_every_layer_is_mounted_nodev(state: StatePaths) -> None:
    # A device node in an image opens nothing (process.DEFAULT_CAPS says why).
    for rootless in (False, True):
        ops = plan(host_spec(), state, rootless=rootless, data=("/home",))
        overlays = [op for op in ops if isinstance(op, Mount) and op.fstype == "overlay"]
        assert len(overlays) >= 2 and all(op.flags & MS_NODEV for op in overlays)


def test_what_the_engine_knows_spares_the_init_its_lookups(state: StatePaths) -> None:
    # The mount points the root's layers have need no mkdir, and the masks come with their kind.
    known = Known(frozenset({"/proc", "/sys"}), (("/proc/acpi", True), ("/proc/kcore", False)))
    overlays = plan_overlays((), True, [], HOST_TOP, split=False, state=state).overlays
    ops = plan_mounts(host_spec(), overlays, state, rootless=False, known=known)
    r = state.rootfs
    made = {op.path for op in ops if isinstance(op, Mkdir)}
    assert {r + "/dev", r + "/run"} <= made and not {r + "/proc", r + "/sys"} & made
    masks = [op for op in ops if isinstance(op, MaskPath)]
    assert masks == [MaskPath(r + "/proc/acpi", True), MaskPath(r + "/proc/kcore", False)]


def test_the_root_view_asks_the_topmost_layer_that_has_the_path(tmp_path: Path) -> None:
    top, base = tmp_path / "top", tmp_path / "base"
    for d in ("base/proc", "base/sys", "base/dev", "top"):
        (tmp_path / d).mkdir(parents=True)
    (top / "sys").write_text("a file in place of the directory")
    os.mknod(top / "dev", 0o600 | stat.S_IFIFO)  # anything but a directory hides it
    view = RootView([Overlay("/", (str(top), str(base)), "u", "w")], fresh=())
    assert view.dirs() == {"/proc"}


def test_mount_targets_are_resolved_inside_the_root(state: StatePaths) -> None:
    links = {"etc": "/elsewhere", "data": "../srv/data"}
    overlays = plan_overlays((), True, [], HOST_TOP, split=False, state=state).overlays
    spec = host_spec(binds=(BindMount("/src", "/data"),))
    view = RootView(overlays, fresh=())
    view.readlink = links.get  # type: ignore[method-assign]
    ops = plan_mounts(spec, overlays, state, False, Known(resolve=view.resolve))
    r = state.rootfs
    targets = {op.target for op in ops if isinstance(op, Mount)}
    assert {r + "/elsewhere/hostname", r + "/srv/data"} <= targets
    assert not any(t.startswith(r + "/etc/") or t == r + "/data" for t in targets)


def test_the_root_view_asks_the_deepest_overlay_and_trusts_fresh_mounts(tmp_path: Path) -> None:
    image, home = tmp_path / "image", tmp_path / "home"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "hosts").symlink_to("/run/hosts")
    (image / "home").symlink_to("/nowhere")  # where the overlay on /home would be mounted
    (image / "dev").mkdir()
    (image / "dev" / "null").symlink_to("/etc")  # below a fresh /dev: not what the container sees
    home.mkdir()
    (home / "me").symlink_to("you")
    overlays = [
        Overlay("/", (str(image),), "u0", "w0"),
        Overlay("/home", (str(home),), "u1", "w1"),
    ]
    readlink = RootView(overlays, fresh=("/dev",)).readlink
    assert readlink("etc/hosts") == "/run/hosts"
    assert readlink("etc") is None and readlink("home") == "/nowhere"
    assert readlink("home/me") == "you"
    assert readlink("dev/null") is None


def test_masked_paths_are_read_from_this_kernel() -> None:
    found = dict(masked_paths())
    assert set(found) <= set(MASKED_PATHS)
    for path, directory in found.items():
        assert os.path.isdir(path) == directory


def test_masks_come_after_user_binds_so_a_bind_cannot_unmask(state: StatePaths) -> None:
    ops = plan(host_spec(binds=(BindMount("/srv", "/proc/x"),)), state)
    bind_at = index(ops, lambda op: isinstance(op, Mount) and op.source == "/srv")
    assert bind_at < min(i for i, op in enumerate(ops) if isinstance(op, MaskPath))


def test_pivot_root_is_the_last_step(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    assert ops[-1] == PivotRoot(state.rootfs)
    assert sum(isinstance(op, PivotRoot) for op in ops) == 1


@pytest.mark.parametrize("rootless", [False, True])
def test_a_read_only_root_remounts_every_layer_after_pivot(
    state: StatePaths, rootless: bool
) -> None:
    spec = host_spec(read_only=True)
    overlays = plan_overlays((), True, ["/srv"], HOST_TOP, split=rootless, state=state).overlays
    ops = plan_mounts(spec, overlays, state, rootless=rootless)
    pivot = ops.index(PivotRoot(state.rootfs))
    after = ops[pivot + 1 :]
    assert after and all(isinstance(op, RemountReadOnly) and not op.bind_first for op in after)
    # Paths after pivot are inside the container: every overlay (split: one per directory).
    remounted = {op.path for op in after if isinstance(op, RemountReadOnly)}
    assert remounted >= {"/"} | {ov.target for ov in overlays}
    assert len(overlays) > 1


def test_a_writable_root_is_not_remounted(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    assert not any(isinstance(op, RemountReadOnly) and not op.bind_first for op in ops)


def test_binds_are_mounted_parents_first(state: StatePaths) -> None:
    binds = (
        BindMount("/s/c", "/a/b/c"),
        BindMount("/s/x", "/x"),
        BindMount("/s/b", "/a/b", readonly=True),
        BindMount("/s/a", "/a"),
    )
    ops = plan(host_spec(binds=binds), state)
    r = state.rootfs
    mounted = [
        op.target
        for op in ops
        if isinstance(op, Mount) and op.source in {"/s/a", "/s/b", "/s/c", "/s/x"}
    ]
    assert mounted.index(r + "/a") < mounted.index(r + "/a/b") < mounted.index(r + "/a/b/c")
    assert sorted(mounted) == sorted(r + b.target for b in binds)
    for b in binds:
        at = ops.index(Mount(b.source, r + b.target, None, MS_BIND | MS_REC))
        assert ops[at - 1] == MountPoint(r + b.target, b.source)
        if b.readonly:
            assert ops[at + 1] == RemountReadOnly(r + b.target)
        else:
            assert ops[at + 1] != RemountReadOnly(r + b.target)


def test_tmpfs_mounts_carry_their_options(state: StatePaths) -> None:
    ops = plan(host_spec(tmpfs=(TmpfsMount("/scratch", "size=1m,mode=700"),)), state)
    r = state.rootfs
    at = index(ops, is_mount("tmpfs", r + "/scratch"))
    assert ops[at] == Mount(
        "tmpfs", r + "/scratch", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=700"
    )
    assert ops[at - 1] == Mkdir(r + "/scratch")


def test_the_generated_etc_files_are_bound_from_the_state_dir(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    r = state.rootfs
    for name in ("hostname", "hosts", "resolv.conf"):
        at = ops.index(Mount(state.etc_file(name), f"{r}/etc/{name}", None, MS_BIND))
        assert ops[at - 1] == MountPoint(f"{r}/etc/{name}", state.etc_file(name))


# --- overlays -------------------------------------------------------------------------------


def test_userxattr_is_added_only_rootless(state: StatePaths) -> None:
    for rootless in (False, True):
        ops = plan(host_spec(), state, rootless=rootless)
        datas = [op.data or "" for op in ops if isinstance(op, Mount) and op.fstype == "overlay"]
        assert datas
        assert all(d.split(",").count("userxattr") == int(rootless) for d in datas)


def test_overlay_options_list_lowers_topmost_first() -> None:
    ov = Overlay("/", ("/layers/top", "/layers/base"), "/s/upper/0", "/s/work/0")
    assert overlay_options(ov, userxattr=False) == (
        "lowerdir=/layers/top:/layers/base,upperdir=/s/upper/0,workdir=/s/work/0"
        ",redirect_dir=off,metacopy=off"
    )


def test_overlay_options_escape_separators() -> None:
    ov = Overlay("/", ("/a:b", "/c,d", "/e\\f"), "/u:p", "/w,k")
    opts = overlay_options(ov, userxattr=True)
    assert opts == ("lowerdir=/a\\:b:/c\\,d:/e\\\\f,upperdir=/u\\:p,workdir=/w\\,k,userxattr")
    # Unescaped separators left over would split the option: none is.
    lowerdir = opts.split(",upperdir=")[0].removeprefix("lowerdir=")
    unescaped = [i for i, ch in enumerate(lowerdir) if ch == ":" and lowerdir[i - 1] != "\\"]
    assert len(unescaped) == 2


def test_an_image_is_one_overlay_of_its_layers(state: StatePaths) -> None:
    overlays = plan_overlays(
        ("/l/2", "/l/1"), False, ["/srv"], HOST_TOP, split=False, state=state
    ).overlays
    assert overlays == [Overlay("/", ("/l/2", "/l/1"), state.upper(0), state.work(0))]


def test_the_host_image_as_root_is_slash_plus_one_overlay_per_data_mount(
    state: StatePaths,
) -> None:
    overlays = plan_overlays(
        (), True, ["/home", "/srv/data"], HOST_TOP, split=False, state=state
    ).overlays
    assert overlays == [
        Overlay("/", ("/",), state.upper(0), state.work(0)),
        Overlay("/home", ("/home",), state.upper(1), state.work(1)),
        Overlay("/srv/data", ("/srv/data",), state.upper(2), state.work(2)),
    ]


def test_layers_on_the_host_as_root_are_one_overlay_over_a_view_of_the_host(
    state: StatePaths,
) -> None:
    # lowerdir=<layers>:/ is refused (the layers lie inside "/"); a read-only overlay of "/"
    # (with a mask hiding the layers) is another filesystem, which the kernel accepts as a lower.
    layout = plan_overlays(
        ("/l/top",),
        True,
        ["/home"],
        HOST_TOP,
        split=False,
        state=state,
        host_mount_points=["/", state.root],  # the state on a tmpfs of its own
    )
    root, home = layout.overlays
    assert root == Overlay(
        "/",
        ("/l/top", state.mask(0), "/"),
        state.upper(0),
        state.work(0),
        host_view=state.host_view,
    )
    assert root.mount_lowers == ("/l/top", state.host_view)
    assert layout.masks == [Mask(state.mask(0), ("l/top",))]
    assert home.lowers == ("/home",) and layout.skeleton == []

    ops = plan_mounts(host_spec(), layout.overlays, state, rootless=False)
    view = index(ops, is_mount("overlay", state.host_view))
    assert ops[view] == Mount(
        "overlay", state.host_view, "overlay", MS_RDONLY | MS_NODEV, f"lowerdir={state.mask(0)}:/"
    )
    main = index(ops, is_mount("overlay", state.rootfs))
    assert view < main
    assert str(ops[main].data).startswith(f"lowerdir=/l/top:{state.host_view},upperdir=")


@pytest.mark.parametrize(
    ("lowers", "mount_points"),
    [
        (("/l/top",), ["/"]),  # the state on "/": its mask would lie inside a lower of the view
        (("/srv/data/l/top",), ["/", "/srv/data", "state"]),  # the layers on another filesystem
    ],
    ids=["state-on-root", "layers-on-a-data-mount"],
)
def test_layers_on_the_host_split_the_root_when_no_view_of_the_host_can_hold_them(
    state: StatePaths, lowers: tuple[str, ...], mount_points: list[str]
) -> None:
    overlays = plan_overlays(
        lowers,
        True,
        ["/home", "/srv/data"],
        HOST_TOP,
        split=False,
        state=state,
        host_mount_points=[state.root if m == "state" else m for m in mount_points],
    ).overlays
    by_target = {ov.target: ov for ov in overlays}
    assert overlays[0] == Overlay("/", (*lowers, state.skeleton), state.upper(0), state.work(0))
    assert by_target["/home"].lowers == ("/home",)
    assert "/proc" not in by_target and "/run" not in by_target


def test_the_rootless_host_image_is_split_per_top_level_directory(state: StatePaths) -> None:
    overlays = plan_overlays(
        (), True, ["/home/alice", "/var"], HOST_TOP, split=True, state=state
    ).overlays
    by_target = {ov.target: ov for ov in overlays}
    assert overlays[0] == Overlay("/", (state.skeleton,), state.upper(0), state.work(0))
    # Fresh instances or tmpfs, never the host's.
    for fresh in ("/proc", "/sys", "/dev", "/run"):
        assert fresh not in by_target
    assert by_target["/etc"].lowers == ("/etc",)
    assert by_target["/tmp"].lowers == ("/tmp",)
    assert by_target["/usr"].lowers == ("/usr",)
    # /home has a submount: it cannot be a lower layer in a user namespace; the submount can.
    assert "/home" not in by_target
    assert by_target["/home/alice"].lowers == ("/home/alice",)
    # /var is a top-level directory *and* a mount: one overlay, not two.
    assert [ov.target for ov in overlays].count("/var") == 1
    assert [ov.upper for ov in overlays] == [state.upper(i) for i in range(len(overlays))]
    assert len({ov.work for ov in overlays}) == len(overlays)


def test_a_top_level_directory_with_a_pseudo_fs_submount_is_not_a_split_lower(
    state: StatePaths,
) -> None:
    # /mnt/tools is a tmpfs: not data, but it still locks /mnt as a lower layer rootless.
    overlays = plan_overlays(
        (),
        True,
        [],
        (*HOST_TOP, ("mnt", "dir", None)),
        split=True,
        state=state,
        host_mount_points=["/", "/proc", "/mnt/tools"],
    ).overlays
    targets = [ov.target for ov in overlays]
    assert "/mnt" not in targets and "/mnt/tools" not in targets
    assert "/etc" in targets


def test_split_layers_of_an_image_on_the_host_stack_per_directory(
    state: StatePaths, tmp_path: Path
) -> None:
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    overlays = plan_overlays((str(layer),), True, [], HOST_TOP, split=True, state=state).overlays
    by_target = {ov.target: ov for ov in overlays}
    assert by_target["/"].lowers == (str(layer), state.skeleton)
    assert by_target["/etc"].lowers == (f"{layer}/etc", "/etc")
    assert by_target["/usr"].lowers == ("/usr",)  # the layer has no /usr


def test_rootless_mounts_a_split_overlay_target_only_after_creating_it(
    state: StatePaths,
) -> None:
    ops = plan(host_spec(), state, rootless=True)
    r = state.rootfs
    assert ops[0] == Mount(None, "/", None, MS_REC | MS_PRIVATE)
    assert index(ops, lambda op: op == Mkdir(r + "/etc")) < index(
        ops, is_mount("overlay", r + "/etc")
    )
    assert index(ops, is_mount("overlay", r)) < index(ops, is_mount("overlay", r + "/etc"))


# --- the host mount table -------------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=1k
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
28 27 0:25 / /mnt/tools ro,nosuid - tmpfs none ro,size=4k
40 27 254:1 / /home rw,relatime shared:2 master:3 - ext4 /dev/vdb rw
41 27 254:2 /exports /srv/my\\040data rw - xfs /dev/vdc rw
42 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
43 27 254:3 / /var/lib/docker rw - ext4 /dev/vdd rw
46 27 254:5 / /run/media/usb rw - vfat /dev/sda1 rw
44 27 0:40 / /var/lib/docker tmpfs - tmpfs tmpfs rw
45 24 254:4 / /dev/disk-ish rw - ext4 /dev/vde rw
a line without the separator
"""


def test_parse_mountinfo_reads_targets_and_types() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[0] == HostMount("/proc", "proc")
    assert HostMount("/home", "ext4") in mounts  # optional fields (shared:, master:) skipped
    assert HostMount("/srv/my data", "xfs") in mounts  # octal escape of a space
    assert len(mounts) == 12


def test_parse_mountinfo_unescapes_tab_and_backslash() -> None:
    text = "50 27 8:1 / /a\\011b\\134c rw - ext4 /dev/x rw\n"
    assert parse_mountinfo(text) == [HostMount("/a\tb\\c", "ext4")]


def test_data_mounts_keep_only_data_below_root() -> None:
    # Not /: the root layer; not tmpfs/proc/cgroup; nothing below /proc, /sys, /dev or the
    # fresh /run; /var/lib/docker is covered by a later tmpfs.
    assert data_mounts(parse_mountinfo(MOUNTINFO)) == ["/home", "/srv/my data"]


def test_data_mounts_are_sorted_parents_first() -> None:
    mounts = [HostMount("/z", "ext4"), HostMount("/a/b", "xfs"), HostMount("/a", "ext4")]
    assert data_mounts(mounts) == ["/a", "/a/b", "/z"]


def test_a_later_data_mount_on_the_same_point_wins() -> None:
    # Covered by a tmpfs -> hidden; a tmpfs covered by a disk -> shown.
    assert data_mounts([HostMount("/x", "ext4"), HostMount("/x", "tmpfs")]) == []
    assert data_mounts([HostMount("/x", "tmpfs"), HostMount("/x", "ext4")]) == ["/x"]


# --- apply, through the recording fake -------------------------------------------------------


def test_apply_runs_a_whole_plan_in_order(state: StatePaths, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "file").write_text("f")
    spec = host_spec(
        binds=(BindMount(str(src), "/data"), BindMount(str(tmp_path / "file"), "/etc/f", True)),
        tmpfs=(TmpfsMount("/scratch"),),
        read_only=True,
    )
    ops = plan(spec, state, data=("/srv",))
    fake = FakeSyscalls()
    apply(ops, fake)
    r = state.rootfs

    assert fake.calls[0] == Call("mount", (None, "/", None, MS_REC | MS_PRIVATE, None))
    pivot = [
        Call("chdir", (r,)),
        Call("pivot_root", (".", ".")),
        Call("umount2", (".", MNT_DETACH)),
        Call("chdir", ("/",)),
    ]
    at = fake.calls.index(pivot[0])
    assert fake.calls[at : at + 4] == pivot
    remounts = fake.calls[at + 4 :]
    assert remounts and {c.args[1] for c in remounts} >= {"/", "/srv"}
    for c in remounts:
        assert c.name == "mount" and c.args[0] is None and isinstance(c.args[3], int)
        assert c.args[3] & (MS_BIND | MS_REMOUNT | MS_RDONLY) == MS_BIND | MS_REMOUNT | MS_RDONLY
    # The end state: pivoted into the rootfs, old root gone, root read-only.
    assert fake.root == r and fake.cwd == r and not fake.old_root_attached
    assert fake.mounts_at(r)[-1].readonly
    assert fake.mounts_at(r + "/srv")[-1].readonly
    assert fake.mounts_at(r + "/etc/f")[-1].readonly
    assert not fake.mounts_at(r + "/data")[-1].readonly
    assert fake.mounts_at(r + "/srv")[0].fstype == "overlay"
    assert r + "/dev/null" in fake.files and r + "/data" in fake.dirs
    assert fake.links[r + "/dev/fd"] == "/proc/self/fd"


def test_apply_rootless_plan_works_through_the_fake(state: StatePaths) -> None:
    fake = FakeSyscalls()
    apply(plan(host_spec(), state, rootless=True), fake)
    overlays = [c for c in fake.mount_calls() if c.args[2] == "overlay"]
    assert overlays and all(str(c.args[4]).endswith(",userxattr") for c in overlays)
    assert fake.root == state.rootfs


def test_apply_stops_at_the_first_error_and_names_the_step(state: StatePaths) -> None:
    fake = FakeSyscalls()
    proc = state.rootfs + "/proc"
    fake.fail("mount", proc, errno.EPERM)
    with pytest.raises(OSError) as info:
        apply(plan(host_spec(), state), fake)
    assert info.value.errno == errno.EPERM
    assert "Mount proc proc on " + proc in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert fake.calls[-1] == Call(
        "mount", ("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    )


def test_apply_masks_a_file_with_dev_null_and_a_directory_with_tmpfs(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "kcore").write_text("")
    (tmp_path / "firmware").mkdir()
    fake = FakeSyscalls()
    r = str(tmp_path)
    apply([MaskPath(r + "/proc/kcore"), MaskPath(r + "/firmware"), MaskPath(r + "/missing")], fake)
    assert fake.calls == [
        Call("mount", ("/dev/null", r + "/proc/kcore", None, MS_BIND, None)),
        Call("mount", ("tmpfs", r + "/firmware", "tmpfs", MS_RDONLY, None)),
    ]


def test_apply_masks_a_known_kind_without_looking(tmp_path: Path) -> None:
    fake = FakeSyscalls()
    r = str(tmp_path)  # neither path exists: only the plan's word decides
    apply([MaskPath(r + "/proc/acpi", True), MaskPath(r + "/proc/kcore", False)], fake)
    assert fake.calls == [
        Call("mount", ("tmpfs", r + "/proc/acpi", "tmpfs", MS_RDONLY, None)),
        Call("mount", ("/dev/null", r + "/proc/kcore", None, MS_BIND, None)),
    ]


def test_apply_read_only_remount_keeps_the_flags_the_plan_gives(tmp_path: Path) -> None:
    fake = FakeSyscalls()
    p = str(tmp_path)
    apply([RemountReadOnly(p, bind_first=True, flags=MS_NOSUID | MS_NODEV)], fake)
    remount = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    assert fake.calls[1:] == [Call("mount", (None, p, None, remount, None))]


def test_apply_read_only_remount_binds_first_and_skips_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "sys").mkdir()
    fake = FakeSyscalls()
    p = str(tmp_path / "sys")
    apply(
        [RemountReadOnly(p, bind_first=True), RemountReadOnly(str(tmp_path / "gone"), True)], fake
    )
    gone = str(tmp_path / "gone")
    assert fake.calls[0] == Call("mount", (p, p, None, MS_BIND | MS_REC, None))
    # The missing path's bind fails with ENOENT (one syscall instead of a check first); no remount.
    assert fake.calls[2:] == [Call("mount", (gone, gone, None, MS_BIND | MS_REC, None))]
    flags = fake.calls[1].args[3]
    assert isinstance(flags, int)
    assert flags & (MS_BIND | MS_REMOUNT | MS_RDONLY) == MS_BIND | MS_REMOUNT | MS_RDONLY
    assert fake.mounts_at(p)[-1].readonly


def test_apply_creates_a_mount_point_like_its_source(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    fake = FakeSyscalls()
    apply(
        [
            MountPoint("/c/a", str(tmp_path / "dir")),
            MountPoint("/c/b", str(tmp_path / "file")),
            Symlink("b", "/c/link"),
        ],
        fake,
    )
    assert fake.calls == [
        Call("mkdir", ("/c/a", 0o755)),
        Call("touch", ("/c/b",)),
        Call("symlink", ("b", "/c/link")),
    ]
    assert "/c/a" in fake.dirs and "/c/b" in fake.files and fake.links == {"/c/link": "b"}


# --- the fake itself refuses what the kernel refuses ------------------------------------------


def test_the_fake_refuses_a_mount_before_its_target_exists(tmp_path: Path) -> None:
    target = str(tmp_path / "not-yet")
    with pytest.raises(OSError, match="not-yet") as info:
        apply([Mount("proc", target, "proc")], FakeSyscalls())
    assert info.value.errno == errno.ENOENT
    apply([Mkdir(target), Mount("proc", target, "proc")], FakeSyscalls())


def test_the_fake_refuses_pivot_and_remount_on_a_non_mount_point(tmp_path: Path) -> None:
    fake = FakeSyscalls()
    with pytest.raises(OSError) as info:
        apply([PivotRoot(str(tmp_path))], fake)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        apply([RemountReadOnly(str(tmp_path))], FakeSyscalls())
    assert info.value.errno == errno.EINVAL


def test_the_fake_resolves_paths_below_the_new_root_after_pivot(tmp_path: Path) -> None:
    fake = FakeSyscalls()
    root = str(tmp_path / "root")
    apply([Mkdir(root), Mount("tmpfs", root, "tmpfs"), PivotRoot(root), Mkdir("/inside")], fake)
    assert root + "/inside" in fake.dirs
    assert "/inside" not in fake.dirs


# --- split_for_prepare: what a helper does ahead, what the PID 1 does inside -----------------


def test_a_prepared_plan_leaves_proc_to_the_pid_1_in_container_paths(state: StatePaths) -> None:
    ops = plan(host_spec(), state)
    split = split_for_prepare(ops, state)
    assert split is not None
    ahead, inside = split
    assert inside[0] == Mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    assert all(
        (op.target if isinstance(op, Mount) else op.path).startswith("/proc")  # type: ignore[union-attr]
        for op in inside
    )
    assert {type(op) for op in inside[1:]} == {MaskPath, RemountReadOnly}
    # Everything else stays, in order; pivot_root is the helper's, /sys masks too.
    assert [op for op in ops if op in ahead] == ahead
    assert len(ahead) + len(inside) == len(ops)
    assert isinstance(ahead[-1], PivotRoot)
    assert any(isinstance(op, MaskPath) and op.path.endswith("/sys/firmware") for op in ahead)
    assert not any(isinstance(op, Mount) and op.fstype == "proc" for op in ahead)


def test_a_prepared_plan_moves_every_proc_step_and_nothing_else(state: StatePaths) -> None:
    ops = plan(host_spec(read_only=True), state)
    split = split_for_prepare(ops, state)
    assert split is not None
    proc = state.rootfs + "/proc"

    def where(op: Op) -> str:
        return op.target if isinstance(op, Mount) else getattr(op, "path", "")

    moved = [op for op in ops if where(op).startswith(proc) and not isinstance(op, Mkdir)]
    assert [(type(op), where(op)[len(state.rootfs) :]) for op in moved] == [
        (type(op), where(op)) for op in split[1]
    ]
    # The read-only remount of the root, after pivot_root, stays with the helper.
    assert isinstance(split[0][-1], RemountReadOnly) and split[0][-1].path == "/"


def test_a_users_mount_on_proc_is_not_prepared(state: StatePaths, tmp_path: Path) -> None:
    spec = host_spec(binds=(BindMount(str(tmp_path), "/proc/mine"),))
    assert split_for_prepare(plan(spec, state), state) is None
