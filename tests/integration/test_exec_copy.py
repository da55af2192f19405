"""``exec`` into a running container and ``copy_in`` / ``copy_out``, like docker's."""

from __future__ import annotations

import errno
import os
import secrets
import signal
from pathlib import Path

import pytest

from runtime.engine import Container, Engine
from runtime.errors import ContainerError, ContainerStateError, ExecError
from runtime.spec import ContainerSpec
from tests.integration.conftest import HOST

pytestmark = [pytest.mark.needs_overlay, pytest.mark.rootless]


def out(c: Container, *argv: str, **kw: object) -> str:
    result = c.exec_capture(list(argv), **kw)  # type: ignore[arg-type]
    assert result.exit_code == 0, f"{argv} -> {result}"
    return result.stdout


def _start_time(stat: str) -> str:
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


# --- exec -------------------------------------------------------------------------------------


def test_exec_shares_the_containers_hostname_filesystem_and_pids(running: Container) -> None:
    assert out(running, "hostname") == "exec-box\n"
    out(running, "sh", "-c", "echo from-first > /tmp/shared")
    assert out(running, "cat", "/tmp/shared") == "from-first\n"
    # PID 1 is the container's own init (same start time as seen from the host), and only a
    # handful of processes exist: the init, the exec helper, the shell and ls.
    listing = out(running, "sh", "-c", "echo $$; ls /proc").split()
    pids = sorted(int(x) for x in listing[1:] if x.isdigit())
    assert pids[0] == 1 and int(listing[0]) in pids
    assert len(pids) <= 5, pids
    assert running.process is not None and running.process.init_pid is not None
    host_view = Path(f"/proc/{running.process.init_pid}/stat").read_text()
    assert _start_time(out(running, "cat", "/proc/1/stat")) == _start_time(host_view)
    assert out(running, "ls", "/sys/class/net") == "lo\n"


def test_exec_does_not_touch_the_hosts_files(running: Container) -> None:
    name = f"/tmp/isolate-exec-{secrets.token_hex(4)}"
    out(running, "sh", "-c", f"echo x > {name}")
    assert not os.path.exists(name)


def test_exec_reports_exit_codes_and_signals(running: Container) -> None:
    assert running.exec(["sh", "-c", "exit 7"]).code == 7
    status = running.exec(["sh", "-c", "kill -TERM $$"])
    assert (status.code, status.signal) == (None, signal.SIGTERM)


def test_exec_takes_input_env_cwd_and_user(
    running: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLATE_CANARY", "leaked")
    assert out(running, "cat", input=b"piped in") == "piped in"
    assert out(running, "pwd", cwd="/var") == "/var\n"
    assert out(running, "id", "-u", user="nobody") == "65534\n"
    env = dict(line.split("=", 1) for line in out(running, "env", env={"X": "1"}).splitlines())
    assert env.pop("X") == "1"
    assert env.pop("HOSTNAME") == "exec-box" and env.pop("HOME") == "/root"
    assert set(env) == {"PATH"}


def test_exec_separates_stdout_and_stderr(running: Container) -> None:
    result = running.exec_capture(["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 4)


def test_exec_has_the_containers_privileges(running: Container) -> None:
    status = out(running, "cat", "/proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapBnd"], 16) == 0xA00425FB  # docker's default set without MKNOD


def test_exec_does_not_inherit_the_callers_fds(running: Container) -> None:
    fd = os.open("/etc/hostname", os.O_RDONLY)
    try:
        os.dup2(fd, 43, inheritable=True)
        assert sorted(int(x) for x in out(running, "ls", "/proc/self/fd").split()) == [0, 1, 2, 3]
    finally:
        os.close(43)
        os.close(fd)


def test_exec_of_a_missing_program_is_an_exec_error(running: Container) -> None:
    with pytest.raises(ExecError) as info:
        running.exec(["no-such-program-xyz"])
    assert info.value.argv0 == "no-such-program-xyz"
    assert info.value.errno == errno.ENOENT
    # The container is still usable.
    assert out(running, "true") == ""


def test_exec_into_a_container_that_is_not_running(engine: Engine) -> None:
    with engine.create(ContainerSpec(HOST)) as c:
        with pytest.raises(ContainerStateError):
            c.exec(["true"])  # never started
        c.start()
        c.kill()
        c.wait()
        with pytest.raises(ContainerStateError):
            c.exec(["true"])


# --- copy -------------------------------------------------------------------------------------


def test_copy_in_a_file(running: Container, tmp_path: Path) -> None:
    src = tmp_path / "data.txt"
    src.write_text("payload\n")
    running.copy_in(src, "/tmp/in.txt")
    running.copy_in(src, "/opt/")
    assert out(running, "cat", "/tmp/in.txt", "/opt/data.txt") == "payload\n" * 2
    # Owned by the container's root, as with docker cp.
    assert out(running, "stat", "-c", "%u:%g", "/tmp/in.txt") == "0:0\n"


def test_copy_in_a_directory(running: Container, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a").write_text("A")
    (tree / "sub" / "b").write_text("B")
    (tree / "link").symlink_to("sub/b")
    os.chmod(tree / "a", 0o750)
    running.copy_in(tree, "/srv/copied")
    listing = out(running, "sh", "-c", "cd /srv/copied && find . | sort && cat a sub/b link")
    assert listing.splitlines() == [".", "./a", "./link", "./sub", "./sub/b", "ABB"]
    assert out(running, "stat", "-c", "%a", "/srv/copied/a") == "750\n"
    assert out(running, "readlink", "/srv/copied/link") == "sub/b\n"


def test_copy_in_lands_inside_the_container_even_through_a_symlink(
    running: Container, tmp_path: Path
) -> None:
    # The container points /tmp/exit at /etc: the copy follows it *inside* the container.
    name = f"isolate-copy-{secrets.token_hex(4)}"
    src = tmp_path / name
    src.write_text("inside\n")
    out(running, "ln", "-s", "/etc", "/tmp/exit")
    running.copy_in(src, f"/tmp/exit/{name}")
    assert out(running, "cat", f"/etc/{name}") == "inside\n"
    assert not os.path.exists(f"/etc/{name}")


def test_copy_out_a_file(running: Container, tmp_path: Path) -> None:
    out(running, "sh", "-c", "printf 'made inside\\n' > /tmp/result.txt")
    running.copy_out("/tmp/result.txt", tmp_path / "result.txt")
    assert (tmp_path / "result.txt").read_text() == "made inside\n"
    (tmp_path / "into").mkdir()
    running.copy_out("/tmp/result.txt", tmp_path / "into")
    assert (tmp_path / "into" / "result.txt").read_text() == "made inside\n"


def test_copy_out_a_directory(running: Container, tmp_path: Path) -> None:
    out(
        running,
        "sh",
        "-c",
        "mkdir -p /work/out/sub && echo 1 > /work/out/one && echo 2 > /work/out/sub/two",
    )
    running.copy_out("/work/out", tmp_path / "got")
    assert (tmp_path / "got" / "one").read_text() == "1\n"
    assert (tmp_path / "got" / "sub" / "two").read_text() == "2\n"
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == ["one", "sub"]


def test_copy_out_keeps_a_symlink_as_a_link_and_does_not_follow_it(
    running: Container, tmp_path: Path
) -> None:
    out(running, "sh", "-c", "mkdir /tmp/d && ln -s /etc/passwd /tmp/d/pw")
    running.copy_out("/tmp/d", tmp_path / "d")
    link = tmp_path / "d" / "pw"
    assert link.is_symlink() and os.readlink(link) == "/etc/passwd"


def test_copy_out_of_a_missing_path_fails(running: Container, tmp_path: Path) -> None:
    with pytest.raises(ContainerError):
        running.copy_out("/no/such/thing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_copy_round_trip(running: Container, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    (tmp_path / "blob").write_bytes(data)
    running.copy_in(tmp_path / "blob", "/tmp/blob")
    running.copy_out("/tmp/blob", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
