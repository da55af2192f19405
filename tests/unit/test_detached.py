"""Detached containers without containers: records, names, lookup, the log format, errors across
the socket, the launch message, signals, and what ``ps`` prints."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pytest_isolate.cli import _parser
from pytest_isolate.cli_containers import command_text, ps_rows, status_text
from runtime import errors, state
from runtime.detached import logs, protocol
from runtime.detached.record import (
    EXITED,
    RUNNING,
    ContainerRecord,
    generate_name,
    new_id,
    read_record,
    resolve,
    validate_name,
    write_record,
)
from runtime.detached.supervisor import (
    Launch,
    _descendants,
    parse_signal,
    spec_from_dict,
    spec_to_dict,
)
from runtime.spec import BindMount, ContainerSpec, Rootfs, TmpfsMount

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def stamp(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(cid: str, name: str, **fields: object) -> ContainerRecord:
    base: dict[str, object] = {
        "image": "bb:1",
        "image_id": None,
        "command": ("sleep", "1"),
        "created": stamp(60),
    }
    base.update(fields)
    return ContainerRecord(id=cid, name=name, **base)  # type: ignore[arg-type]


# --- ids, names, lookup -------------------------------------------------------------------------


def test_new_id_is_64_hex_and_never_shows_an_all_digit_short_id() -> None:
    tokens = iter(["1234567890120000" * 4, "0123456789ab" + "f" * 52])
    assert new_id(lambda n: next(tokens)) == "0123456789ab" + "f" * 52
    cid = new_id()
    assert len(cid) == 64 and int(cid, 16) >= 0


def test_names_follow_dockers_rule() -> None:
    for good in ("web", "a1", "my_app.v2-3", "9lives"):
        assert validate_name(good) == good
    for bad in ("", "a", "-web", ".x", "has space", "slash/name", "ünï"):
        with pytest.raises(errors.SpecError, match="invalid container name"):
            validate_name(bad)


def test_generated_names_avoid_the_taken_ones() -> None:
    assert generate_name([], choice=lambda seq: seq[0]) == "amber_badger"
    # every pair taken: a number makes it free
    name = generate_name(["amber_badger"], choice=lambda seq: seq[0])
    assert name.startswith("amber_badger") and name != "amber_badger"
    validate_name(generate_name([]))


def test_resolve_prefers_id_then_name_then_a_unique_prefix() -> None:
    a = record("abc" + "0" * 61, "web")
    b = record("abd" + "0" * 61, "abc")  # a name that is also a prefix of a's id
    c = record("f" * 64, "db")
    found = [a, b, c]
    assert resolve(found, a.id) is a
    assert resolve(found, "abc") is b  # the exact name wins over the prefix
    assert resolve(found, "web") is a
    assert resolve(found, "f") is c
    with pytest.raises(errors.ContainerError, match=r"prefix 'ab' is ambiguous: abc0.*\(web\)"):
        resolve(found, "ab")
    with pytest.raises(errors.ContainerError, match="no such container: nosuch"):
        resolve(found, "nosuch")
    with pytest.raises(errors.ContainerError):
        resolve(found, "")


def test_records_round_trip_and_ignore_unknown_fields(tmp_path: Path) -> None:
    r = record("a" * 64, "web", state=RUNNING, pid=42, supervisor=7, stop_signal="SIGUSR1")
    assert ContainerRecord.from_json(r.to_json()) == r
    write_record(tmp_path, r.evolve(state=EXITED, exit_code=3))
    again = read_record(tmp_path)
    assert again is not None and (again.state, again.exit_code, again.short_id) == (
        EXITED,
        3,
        "a" * 12,
    )
    assert sorted(os.listdir(tmp_path)) == ["container.json"]  # the temporary name is gone
    assert ContainerRecord.from_json(r.to_json()[:-2] + ', "future": 1}') == r
    with pytest.raises(ValueError, match="unknown container state"):
        record("b" * 64, "x", state="paused")
    (tmp_path / "container.json").write_text("{broken")
    assert read_record(tmp_path) is None
    assert read_record(tmp_path / "missing") is None


# --- the log format -----------------------------------------------------------------------------


def test_log_lines_keep_streams_and_partial_lines() -> None:
    t = "2024-05-01T12:00:00.000001Z"
    data = logs.encode("stdout", b"one\ntwo words\nhal", t) + logs.encode("stderr", b"e\r\n", t)
    data += logs.encode("stdout", b"f\n", t) + logs.encode("stdout", b"", t)
    lines = data.splitlines(keepends=True)
    assert lines[0] == f"{t} stdout F one\n".encode()
    assert lines[2] == f"{t} stdout P hal\n".encode()
    items = list(logs.records(lines))
    assert [(i.stream, i.data) for i in items] == [
        ("stdout", b"one\n"),
        ("stdout", b"two words\n"),
        ("stdout", b"hal"),
        ("stderr", b"e\r\n"),
        ("stdout", b"f\n"),
    ]
    assert b"".join(i.data for i in items if i.stream == "stdout") == b"one\ntwo words\nhalf\n"
    with pytest.raises(ValueError):
        logs.encode("stdin", b"x", t)


def test_damaged_log_lines_are_skipped() -> None:
    t = "2024-05-01T12:00:00Z"
    assert logs.parse(f"{t} stdout F cut short".encode()) is None  # no newline: torn write
    assert logs.parse(f"{t} other F x\n".encode()) is None
    assert logs.parse(f"{t} stdout X x\n".encode()) is None
    assert logs.parse(b"garbage\n") is None
    empty = logs.parse(f"{t} stdout F\n".encode())
    assert empty is not None and empty.data == b"\n"


def test_tail_counts_lines_across_streams_and_pieces() -> None:
    def item(stream: str, data: bytes) -> logs.LogRecord:
        return logs.LogRecord("t", stream, data)

    items = [
        item("stdout", b"1\n"),
        item("stderr", b"2\n"),
        item("stdout", b"th"),
        item("stdout", b"ree\n"),
        item("stdout", b"4\n"),
    ]
    assert logs.tail(items, 2) == items[2:]
    assert logs.tail(items, 1) == items[4:]
    assert logs.tail(items, 10) == items
    assert logs.tail(items, None) == items
    assert logs.tail(items, 0) == []


# --- errors across the socket -------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        errors.ExecError("nosuch", errno.ENOENT, "executable file not found in $PATH"),
        errors.SetupError("mounts", errno.EPERM, "mount /proc"),
        errors.IdMapError("userns", errno.EPERM, "newuidmap failed"),
        errors.UnsupportedHostError("overlayfs", "not in /proc/filesystems", "modprobe overlay"),
        errors.ContainerStateError("container web (abc) is not running"),
        errors.ImageNotFound("no image 'x'"),
        errors.SpecError("--change 'FROM x': FROM is not allowed"),
    ],
)
def test_errors_come_back_as_the_same_class(exc: errors.IsolateError) -> None:
    back = protocol.decode_error(protocol.encode_error(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    if isinstance(exc, errors.ExecError):
        assert isinstance(back, errors.ExecError) and back.errno == errno.ENOENT


def test_unexpected_and_unknown_errors_become_container_errors() -> None:
    back = protocol.decode_error(protocol.encode_error(OSError(errno.EIO, "disk")))
    assert type(back) is errors.ContainerError
    assert "supervisor failed: OSError" in str(back)
    other = protocol.decode_error({"type": "SomethingNew", "message": "hm"})
    assert type(other) is errors.ContainerError and str(other) == "hm"


# --- what the starter sends ---------------------------------------------------------------------


def test_a_spec_survives_the_trip_to_the_supervisor() -> None:
    spec = ContainerSpec(
        Rootfs(lowers=("/l/2", "/l/1"), host_paths=("/proj",)),
        argv=("sh", "-c", "echo $A"),
        env={"A": "1", "PATH": "/bin"},
        cwd="/work",
        user="nobody:nogroup",
        hostname="web",
        binds=(BindMount("/src", "/dst", True),),
        tmpfs=(TmpfsMount("/scratch", "size=1m"),),
        read_only=True,
        userns=True,
        network="host",
        init=False,
        name="web",
    )
    assert spec_from_dict(spec_to_dict(spec)) == spec
    launch = Launch(spec, "/run/x", "bb:1", "sha256:" + "a" * 64, "web", "SIGUSR1", True)
    assert Launch.from_json(launch.to_json()) == launch
    with pytest.raises(errors.SpecError, match="file descriptors"):
        spec_to_dict(ContainerSpec(Rootfs(host=True), argv=("true",), pass_fds=(5,)))


def test_a_launch_is_checked_before_anything_starts() -> None:
    spec = ContainerSpec(Rootfs(host=True), argv=("true",))
    with pytest.raises(errors.SpecError, match="needs a command"):
        Launch(ContainerSpec(Rootfs(host=True)), "/r", "host")
    with pytest.raises(errors.SpecError, match="invalid container name"):
        Launch(spec, "/r", "host", name="-bad")
    with pytest.raises(errors.SpecError, match="invalid signal"):
        Launch(spec, "/r", "host", stop_signal="SIGNOPE")


def test_signals_are_read_as_docker_reads_them() -> None:
    assert parse_signal("SIGTERM") == signal.SIGTERM
    assert parse_signal("term") == signal.SIGTERM
    assert parse_signal("9") == signal.SIGKILL
    assert parse_signal(" SIGUSR1 ") == signal.SIGUSR1
    assert parse_signal("SIGRTMIN") == signal.SIGRTMIN
    assert parse_signal("RTMIN+3") == signal.SIGRTMIN + 3
    assert parse_signal("SIGRTMAX-1") == signal.SIGRTMAX - 1
    for bad in ("SIGNOPE", "0", "999", "RTMIN-1", "SIGRTMIN+x", "SIGRTMAX+1", ""):
        with pytest.raises(errors.SpecError, match="invalid signal"):
            parse_signal(bad)


def test_descendants_walks_the_children_files(tmp_path: Path) -> None:
    tree = {10: {10: [11, 12]}, 11: {11: [13], 99: [14]}, 12: {12: []}, 13: {13: []}}
    for pid, tasks in tree.items():
        for tid, children in tasks.items():
            d = tmp_path / str(pid) / "task" / str(tid)
            d.mkdir(parents=True)
            (d / "children").write_text(" ".join(map(str, children)) + " ")
    assert _descendants(10, str(tmp_path)) == [11, 12, 13, 14]  # 14 has no /proc entry: gone
    assert _descendants(42, str(tmp_path)) == []


# --- the state root lock ------------------------------------------------------------------------


def test_root_lock_excludes_others_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    with state.root_lock(root):
        other = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert os.listdir(root) == []
    other = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(other)


def test_owner_alive_follows_the_state_lock(tmp_path: Path) -> None:
    st = state.create(tmp_path, "c" * 64)
    assert state.owner_alive(st.path)
    os.close(st.lock_fd)  # the owner "dies": its lock goes with its fd
    st.lock_fd = -1
    assert not state.owner_alive(st.path)
    state.remove_tree(st.path)


# --- what ps prints -----------------------------------------------------------------------------


def test_status_and_command_columns() -> None:
    up = record("a" * 64, "up", state=RUNNING, started_at=stamp(125))
    done = record("b" * 64, "done", state=EXITED, exit_code=137, finished_at=stamp(3))
    new = record("c" * 64, "new")
    assert status_text(up, NOW) == "Up 2 minutes"
    assert status_text(done, NOW) == "Exited (137) 3 seconds ago"
    assert status_text(new, NOW) == "Created"
    assert command_text(("sleep", "1"), False) == '"sleep 1"'
    assert command_text(("sh", "-c", "while true; do x; done"), False) == '"sh -c while true; d…"'
    assert command_text(("sh", "-c", "while true; do x; done"), True) == (
        '"sh -c while true; do x; done"'
    )


def test_ps_rows_are_newest_first_and_hide_stopped_ones_without_all() -> None:
    old = record("a" * 64, "old", state=RUNNING, created=stamp(3600), started_at=stamp(3600))
    young = record("b" * 64, "young", state=RUNNING, created=stamp(5), started_at=stamp(5))
    gone = record("c" * 64, "gone", state=EXITED, exit_code=0, finished_at=stamp(1))
    rows = ps_rows([old, young, gone], NOW, all=False, no_trunc=False)
    assert [(r.name, r.id, r.created) for r in rows] == [
        ("young", "b" * 12, "5 seconds ago"),
        ("old", "a" * 12, "About an hour ago"),
    ]
    everything = ps_rows([old, young, gone], NOW, all=True, no_trunc=True)
    assert [r.name for r in everything] == ["young", "gone", "old"]  # gone: created 60 s ago
    assert everything[1].id == "c" * 64
    assert everything[1].as_json()["State"] == "exited"
    assert everything[1].as_json()["CreatedAt"] == "2024-05-01 11:59:00 +0000 UTC"


# --- parsing ------------------------------------------------------------------------------------


def parse(*argv: str) -> object:
    return _parser().parse_args(list(argv))


def test_run_detached_options_and_the_container_commands_parse() -> None:
    args = parse("run", "-d", "--name", "web", "--rm", "bb:1", "sh", "-c", "x")
    assert (args.detach, args.name, args.rm, args.cmd) == (True, "web", True, ["sh", "-c", "x"])
    stop = parse("stop", "-t", "0.5", "-s", "USR1", "a", "b")
    assert (stop.time, stop.signal, stop.containers) == (0.5, "USR1", ["a", "b"])
    assert parse("stop", "a").time == 10.0
    ex = parse("exec", "-i", "-e", "A=1", "-w", "/x", "-u", "nobody", "web", "ls", "-l", "-a")
    assert (ex.interactive, ex.env, ex.workdir, ex.user) == (True, ["A=1"], "/x", "nobody")
    assert (ex.container, ex.cmd) == ("web", ["ls", "-l", "-a"])
    assert parse("logs", "--tail", "all", "web").tail is None
    assert parse("logs", "-n", "3", "-f", "-t", "web").tail == 3
    commit = parse("commit", "-c", "CMD x", "-c", "ENV A=1", "-m", "m", "-a", "me", "web", "r:1")
    assert (commit.changes, commit.message, commit.author) == (["CMD x", "ENV A=1"], "m", "me")
    assert (commit.container, commit.repository) == ("web", "r:1")
    assert parse("container", "prune", "-f").container_command == "prune"
    assert parse("ps", "-aq").all is True


def test_bad_container_command_lines_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (("logs", "--tail", "lots", "web"), ("rm",), ("container",)):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2
    assert "expected a number or 'all'" in capsys.readouterr().err
