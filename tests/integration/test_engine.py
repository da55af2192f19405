"""Real containers on the host image: what a workload sees, and how its end is reported.

Tests marked ``rootless`` also run as an unprivileged user (tests/integration/test_rootless.py),
so they assume nothing about being root on the host: inside, the workload is root either way.
"""

from __future__ import annotations

import errno
import os
import pickle
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from runtime import idmap
from runtime.engine import Engine
from runtime.errors import CallableError, ExecError, SetupError
from runtime.process import DEFAULT_CAPS, cap_mask
from runtime.rootfs import MASKED_PATHS
from runtime.spec import DEFAULT_PATH, BindMount, ContainerSpec, Rootfs, TmpfsMount
from tests.integration.conftest import HOST, Run
from tests.integration.test_build import BUSYBOX, needs_busybox

pytestmark = pytest.mark.needs_overlay


def _status_field(text: str, name: str) -> str:
    return next(
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name)
    )


# --- running and ending -----------------------------------------------------------------------


@pytest.mark.rootless
def test_echo_hello_world(run: Run) -> None:
    ran = run("echo", "hello world")
    assert ran.out == "hello world\n"
    assert ran.status.code == 0 and ran.status.signal is None


@pytest.mark.rootless
@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_codes_are_reported_exactly(run: Run, code: int) -> None:
    ran = run("sh", "-c", f"exit {code}")
    assert (ran.status.code, ran.status.signal) == (code, None)
    assert ran.status.exit_code == code


@pytest.mark.rootless
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_is_reported_as_that_signal(run: Run, sig: signal.Signals) -> None:
    ran = run("sh", "-c", f"kill -{sig.name.removeprefix('SIG')} $$")
    assert (ran.status.code, ran.status.signal) == (None, sig)
    assert ran.status.exit_code == 128 + sig
    assert str(ran.status) == f"killed by {sig.name}"


# --- namespaces -------------------------------------------------------------------------------


@pytest.mark.rootless
def test_the_workload_sees_only_its_own_processes(run: Run) -> None:
    # PID 1 is the container's init, the shell is 2, ls is 3; no host process is visible.
    ran = run("sh", "-c", "echo $$; ls /proc")
    lines = ran.out.split()
    pids = sorted(int(x) for x in lines[1:] if x.isdigit())
    assert lines[0] == "2"
    assert pids == [1, 2, 3]


@pytest.mark.rootless
def test_without_init_the_workload_is_pid_1(run: Run) -> None:
    ran = run("sh", "-c", "echo $$; ps -e -o pid=,comm=", init=False)
    shell_pid, *table = ran.out.split()
    assert shell_pid == "1"
    assert dict(zip(table[1::2], table[0::2], strict=True)) == {"sh": "1", "ps": table[2]}


@pytest.mark.rootless
def test_the_container_has_its_own_hostname(run: Run) -> None:
    host_name = socket.gethostname()
    ran = run("sh", "-c", "hostname; cat /etc/hostname; grep -c box-7 /etc/hosts", hostname="box-7")
    assert ran.out.split() == ["box-7", "box-7", "1"]
    assert socket.gethostname() == host_name


@pytest.mark.rootless
def test_only_loopback_exists_and_it_is_up(run: Run) -> None:
    ran = run("sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/flags; cat /proc/net/dev")
    lines = ran.out.splitlines()
    assert lines[0] == "lo"
    assert int(lines[1], 16) & 0x1, "lo is not up"
    devices = [line.split(":")[0].strip() for line in lines[2:] if ":" in line]
    assert devices == ["lo"]


@pytest.mark.rootless
def test_env_is_exactly_the_specs_plus_what_docker_sets(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLATE_CANARY", "leaked")
    ran = run("env", hostname="envbox", env={"FOO": "bar", "PATH": DEFAULT_PATH})
    env = dict(line.split("=", 1) for line in ran.out.splitlines())
    assert env == {"PATH": DEFAULT_PATH, "HOSTNAME": "envbox", "HOME": "/root", "FOO": "bar"}


@pytest.mark.rootless
def test_working_directory_is_set_and_created(run: Run) -> None:
    assert run("pwd", cwd="/var").out == "/var\n"
    assert run("pwd", cwd="/made/for/the/test").out == "/made/for/the/test\n"


@pytest.mark.rootless
@pytest.mark.parametrize("user", ["nobody", "65534:65534"])
def test_the_workload_runs_as_the_given_user(run: Run, user: str) -> None:
    ran = run("sh", "-c", 'id -u; id -g; id -G; echo "$HOME"', user=user)
    assert ran.out.split() == ["65534", "65534", "65534", "/nonexistent"]


@pytest.mark.rootless
def test_an_unknown_user_fails_setup_at_the_user_stage(engine: Engine) -> None:
    with pytest.raises(SetupError, match="ghost") as info:
        engine.run(ContainerSpec(HOST, argv=("true",), user="ghost"))
    assert info.value.stage == "user"


@pytest.mark.rootless
def test_a_start_that_does_not_wait_raises_the_setup_error_when_waited_for(
    engine: Engine,
) -> None:
    # start(wait=False) returns after the fork (the pytest plugin starts the next test's
    # container so, while a test runs); the setup error comes with wait_ready, which leaves
    # the failed container reaped.
    container = engine.create(ContainerSpec(HOST, argv=("true",), user="ghost"))
    try:
        proc = container.start(wait=False)
        with pytest.raises(SetupError, match="ghost") as info:
            proc.wait_ready()
        assert info.value.stage == "user"
        assert proc.returncode is not None
    finally:
        container.remove()


# --- privileges -------------------------------------------------------------------------------


@pytest.mark.rootless
def test_an_engines_containers_share_one_user_namespace_with_the_hosts_map(
    engine: Engine,
) -> None:
    # The maps are written once per engine (rootless: newuidmap/newgidmap run once, not per
    # container), as rootless podman does; each container keeps its other namespaces. Both
    # run at once: the kernel reuses a freed namespace's number.
    script = (
        "readlink /proc/self/ns/user /proc/self/ns/mnt /proc/self/ns/net; cat /proc/self/uid_map"
    )
    spec = ContainerSpec(HOST, userns=True)  # no argv: an idle PID 1, for exec
    with engine.create(spec) as a, engine.create(spec) as b:
        a.start()
        b.start()
        first, second = (
            a.exec_capture(["/bin/sh", "-c", script]),
            b.exec_capture(["/bin/sh", "-c", script]),
        )
    assert first.exit_code == 0 and second.exit_code == 0, first.stderr + second.stderr
    user1, mnt1, net1, *map1 = first.stdout.splitlines()
    user2, mnt2, net2, *map2 = second.stdout.splitlines()
    assert user1 == user2 != os.readlink("/proc/self/ns/user")
    assert mnt1 != mnt2 and net1 != net2
    want = [r.split() for r in idmap.map_text(idmap.host_plan().uids).splitlines()]
    assert [line.split() for line in map1] == want == [line.split() for line in map2]


@pytest.mark.rootless
def test_no_new_privs_is_set(run: Run) -> None:
    ran = run("cat", "/proc/self/status")
    assert _status_field(ran.out, "NoNewPrivs") == "1"


@pytest.mark.rootless
def test_capabilities_are_dockers_default_set_without_mknod(run: Run) -> None:
    ran = run("cat", "/proc/self/status")
    default = cap_mask(DEFAULT_CAPS)
    assert default == 0xA00425FB  # docker's 0xA80425FB without MKNOD (bit 27)
    assert int(_status_field(ran.out, "CapBnd"), 16) == default
    assert int(_status_field(ran.out, "CapEff"), 16) == default
    assert int(_status_field(ran.out, "CapInh"), 16) == 0
    assert int(_status_field(ran.out, "CapAmb"), 16) == 0


@pytest.mark.rootless
def test_a_non_root_user_has_no_effective_capabilities(run: Run) -> None:
    ran = run("cat", "/proc/self/status", user="nobody")
    assert int(_status_field(ran.out, "CapEff"), 16) == 0
    assert int(_status_field(ran.out, "CapBnd"), 16) == cap_mask(DEFAULT_CAPS)


@pytest.mark.rootless
def test_masked_paths_hide_kernel_information(engine: Engine) -> None:
    present = [p for p in MASKED_PATHS if os.path.exists(p)]
    if not present:
        pytest.skip("this kernel has none of the masked paths")

    def inspect() -> dict[str, object]:
        seen: dict[str, object] = {}
        for p in present:
            if os.path.isdir(p):
                seen[p] = os.listdir(p)
            else:
                with open(p, "rb") as f:
                    seen[p] = f.read(64)
        return seen

    seen = engine.call(ContainerSpec(HOST), inspect)
    for p in present:
        assert seen[p] in ([], b""), f"{p} is not masked: {seen[p]!r}"
    if "/proc/kcore" in present:
        assert seen["/proc/kcore"] == b""


@pytest.mark.rootless
def test_proc_sys_is_read_only(engine: Engine) -> None:
    def write() -> int:
        # The domain name is per UTS namespace: harmless even if the write went through.
        try:
            with open("/proc/sys/kernel/domainname", "w") as f:
                f.write("isolated\n")
        except OSError as e:
            return e.errno or 0
        return 0

    assert engine.call(ContainerSpec(HOST), write) == errno.EROFS


# --- filesystems ------------------------------------------------------------------------------


@pytest.mark.needs_root
def test_writes_to_host_files_stay_in_the_container_as_root(run: Run) -> None:
    name = f"/etc/isolate-test-{secrets.token_hex(4)}"
    Path(name).write_text("host\n")
    try:
        ran = run("sh", "-c", f"echo container >> {name} && cat {name} && echo new > {name}.new")
        assert ran.status.code == 0, ran.out
        assert ran.out == "host\ncontainer\n"
        assert Path(name).read_text() == "host\n"
        assert not os.path.exists(f"{name}.new")
    finally:
        os.unlink(name)


@pytest.mark.rootless
def test_host_files_owned_by_host_root_are_not_writable_rootless(engine: Engine) -> None:
    if os.geteuid() == 0:
        pytest.skip("the rootless behaviour: as root the write succeeds, privately")
    before = Path("/etc/passwd").read_bytes()

    def append() -> int:
        try:
            with open("/etc/passwd", "a") as f:
                f.write("intruder:x:0:0::/:/bin/sh\n")
        except OSError as e:
            return e.errno or 0
        return 0

    # Host root is not mapped in the user namespace: the file belongs to "nobody" there.
    err = engine.call(ContainerSpec(HOST), append)
    assert err in (errno.EACCES, errno.EROFS, errno.EOVERFLOW, errno.EPERM)
    assert Path("/etc/passwd").read_bytes() == before


@pytest.mark.rootless
def test_tmp_is_the_hosts_copy_on_write_and_private(run: Run, tmp_path: Path) -> None:
    token = secrets.token_hex(4)
    host_file = Path("/tmp") / f"isolate-test-{token}"
    host_file.write_text("host\n")
    try:
        ran = run(
            "sh",
            "-c",
            f"cat {host_file}; echo container > {host_file}; echo new > {host_file}.new;"
            f" cat {host_file}",
        )
        assert ran.out == "host\ncontainer\n"
        assert host_file.read_text() == "host\n"
        assert not Path(f"{host_file}.new").exists()
        # Nor does a second container see what the first wrote.
        assert run("cat", f"{host_file}.new").status.code != 0
    finally:
        host_file.unlink()


@pytest.mark.rootless
def test_tmp_is_writable_by_any_user(run: Run) -> None:
    name = f"/tmp/isolate-by-nobody-{secrets.token_hex(4)}"
    ran = run("sh", "-c", f"stat -c %a /tmp && echo x > {name} && cat {name}", user="nobody")
    assert ran.out == "1777\nx\n"
    assert not os.path.exists(name)


@pytest.mark.rootless
def test_run_is_a_fresh_empty_tmpfs(run: Run) -> None:
    ran = run("sh", "-c", "ls -A /run; stat -f -c %T /run")
    assert ran.out == "tmpfs\n"


@pytest.mark.rootless
def test_binds_are_read_write_or_read_only(run: Run, tmp_path: Path) -> None:
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "given").write_text("given\n")
    binds = (
        BindMount(str(tmp_path / "rw"), "/data"),
        BindMount(str(tmp_path / "ro"), "/config", readonly=True),
    )
    ran = run(
        "sh",
        "-c",
        "echo out > /data/made && cat /config/given; echo no > /config/made; echo $?",
        binds=binds,
    )
    assert (tmp_path / "rw" / "made").read_text() == "out\n"
    assert ran.out.startswith("given\n")
    assert "Read-only file system" in ran.out and ran.out.endswith("2\n")
    assert sorted(os.listdir(tmp_path / "ro")) == ["given"]


def _busybox_root(where: Path) -> Path:
    (where / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, where / "bin" / "busybox")
    (where / "bin" / "sh").symlink_to("busybox")
    return where


def _out(engine: Engine, root: Path, script: str, **fields: Any) -> str:
    """What ``script`` prints in a container of the root filesystem directory ``root``."""
    spec = ContainerSpec(
        Rootfs(lowers=(str(root),)), argv=("/bin/busybox", "sh", "-c", script), **fields
    )
    with tempfile.TemporaryFile() as out, engine.create(spec) as c:
        c.start(stdio=(None, out.fileno(), out.fileno()))
        assert c.wait().exit_code == 0
        out.seek(0)
        return out.read().decode()


@needs_busybox
@pytest.mark.rootless
def test_symlinks_in_an_image_never_lead_its_mounts_out_of_its_root(
    engine: Engine, tmp_path: Path
) -> None:
    # A hostile image: /etc and a volume's target are absolute links to host directories. The
    # engine resolves mount targets inside the root (as runc does), so it creates nothing there.
    outside, volume = tmp_path / "outside", tmp_path / "volume"
    outside.mkdir()
    volume.mkdir()
    (volume / "given").write_text("given\n")
    root = _busybox_root(tmp_path / "root")
    (root / "etc").symlink_to(outside)
    (root / "data").symlink_to(outside / "data")
    script = "/bin/busybox cat /etc/hostname /data/given"
    out = _out(engine, root, script, hostname="box", binds=(BindMount(str(volume), "/data"),))
    assert out == "box\ngiven\n"
    assert list(outside.iterdir()) == []


@pytest.mark.rootless
def test_a_container_makes_fifos_but_no_device_nodes(run: Run) -> None:
    # No device cgroup limits what a node could open (see process.DEFAULT_CAPS).
    ran = run("sh", "-c", "mkfifo /tmp/f && echo fifo; mknod /dev/f c 10 229 || echo refused")
    assert ran.out.startswith("fifo\n") and ran.out.endswith("refused\n")
    assert "Operation not permitted" in ran.out


@needs_busybox
def test_a_device_node_in_an_image_opens_nothing(engine: Engine, tmp_path: Path) -> None:
    root = _busybox_root(tmp_path / "root")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # as /dev/null
    out = _out(engine, root, "/bin/busybox cat /null 2>&1; echo $?")
    assert "Permission denied" in out and out.endswith("1\n")  # the layers are mounted nodev


@needs_busybox
@pytest.mark.rootless
def test_a_resolv_conf_linked_into_run_gets_its_file_there(engine: Engine, tmp_path: Path) -> None:
    # As on hosts with systemd-resolved: the link's target does not exist in the container.
    root = _busybox_root(tmp_path / "root")
    (root / "etc").mkdir()
    (root / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    out = _out(engine, root, "/bin/busybox cat /etc/resolv.conf")
    assert out == "# network: none\n"


@pytest.mark.rootless
def test_a_bind_of_a_single_file(run: Run, tmp_path: Path) -> None:
    (tmp_path / "settings.ini").write_text("[a]\n")
    ran = run(
        "cat",
        "/etc/app/settings.ini",
        binds=(BindMount(str(tmp_path / "settings.ini"), "/etc/app/settings.ini", True),),
    )
    assert ran.out == "[a]\n"


@pytest.mark.rootless
def test_tmpfs_mounts_are_private_and_take_options(run: Run) -> None:
    ran = run(
        "sh",
        "-c",
        "echo x > /scratch/f && cat /scratch/f && grep ' /scratch ' /proc/mounts",
        tmpfs=(TmpfsMount("/scratch", "size=1m,mode=700"),),
    )
    first, mount = ran.out.splitlines()
    assert first == "x"
    fstype, options = mount.split()[2], mount.split()[3].split(",")
    assert fstype == "tmpfs"
    assert "size=1024k" in options and "mode=700" in options
    assert not os.path.exists("/scratch/f")


@pytest.mark.rootless
def test_a_read_only_root_refuses_writes_everywhere_but_its_tmpfs(run: Run) -> None:
    ran = run(
        "sh",
        "-c",
        "for d in /etc /usr /var /tmp /; do touch $d/isolate-ro; done; echo ok > /scratch/f;"
        " cat /scratch/f",
        read_only=True,
        tmpfs=(TmpfsMount("/scratch"),),
    )
    *errors, last = ran.out.splitlines()
    assert last == "ok"
    assert len(errors) == 5
    assert all("Read-only file system" in line for line in errors), errors


@pytest.mark.rootless
def test_the_callers_inheritable_fds_do_not_leak_in(run: Run) -> None:
    fd = os.open("/etc/hostname", os.O_RDONLY)
    try:
        os.dup2(fd, 42, inheritable=True)
        ran = run("ls", "/proc/self/fd")
        # 0-2, plus the directory ls itself is reading.
        assert sorted(int(x) for x in ran.out.split()) == [0, 1, 2, 3]
    finally:
        os.close(42)
        os.close(fd)


@pytest.mark.rootless
def test_pass_fds_are_kept_open(run: Run) -> None:
    r, w = os.pipe()
    try:
        ran = run("sh", "-c", f"echo through > /proc/self/fd/{w}", pass_fds=(w,))
        assert ran.status.code == 0, ran.out
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"through\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# --- Python callables -------------------------------------------------------------------------


def _compute(a: int, b: int, *, scale: int = 1) -> tuple[int, int, str, int]:
    return a * b * scale, os.getpid(), socket.gethostname(), len(os.listdir("/sys/class/net"))


@pytest.mark.rootless
def test_call_returns_the_value_from_inside(engine: Engine) -> None:
    value, pid, hostname, nics = engine.call(
        ContainerSpec(HOST, hostname="calc"), _compute, 6, 7, scale=2
    )
    assert value == 84
    assert pid == 1 and hostname == "calc" and nics == 1


@pytest.mark.rootless
def test_call_needs_no_picklable_function(engine: Engine) -> None:
    captured = {"n": 5}
    assert engine.call(ContainerSpec(HOST), lambda: captured["n"] + 1) == 6


SAYS_ONCE = """
import sys
from pathlib import Path

from runtime import ContainerSpec, Engine, Rootfs

print("buffered before the fork")  # stdout is a pipe: block-buffered, not yet written
engine = Engine(state_root=Path(sys.argv[1]))
engine.call(ContainerSpec(Rootfs(host=True)), lambda: sys.stdout.flush())
engine.close()
"""


@pytest.mark.rootless
def test_what_the_caller_had_buffered_is_printed_once(tmp_path: Path) -> None:
    # Without launch.flush_stdio() this fails in the rootless run (the line comes out twice),
    # checked; as root the child that inherits the buffer happens not to flush it.
    (tmp_path / "state").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", SAYS_ONCE, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "buffered before the fork\n"


def _fails_inside() -> None:
    raise KeyError("missing thing")


@pytest.mark.rootless
def test_call_reraises_the_exception_with_the_remote_traceback(engine: Engine) -> None:
    with pytest.raises(KeyError, match="missing thing") as info:
        engine.call(ContainerSpec(HOST), _fails_inside)
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1
    assert notes[0].startswith("Remote traceback:")
    assert "_fails_inside" in notes[0] and "KeyError" in notes[0]


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("carries a lambda")
        self.fn = lambda: None


def _raises_unpicklable() -> None:
    raise _Unpicklable()


@pytest.mark.rootless
def test_an_exception_that_cannot_travel_becomes_a_callable_error(engine: Engine) -> None:
    with pytest.raises(CallableError) as info:
        engine.call(ContainerSpec(HOST), _raises_unpicklable)
    assert info.value.type_name == "_Unpicklable"
    assert "carries a lambda" in str(info.value)
    assert "_raises_unpicklable" in info.value.remote_traceback


@pytest.mark.rootless
def test_an_unpicklable_result_is_an_error(engine: Engine) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError), match="pickle"):
        engine.call(ContainerSpec(HOST), lambda: lambda: None)


@pytest.mark.rootless
def test_call_times_out_and_the_container_is_gone(engine: Engine) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        engine.call(ContainerSpec(HOST), time.sleep, 30, timeout=0.3)
    assert time.monotonic() - started < 5
    # The leak check proves nothing is left running.


# --- failures during setup --------------------------------------------------------------------


@pytest.mark.rootless
def test_a_missing_bind_source_fails_at_the_mounts_stage(engine: Engine, tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    spec = ContainerSpec(HOST, argv=("true",), binds=(BindMount(str(missing), "/data"),))
    with pytest.raises(SetupError) as info:
        engine.run(spec)
    assert info.value.stage == "mounts"
    assert info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value)


@pytest.mark.rootless
def test_a_missing_executable_is_an_exec_error(engine: Engine) -> None:
    with pytest.raises(ExecError) as info:
        engine.run(ContainerSpec(HOST, argv=("no-such-program-xyz",)))
    assert info.value.argv0 == "no-such-program-xyz"
    assert info.value.errno == errno.ENOENT
    assert "no-such-program-xyz" in str(info.value)


@pytest.mark.rootless
def test_a_file_that_is_not_executable_is_an_exec_error(engine: Engine) -> None:
    with pytest.raises(ExecError) as info:
        engine.run(ContainerSpec(HOST, argv=("/etc/passwd",)))
    assert info.value.errno == errno.EACCES
