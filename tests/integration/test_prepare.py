"""Containers whose namespaces a helper process set up ahead of time (runtime.prepare).

Real namespaces and mounts: the callable inside must see exactly what a container set up the
usual way shows, and nothing may be left when the engine is done (the ``engine`` fixture's
leak check: processes, overlay mounts, descriptors, state directories).
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from runtime import launch
from runtime.engine import Engine
from runtime.errors import ContainerStateError, SetupError
from runtime.prepare import MAX_BATCH, NAMESPACES
from runtime.rootfs import masked_paths
from runtime.spec import BindMount, ContainerSpec, Rootfs

SPEC = ContainerSpec(Rootfs(host=True), hostname="ahead")
MASKED_FILE = next(path for path, directory in masked_paths() if not directory)


def _inside() -> dict[str, Any]:
    with open(MASKED_FILE, "rb") as f:  # /dev/null bound over it
        masked = f.read(16)
    try:
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write("x")
        proc_sys = "writable"
    except OSError as e:
        proc_sys = e.strerror or "?"
    return {
        "pid": os.getpid(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "hostname": socket.gethostname(),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "masked": masked,
        "proc_sys": proc_sys,
        "mountinfo": open("/proc/self/mountinfo").read(),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    }


def _call(engine: Engine, spec: ContainerSpec) -> dict[str, Any]:
    c = engine.create(spec, prepared=True)
    joined = bool(c._plan.joined)  # until the start hands the descriptors to the PID 1
    try:
        proc = c.start(target=_inside)
        result: dict[str, Any] = launch.callable_result(proc)
    finally:
        c.remove()
    return result | {"joined": joined}


def _parent(pid: int) -> int:
    """``pid``'s parent (not its command line: that is empty for a moment after the exec)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.rootless
def test_a_prepared_container_is_what_a_usual_one_is(engine: Engine) -> None:
    usual = _call(engine, SPEC)
    engine.prepare(SPEC)
    ahead = _call(engine, SPEC)
    assert ahead["joined"] == (os.geteuid() == 0) and not usual["joined"]  # root only
    for key in ("pid", "pids", "hostname", "interfaces", "masked", "proc_sys"):
        assert ahead[key] == usual[key], key
    assert ahead["pid"] == 1 and ahead["pids"] == [1]
    assert ahead["hostname"] == "ahead" and ahead["interfaces"] == ["lo"]
    assert ahead["masked"] == b"" and ahead["proc_sys"] == "Read-only file system"
    # The same mounts, in the same order (/proc comes last now, where the PID 1 made it).
    fields = [
        sorted(line.split()[4] for line in r["mountinfo"].splitlines()) for r in (usual, ahead)
    ]
    assert fields[0] == fields[1]
    # The namespace descriptors were closed once joined: the workload does not hold them.
    assert len(ahead["fds"]) == len(usual["fds"])


def test_as_root_the_helper_sets_the_next_container_up(engine: Engine) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only: a user's containers are always set up by their own PID 1")
    engine.prepare(SPEC)
    assert engine._ahead is not None and engine._ahead.owed == 1
    assert engine._preparer is not None
    helper = engine._preparer._proc  # its own, not another xdist worker's
    assert helper.poll() is None and _parent(helper.pid) == os.getpid()
    taken = engine.create(SPEC, prepared=True)
    assert taken._plan.joined and engine._ahead.owed == 0
    # What is left for its PID 1: /proc, its masks and read-only parts, in the container.
    assert {
        getattr(op, "target", getattr(op, "path", "")).split("/")[1] for op in taken._plan.mounts
    } == {"proc"}
    taken.remove()
    engine.close()
    assert helper.returncode == 0  # the helper ended with the engine, on its own, and was reaped


@pytest.mark.rootless
def test_another_spec_drops_the_prepared_container(engine: Engine) -> None:
    engine.prepare(SPEC)
    other = ContainerSpec(Rootfs(host=True), hostname="other")
    assert _call(engine, other)["hostname"] == "other"
    assert engine._ahead is None  # dropped: its namespaces and state are gone (leak check)


@pytest.mark.rootless
def test_a_prepared_container_that_was_never_used_leaves_nothing(engine: Engine) -> None:
    engine.prepare(SPEC)
    engine.close()


@pytest.mark.rootless
def test_a_setup_that_fails_ahead_fails_the_usual_way(engine: Engine, tmp_path: Path) -> None:
    spec = ContainerSpec(
        Rootfs(host=True), binds=(BindMount(str(tmp_path / "missing"), "/mnt/data"),)
    )
    engine.prepare(spec)
    with pytest.raises(SetupError, match="missing"):
        _call(engine, spec)


def _network() -> dict[str, int]:
    """What a test sees of its network namespace when it starts."""
    with open("/proc/net/dev") as f:
        lo = next(line for line in f if line.strip().startswith("lo:"))
    with open("/proc/net/sockstat") as f:
        tcp = next(line for line in f if line.startswith("TCP:")).split()
    return {"lo_packets": int(lo.split(":")[1].split()[1]), "tw": int(tcp[tcp.index("tw") + 1])}


def _network_then_traffic() -> dict[str, int]:
    """Then a TCP connection over loopback, which leaves a socket in TIME_WAIT behind."""
    seen = _network()
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        server.accept()[0].close()
        client.close()  # the side that closes first keeps the connection in TIME_WAIT
    return seen


@pytest.mark.parametrize("traffic", [False, True], ids=["untouched", "used"])
def test_as_root_a_network_namespace_is_reused_only_when_nothing_happened_in_it(
    engine: Engine, traffic: bool
) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only: a user's containers are always set up by their own PID 1")
    held: list[int] = []
    seen: list[dict[str, int]] = []
    engine.prepare(SPEC)
    try:
        for _ in range(3):  # the helper lends two namespaces; the third test gets one back
            c = engine.create(SPEC, prepared=True)
            engine.prepare(SPEC)  # the next one, while this one runs (as the plugin does)
            assert c._plan.joined, "root prepares ahead"
            # Its network namespace, held here: alive, its inode number cannot be reused.
            net = [name for name, flag in NAMESPACES if c._plan.ns_flags & flag].index("net")
            held.append(os.dup(c._plan.joined[net]))
            try:
                proc = c.start(target=_network_then_traffic if traffic else _network)
                seen.append(launch.callable_result(proc))
            finally:
                c.remove()
        engine.close()  # the one prepared last is given back too
        # Every test starts in a namespace that looks new ...
        assert seen == [{"lo_packets": 0, "tw": 0}] * 3
        # ... and gets the first test's one back only if nothing happened in it.
        first, third = (os.fstat(held[i]).st_ino for i in (0, 2))
        assert (first == third) is not traffic
    finally:
        for fd in held:
            os.close(fd)


def test_as_root_a_batch_is_prepared_when_none_is_left(engine: Engine) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only: a user's containers are always set up by their own PID 1")
    engine.prepare(SPEC, 3)
    assert engine._ahead is not None and engine._ahead.owed == 3
    engine.prepare(SPEC, 3)  # some are left: nothing more
    assert engine._ahead.owed == 3
    taken = [engine.create(SPEC, prepared=True) for _ in range(4)]
    assert [bool(c._plan.joined) for c in taken] == [True, True, True, False]  # then as usual
    for c in taken:
        c.remove()
    engine.prepare(SPEC, 2)
    other = ContainerSpec(Rootfs(host=True), hostname="other")
    engine.prepare(other)  # another spec drops the batch (the leak check sees it go)
    assert engine._ahead is not None and (engine._ahead.spec, engine._ahead.owed) == (other, 1)


def _write_and_look() -> dict[str, Any]:
    with open("/etc/written-inside", "w") as f:
        f.write("private")
    with open("/etc/hosts") as f:
        hosts = f.read()
    return {"hosts": hosts, "mode": oct(os.stat("/tmp").st_mode & 0o7777)}


def test_as_root_a_prepared_container_keeps_its_state_inside(engine: Engine) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only: a user's containers are always set up by their own PID 1")
    engine.prepare(SPEC, 2)
    taken = [engine.create(SPEC, prepared=True) for _ in range(2)]
    assert all(c._plan.joined for c in taken)
    try:
        results = [launch.callable_result(c.start(target=_write_and_look)) for c in taken]
        # Its writes and its /etc files are its own: a tmpfs in its mount namespace, over one
        # host directory that every prepared container shares and none writes to.
        assert engine._home is not None and {c.state_dir for c in taken} == {engine._home.path}
        assert os.listdir(engine._home.path) == ["lock"]
        assert str(engine._home.path) not in Path("/proc/self/mountinfo").read_text()
        assert not Path("/etc/written-inside").exists()
        assert results[0] == results[1]
        assert "127.0.1.1\tahead" in results[0]["hosts"] and results[0]["mode"] == "0o1777"
        with pytest.raises(ContainerStateError, match="set up ahead"):
            taken[0].diff()
    finally:
        for c in taken:
            c.remove()


def test_as_root_a_batch_is_at_most_what_the_socket_holds(engine: Engine) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only: a user's containers are always set up by their own PID 1")

    def stuck(*_: object) -> None:
        raise TimeoutError("the requests filled the helper's socket: both sides wait")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        engine.prepare(SPEC, 1000)  # unbounded, this waits forever (a failure, by the alarm)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert engine._ahead is not None and engine._ahead.owed == MAX_BATCH
    taken = [engine.create(SPEC, prepared=True) for _ in range(MAX_BATCH)]
    assert all(c._plan.joined for c in taken)
    for c in taken:
        c.remove()


def _layer_and_host(layer: str) -> dict[str, Any]:
    return {
        "layer": Path("/etc/from-layer").read_text(),
        "host": sorted(os.listdir("/usr")),
        "layer dir shown": os.path.exists(layer),  # the host view hides the image's layers
    }


def test_as_root_an_image_on_top_of_the_host_is_prepared_too(
    engine: Engine, tmp_path: Path
) -> None:
    """Its state holds more (the whiteouts that hide the store's layers from the host view)."""
    if os.geteuid() != 0:
        pytest.skip("root only: a user's containers are always set up by their own PID 1")
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "from-layer").write_text("layer")
    spec = ContainerSpec(Rootfs(host=True, lowers=(str(layer),)))
    usual = engine.call(spec, _layer_and_host, str(layer))
    engine.prepare(spec)
    assert engine._ahead is not None and engine._ahead.recipe is not None
    assert engine._ahead.recipe.layout.masks
    c = engine.create(spec, prepared=True)
    assert c._plan.joined
    try:
        ahead = launch.callable_result(c.start(target=lambda: _layer_and_host(str(layer))))
    finally:
        c.remove()
    assert ahead == usual and ahead["layer"] == "layer" and not ahead["layer dir shown"]
