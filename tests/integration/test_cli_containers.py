"""Detached containers through the real command line: ``run -d``, ``ps``, ``exec``, ``diff``,
``commit``, ``stop``, ``logs``, ``rm``...

Most commands run in-process through :func:`pytest_isolate.cli.main` (its output captured at
the file descriptors, where the containers write too: :func:`captured`); a few go through
``python -m pytest_isolate`` as a user would. Either way the supervisors are real processes: while a test
runs this process is a child subreaper (the leak check's), so a supervisor is re-parented here
and the leak check fails the test if one outlives its ``rm``, or if the state root is not empty
at the end.

The image is Debian's static busybox with a few applets, plus two files to change and delete.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from pytest_isolate.cli import main
from runtime.detached.record import read_record
from runtime.engine import Engine
from runtime.errors import ImageError, UnsupportedHostError
from runtime.image.importer import import_rootfs
from runtime.image.store import Store
from tests.integration.conftest import LeakCheck
from tests.integration.test_cli_images import Cli, Result, busybox_tree

EXTRA_APPLETS = ("rm", "ps", "kill", "ls")

LOOP = "i=0; while true; do i=$((i+1)); echo tick $i; echo $i > /tmp/count; sleep 0.05; done"


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with ``bb:1`` (busybox, ``/etc/changeme``, ``/etc/deleteme``) and ``bb:usr1``
    (the same with ``STOPSIGNAL SIGUSR1``)."""
    base = tmp_path_factory.mktemp("containers")
    tree = busybox_tree(base / "tree")
    for applet in EXTRA_APPLETS:
        if not (tree / "bin" / applet).exists():
            os.symlink("busybox", tree / "bin" / applet)
    (tree / "etc" / "changeme").write_text("orig\n")
    (tree / "etc" / "deleteme").write_text("doomed\n")
    tarball = base / "bb.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(tree, arcname=".")
    store = Store(base / "store")
    import_rootfs(store, tarball, "bb:1")
    import_rootfs(store, tarball, "bb:usr1", changes=["STOPSIGNAL SIGUSR1"])
    return store.root


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def env(image_store: Path, state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTEST_ISOLATE_STORE": str(image_store),
        "PYTEST_ISOLATE_STATE": str(state_dir),
    }


@contextlib.contextmanager
def captured() -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """Send fds 1 and 2, and ``sys.stdout``/``sys.stderr``, to two temporary files.

    Written out here rather than with ``capfd``: with ``capfd`` the leak check now and then
    sees one of capfd's own files replaced at the same fd number and reports a leak.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        texts = [open(f.fileno(), "w", closefd=False, buffering=1) for f in (out, err)]  # noqa: SIM115
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            with contextlib.redirect_stdout(texts[0]), contextlib.redirect_stderr(texts[1]):
                yield out, err
        finally:
            for text in texts:
                text.close()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@pytest.fixture
def cli(
    env: dict[str, str],
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    leak_check: LeakCheck,
) -> Iterator[Cli]:
    """``cli(*argv)``: :func:`pytest_isolate.cli.main` in this process, output captured.

    At the end no container may be left: the test removes what it made (anything left is
    removed here, and the test fails).
    """
    try:
        Engine(state_root=state_dir).check_host(userns=os.geteuid() != 0)
    except UnsupportedHostError as e:
        pytest.skip(str(e))
    for name in ("PYTEST_ISOLATE_STORE", "PYTEST_ISOLATE_STATE"):
        monkeypatch.setenv(name, env[name])
    leak_check.watch(state_dir)

    def run(*argv: str) -> Result:
        with captured() as (out, err):
            code = main(list(argv))
            sys.stdout.flush()
            sys.stderr.flush()
            out.seek(0)
            err.seek(0)
            return Result(code, out.read().decode(), err.read().decode())

    yield run
    left = run("ps", "-aq", "--no-trunc").out.split()
    for cid in left:
        run("rm", "-f", cid)
    assert not left, f"containers left by the test: {left}"


def shell(env: dict[str, str], *argv: str, input: str | None = None) -> Result:
    """``python -m pytest_isolate ARGV`` as a separate process."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_isolate", *argv],
        capture_output=True,
        text=True,
        env=env,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        timeout=60,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ps_line(cli: Cli, name: str, *flags: str) -> str | None:
    result = cli("ps", *flags)
    assert result.code == 0, result.err
    header, *rows = result.out.splitlines()
    assert header.split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"]
    return next((r for r in rows if r.split()[-1] == name), None)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Has ``pid`` exited (vanished, or a zombie nobody reaped yet)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- the classic workflow -----------------------------------------------------------------------


@pytest.mark.rootless
def test_run_detached_ps_exec_diff_commit_stop_logs_rm(cli: Cli, state_dir: Path) -> None:
    started = cli("run", "-d", "--name", "web", "bb:1", "sh", "-c", LOOP)
    assert started.code == 0, started.err
    cid = started.out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid)

    line = ps_line(cli, "web")
    assert line is not None
    assert line.split()[:2] == [cid[:12], "bb:1"]
    assert '"sh -c i=0; while tr…"' in line and " Up " in line

    script = "echo added > /f && echo more >> /etc/changeme && rm /etc/deleteme && echo done"
    ran = cli("exec", "web", "sh", "-c", script)
    assert (ran.code, ran.out) == (0, "done\n"), ran.err
    assert cli("exec", cid[:5], "cat", "/tmp/count").code == 0  # a unique id prefix works too

    diff = cli("diff", "web")
    assert diff.code == 0, diff.err
    assert diff.out.splitlines() == [
        "C /etc",
        "C /etc/changeme",
        "D /etc/deleteme",
        "A /f",
        "C /tmp",
        "A /tmp/count",
    ]

    eventually(lambda: "tick 3\n" in cli("logs", "web").out)

    committed = cli("commit", "-c", 'CMD ["cat","/f"]', "-m", "running", "web", "snap:1")
    assert committed.code == 0, committed.err
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", committed.out)
    assert cli("run", "snap:1").out == "added\n"

    before = time.monotonic()
    stopped = cli("stop", "web")
    assert (stopped.code, stopped.out) == (0, "web\n"), stopped.err
    assert time.monotonic() - before < 5  # SIGTERM ended it; no wait for the SIGKILL
    assert ps_line(cli, "web") is None
    line = ps_line(cli, "web", "-a")
    assert line is not None and "Exited (143)" in line  # sh killed by SIGTERM

    refused = cli("exec", "web", "true")
    assert refused.code == 1
    assert "container web" in refused.err and "is not running" in refused.err

    # a stopped container keeps its files: diff and commit still work
    assert "A /f" in cli("diff", "web").out.splitlines()
    assert cli("commit", "web", "snap:2").code == 0
    assert cli("run", "snap:2", "cat", "/etc/changeme").out == "orig\nmore\n"
    assert cli("run", "snap:2", "ls", "/etc/deleteme").code == 1

    logs = cli("logs", "web")
    assert logs.out.startswith("tick 1\ntick 2\n")

    removed = cli("rm", "web")
    assert (removed.code, removed.out) == (0, "web\n"), removed.err
    assert cli("ps", "-aq").out == ""
    assert not os.path.exists(state_dir / cid)


@pytest.mark.rootless
def test_a_killed_supervisor_takes_its_container_along(cli: Cli, state_dir: Path) -> None:
    cid = cli("run", "-d", "bb:1", "sleep", "1000").out.strip()
    record = read_record(state_dir / cid)
    assert record is not None and record.pid is not None and record.supervisor is not None
    os.kill(record.supervisor, signal.SIGKILL)
    os.waitpid(record.supervisor, 0)  # re-parented to this subreaper when its starter exited
    eventually(lambda: gone(record.pid))  # PR_SET_PDEATHSIG: the container's PID 1 died too
    assert (state_dir / cid).exists()  # nobody has swept yet...

    listing = cli("ps", "-a")  # ...the next command does
    assert (listing.code, listing.out.splitlines()[1:]) == (0, [])
    assert not (state_dir / cid).exists()


@pytest.mark.rootless
def test_a_name_in_use_and_an_unknown_container_are_clear_errors(
    cli: Cli, env: dict[str, str]
) -> None:
    cid = cli("run", "-d", "--name", "db", "bb:1", "sleep", "1000").out.strip()
    clash = shell(env, "run", "-d", "--name", "db", "bb:1", "true")
    assert clash.code == 125
    assert '"db" is already in use by container' in clash.err and cid[:12] in clash.err
    assert len(cli("ps", "-q").out.split()) == 1

    for command in ("stop", "rm", "logs", "diff", "exec"):
        missing = cli(command, "nosuch", *(["true"] if command == "exec" else []))
        assert missing.code == 1
        assert "no such container: nosuch" in missing.err, command

    running = cli("rm", "db")
    assert running.code == 1 and "running" in running.err and "rm -f" in running.err
    assert cli("rm", "-f", "db").code == 0


# --- stopping -----------------------------------------------------------------------------------


def test_stop_sends_the_images_stopsignal(cli: Cli) -> None:
    trap = "trap 'echo got usr1; exit 7' USR1; while true; do sleep 0.05; done"
    cli("run", "-d", "--name", "usr1", "bb:usr1", "sh", "-c", trap)
    eventually(lambda: cli("exec", "usr1", "true").code == 0)
    assert cli("stop", "-t", "30", "usr1").code == 0
    line = ps_line(cli, "usr1", "-a")
    assert line is not None and "Exited (7)" in line
    assert cli("logs", "usr1").out == "got usr1\n"
    assert cli("rm", "usr1").code == 0


def test_stop_kills_after_the_timeout(cli: Cli) -> None:
    cli("run", "-d", "--name", "stubborn", "bb:1", "sh", "-c", "trap '' TERM; while :; do :; done")
    before = time.monotonic()
    assert cli("stop", "-t", "0.3", "stubborn").code == 0
    took = time.monotonic() - before
    assert 0.3 <= took < 3
    line = ps_line(cli, "stubborn", "-a")
    assert line is not None and "Exited (137)" in line
    assert cli("stop", "stubborn").code == 0  # stopping a stopped container is no error
    assert cli("rm", "stubborn").code == 0


# --- output -------------------------------------------------------------------------------------


def test_logs_keep_the_streams_apart_and_follow_until_the_end(cli: Cli) -> None:
    script = "echo out1; echo err1 >&2; printf 'part'; sleep 0.3; echo ial; echo out2"
    cli("run", "-d", "--name", "talker", "bb:1", "sh", "-c", script)
    followed = cli("logs", "-f", "talker")  # returns when the container ends
    assert (followed.out, followed.err) == ("out1\npartial\nout2\n", "err1\n")
    assert cli("wait", "talker").out == "0\n"
    assert cli("logs", "--tail", "1", "talker").out == "out2\n"
    stamped = cli("logs", "-t", "talker").out.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z out1", stamped[0])
    assert cli("rm", "talker").code == 0


# --- exec ---------------------------------------------------------------------------------------


def test_exec_options_stdin_and_exit_codes(cli: Cli, env: dict[str, str]) -> None:
    cli("run", "-d", "--name", "box", "-e", "FROM_RUN=1", "bb:1", "sleep", "1000")
    ran = cli("exec", "-e", "X=y", "-w", "/tmp", "box", "sh", "-c", 'echo "$X $FROM_RUN $(pwd)"')
    assert ran.out == "y 1 /tmp\n"
    assert cli("exec", "box", "sh", "-c", "exit 42").code == 42
    missing = cli("exec", "box", "no-such-command")
    assert missing.code == 127 and "no-such-command" in missing.err
    assert shell(env, "exec", "-i", "box", "cat", input="from stdin\n").out == "from stdin\n"
    assert shell(env, "exec", "box", "cat").out == ""  # without -i: no stdin
    assert cli("rm", "-f", "box").code == 0


def test_an_exec_whose_client_dies_is_ended(cli: Cli, env: dict[str, str]) -> None:
    cli("run", "-d", "--name", "host1", "bb:1", "sleep", "1000")
    client = subprocess.Popen(
        [sys.executable, "-m", "pytest_isolate", "exec", "host1", "sleep", "777"],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    eventually(lambda: "sleep 777" in cli("exec", "host1", "ps").out)
    client.kill()
    client.wait()
    eventually(lambda: "sleep 777" not in cli("exec", "host1", "ps").out)
    assert cli("rm", "-f", "host1").code == 0


# --- removal ------------------------------------------------------------------------------------


def test_run_rm_detached_removes_itself_and_prune_removes_stopped_ones(cli: Cli) -> None:
    cli("run", "-d", "--rm", "bb:1", "true")
    done = cli("run", "-d", "--name", "done", "bb:1", "true").out.strip()
    cli("run", "-d", "--name", "busy", "bb:1", "sleep", "1000")
    assert cli("wait", "done").out == "0\n"
    eventually(lambda: len(cli("ps", "-aq").out.split()) == 2)  # the --rm one is gone

    pruned = cli("container", "prune", "-f")
    assert pruned.code == 0
    assert pruned.out.startswith(f"Deleted Containers:\n{done}\n\nTotal reclaimed space: ")
    assert [r.split()[-1] for r in cli("ps", "-a").out.splitlines()[1:]] == ["busy"]
    assert cli("rm", "-f", "busy").code == 0


def test_an_image_in_use_by_a_container_is_kept(cli: Cli) -> None:
    from pytest_isolate.cli_containers import open_store

    cli("run", "-d", "--name", "base", "bb:1", "sleep", "1000")
    image_id = cli("commit", "base", "mine:1").out.strip()
    cli("rm", "-f", "base")
    cli("run", "-d", "--name", "user", "mine:1", "sleep", "1000")
    with pytest.raises(ImageError, match="used by a container"):
        open_store().remove_image("mine:1")
    refused = cli("rmi", "-f", "mine:1")
    assert refused.code == 1 and "cannot be forced" in refused.err
    assert cli("images", "-q", "mine:1").out.strip(), "a refused rmi removed the tag"
    assert cli("rm", "-f", "user").code == 0
    assert open_store().remove_image(image_id) == ["docker.io/library/mine:1"]
