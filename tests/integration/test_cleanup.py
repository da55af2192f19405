"""Nothing outlives a container: not after a crash, a kill, or the death of the caller itself.

Processes are found by a unique ``sleep`` duration in their command line, so a check sees
exactly this test's processes, whoever their parent is now.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import runtime
from runtime.engine import Engine
from runtime.errors import SetupError
from runtime.spec import BindMount, ContainerSpec
from tests.integration.conftest import HOST, LeakCheck

pytestmark = [pytest.mark.needs_overlay, pytest.mark.rootless]


def new_marker() -> str:
    """A ``sleep`` argument no other process has: 100 seconds and a unique fraction."""
    return f"100.{secrets.randbelow(10**9):09d}"


def processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv:
            found.append(int(name))
    return found


def wait_until_gone(marker: str, timeout: float = 2.0) -> list[int]:
    """Poll until no process carries ``marker``; return what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def wait_until_present(marker: str, count: int = 1, timeout: float = 2.0) -> list[int]:
    """Poll until ``count`` processes carry ``marker``; return those found."""
    deadline = time.monotonic() + timeout
    while len(found := processes_with(marker)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def test_nothing_survives_a_crash_of_the_workload(engine: Engine) -> None:
    marker = new_marker()
    spec = ContainerSpec(
        HOST, argv=("sh", "-c", f"sleep {marker} & sleep {marker} & kill -SEGV $$")
    )
    status = engine.run(spec)
    assert status.signal == signal.SIGSEGV
    assert wait_until_gone(marker) == []


def test_nothing_survives_a_kill_of_the_container(engine: Engine) -> None:
    marker = new_marker()
    with engine.create(
        ContainerSpec(HOST, argv=("sh", "-c", f"sleep {marker} & sleep {marker}"))
    ) as c:
        c.start()
        assert len(wait_until_present(marker, 2)) == 2
        c.kill()
        assert c.wait().signal == signal.SIGKILL
        assert wait_until_gone(marker) == []
        state_dir = c.state_dir
        assert state_dir.is_dir()
    assert not state_dir.exists()


def test_sigterm_is_forwarded_to_the_workload(engine: Engine) -> None:
    marker = new_marker()
    with engine.create(ContainerSpec(HOST, argv=("sleep", marker))) as c:
        c.start()
        assert wait_until_present(marker)
        c.kill(signal.SIGTERM)
        assert c.wait(timeout=5).signal == signal.SIGTERM
    assert wait_until_gone(marker) == []


def test_removing_a_running_container_kills_it_and_its_execs(engine: Engine) -> None:
    marker = new_marker()
    c = engine.create(ContainerSpec(HOST, argv=("sleep", marker)))
    c.start()
    helper = c.spawn(["sleep", marker])
    assert len(wait_until_present(marker, 2)) == 2
    c.remove()
    assert wait_until_gone(marker) == []
    assert helper.wait().signal == signal.SIGKILL
    assert not c.state_dir.exists()
    c.remove()  # idempotent


def test_a_failed_setup_leaves_nothing_behind(engine: Engine, tmp_path: Path) -> None:
    spec = ContainerSpec(
        HOST, argv=("true",), binds=(BindMount(str(tmp_path / "missing"), "/data"),)
    )
    for _ in range(3):
        with pytest.raises(SetupError):
            engine.run(spec)
    assert os.listdir(engine.state_root) == []


def test_files_of_another_user_inside_are_removed_with_the_container(engine: Engine) -> None:
    # Rootless, what "nobody" writes belongs to a subordinate id the caller cannot delete
    # directly; the state directory must still go (the leak check looks too).
    with engine.create(ContainerSpec(HOST)) as c:
        c.start()
        assert c.exec(["sh", "-c", "mkdir /tmp/shared && chmod 777 /tmp/shared"]).code == 0
        made = c.exec(
            [
                "sh",
                "-c",
                "mkdir -p /tmp/shared/sub && echo x > /tmp/shared/sub/f && chmod 500 /tmp/shared/sub",
            ],
            user="nobody",
        )
        assert made.code == 0
        subs = [Path(d) / "sub" for d, dirs, _ in os.walk(c.state_dir / "upper") if "sub" in dirs]
        assert len(subs) == 1
        if os.geteuid() != 0:
            assert subs[0].stat().st_uid != os.geteuid()  # a subordinate id, not ours
    assert not c.state_dir.exists()


_CALLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from runtime import ContainerSpec, Engine, Rootfs

    engine = Engine(state_root=Path(sys.argv[1]))
    c = engine.create(ContainerSpec(Rootfs(host=True), argv=("sleep", sys.argv[2])))
    c.start()
    print(c.state_dir, flush=True)
    time.sleep(100)
    """
)


def test_nothing_survives_a_sigkill_of_the_caller(
    tmp_path: Path, leak_check: LeakCheck, engine: Engine
) -> None:
    # ``engine`` only for its host check and the leak check; the caller is another process.
    marker = new_marker()
    root = tmp_path / "caller" / "containers"
    leak_check.watch(root)
    env = dict(os.environ)
    source = str(Path(runtime.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    with (tmp_path / "caller.err").open("w+b") as err:
        caller = subprocess.Popen(
            [sys.executable, "-c", _CALLER, str(root), marker],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
        assert caller.stdout is not None
        with caller.stdout:
            line = ""
            try:
                ready, _, _ = select.select([caller.stdout], [], [], 20)
                line = caller.stdout.readline().decode().strip() if ready else ""
            finally:
                if not line:
                    caller.kill()
            if not line:
                caller.wait()
                err.seek(0)
                pytest.fail(f"the caller did not start a container:\n{err.read().decode()}")
            state_dir = Path(line)
            assert state_dir.parent == root and state_dir.is_dir()
            assert wait_until_present(marker), "the container's sleep never showed up"
            caller.kill()
            caller.wait()

    assert wait_until_gone(marker) == [], "a container process outlived its SIGKILLed caller"
    leak_check.reap_adopted()  # its stage processes were re-parented here before they died
    # The caller could not clean up: its state directory is still there, unlocked...
    assert state_dir.is_dir()
    # ...until the next engine on that root sweeps it on its first create.
    with Engine(state_root=root).create(ContainerSpec(HOST, argv=("true",))) as c:
        assert not state_dir.exists()
        assert os.listdir(root) == [c.id]
    assert os.listdir(root) == []


def test_the_leak_check_itself_catches_leaks(tmp_path: Path) -> None:
    check = LeakCheck(grace=0.1)
    marker = new_marker()
    child = subprocess.Popen(["sleep", marker])
    fd = os.open(os.devnull, os.O_RDONLY)
    (tmp_path / "root" / "left-over").mkdir(parents=True)
    check.watch(tmp_path / "root")
    try:
        problems = check.problems()
    finally:
        os.close(fd)
        child.kill()
        child.wait()
    text = "\n".join(problems)
    assert f"child processes left: {child.pid}" in text and marker in text
    assert f"{fd}: '{os.devnull}'" in text
    assert "left-over" in text
    assert len(problems) == 3


def test_retired_containers_are_reaped_in_batches_and_all_at_close(engine: Engine) -> None:
    retired = []
    for _ in range(3):
        c = engine.create(ContainerSpec(HOST, argv=("true",)))
        proc = c.start()
        c.retire()  # it ends by itself; the engine reaps it and removes its state later
        retired.append(c.state_dir)
        # Ended (a pidfd is readable then), not yet reaped.
        assert select.select([proc.fileno_for_wait()], [], [], 10)[0]
    engine.collect(batch=4)  # fewer than a batch wait: nothing is done yet
    assert all(d.exists() for d in retired)
    engine.collect(batch=3)
    assert not any(d.exists() for d in retired)
    for _ in range(2):
        c = engine.create(ContainerSpec(HOST, argv=("true",)))
        c.start()
        c.retire()
    engine.close()  # the leak check: none of their processes or state directories is left
