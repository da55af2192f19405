"""Container state directories: owned through a lock, swept once their owner is gone.

Owners are real forked processes: the kernel drops an ``flock`` when its holder dies, and that
is exactly what :func:`runtime.state.sweep` relies on.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runtime import state


def _is_locked(path: Path) -> bool:
    fd = os.open(path / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def owner_process(root: Path, cid: str) -> Iterator[int]:
    """A forked process that creates state ``cid`` and holds it until the block ends."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(ready_r)
            os.close(stop_w)
            state.create(root, cid)
            os.write(ready_w, b"r")
            os.read(stop_r, 1)  # until the parent closes its end
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"r", "the owner process failed to create its state"
        yield pid
    finally:
        os.close(stop_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def dead_owner(root: Path, cid: str) -> None:
    """Create state ``cid`` in a process that then dies without releasing it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            state.create(root, cid)
            os.kill(os.getpid(), 9)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9


def test_create_makes_a_locked_private_directory(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    st = state.create(root)
    try:
        assert st.path == root / st.id and st.path.is_dir()
        assert len(st.id) == 12 and int(st.id, 16) >= 0
        assert stat.S_IMODE(st.path.stat().st_mode) == 0o711
        assert _is_locked(st.path)
        assert os.get_inheritable(st.lock_fd) is False
        assert os.listdir(root) == [st.id]  # no staging directory left behind
    finally:
        st.release()


def test_create_refuses_an_id_in_use(tmp_path: Path) -> None:
    st = state.create(tmp_path / "containers", "web")
    try:
        with pytest.raises(FileExistsError):
            state.create(tmp_path / "containers", "web")
        assert _is_locked(st.path)
        assert os.listdir(tmp_path / "containers") == ["web"]
    finally:
        st.release()


def test_create_refuses_a_root_planted_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "planted").symlink_to(tmp_path / "real")
    with pytest.raises(PermissionError, match="planted"):
        state.create(tmp_path / "planted" / "containers")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_create_refuses_a_root_owned_by_someone_else(tmp_path: Path) -> None:
    top = tmp_path / "theirs"
    top.mkdir()
    os.chown(top, 65534, 65534)
    with pytest.raises(PermissionError, match="not a directory owned by uid 0"):
        state.create(top / "containers")


def test_release_removes_everything_and_is_idempotent(tmp_path: Path) -> None:
    st = state.create(tmp_path / "containers")
    (st.path / "upper" / "0").mkdir(parents=True)
    (st.path / "upper" / "0" / "file").write_text("x")
    fd = st.lock_fd
    st.release()
    assert not st.path.exists()
    assert st.lock_fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)  # the lock fd is closed
    st.release()


def test_release_copes_with_overlays_unreadable_work_dirs(tmp_path: Path) -> None:
    st = state.create(tmp_path / "containers")
    work = st.path / "work" / "0" / "work"
    work.mkdir(parents=True)
    (work / "inner").mkdir()
    os.chmod(work, 0)
    os.chmod(st.path / "work" / "0", 0o500)
    st.release()
    assert not st.path.exists()


def test_release_hands_over_to_the_careful_removal_when_the_quick_one_meets_resistance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root nothing resists the quick path; rootless, overlay's work/work does (mode 000).
    st = state.create(tmp_path / "containers")
    (st.path / "upper" / "0" / "deep").mkdir(parents=True)
    (st.path / "upper" / "0" / "deep" / "file").write_text("x")
    (st.path / "etc").mkdir()
    quick = state._unlink_tree

    def resist(dir_fd: int, name: str) -> None:
        if name == "deep":
            raise PermissionError(13, "Permission denied", name)
        quick(dir_fd, name)

    monkeypatch.setattr(state, "_unlink_tree", resist)
    st.release()
    assert not st.path.exists()
    assert st.lock_fd == -1


def test_removal_never_follows_a_symlink_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    st = state.create(tmp_path / "containers")
    (st.path / "link").symlink_to(outside)
    (st.path / "upper").mkdir()
    (st.path / "upper" / "link").symlink_to(outside / "keep")
    st.release()
    assert not st.path.exists()
    assert (outside / "keep").read_text() == "precious"


def test_sweep_removes_a_directory_whose_owner_died(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    dead_owner(root, "gone")
    assert (root / "gone").is_dir()
    assert list(state.iter_states(root)) == [(root / "gone", False)]
    assert state.sweep(root) == [root / "gone"]
    assert not (root / "gone").exists()


def test_sweep_keeps_a_directory_whose_owner_lives(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    with owner_process(root, "alive"):
        assert list(state.iter_states(root)) == [(root / "alive", True)]
        assert state.sweep(root) == []
        assert (root / "alive").is_dir()
    # Its owner ended without releasing it: now it goes.
    assert state.sweep(root) == [root / "alive"]
    assert not (root / "alive").exists()


def test_sweep_tells_the_dead_from_the_living_side_by_side(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    mine = state.create(root, "mine")
    try:
        dead_owner(root, "dead")
        with owner_process(root, "live"):
            assert state.sweep(root) == [root / "dead"]
            assert sorted(os.listdir(root)) == ["live", "mine"]
    finally:
        mine.release()


def test_sweep_removes_a_directory_without_a_lock_file(tmp_path: Path) -> None:
    # What a release that died half-way leaves behind.
    root = tmp_path / "containers"
    (root / "half" / "upper").mkdir(parents=True)
    assert state.sweep(root) == [root / "half"]


def test_sweep_leaves_files_symlinks_and_a_missing_root_alone(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    assert state.sweep(root) == []
    root.mkdir()
    (root / "note").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    assert state.sweep(root) == []
    assert (root / "note").exists() and (tmp_path / "elsewhere").is_dir()


def test_sweep_waits_before_removing_a_fresh_staging_directory(tmp_path: Path) -> None:
    root = tmp_path / "containers"
    fresh = root / f"{state.STAGING_PREFIX}abc-1"
    old = root / f"{state.STAGING_PREFIX}def-2"
    fresh.mkdir(parents=True)
    old.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    # A creator may be between mkdir and flock on the fresh one; the old one was abandoned.
    assert state.sweep(root) == [old]
    assert fresh.is_dir()
    assert list(state.iter_states(root)) == []


def test_default_root_prefers_the_explicit_setting() -> None:
    env = {"PYTEST_ISOLATE_STATE": "/x/state", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert state.default_root(env, uid=1000, is_tmpfs=lambda _: True) == Path("/x/state")


def _tmpfs_at(*bases: str) -> Callable[[str], bool]:
    return lambda path: path in bases


def test_default_root_is_on_a_tmpfs_when_there_is_one() -> None:
    assert state.default_root({}, uid=0, is_tmpfs=_tmpfs_at("/run", "/dev/shm")) == Path(
        "/run/pytest-isolate/containers"
    )
    # /run is not a tmpfs on every machine: then /dev/shm, per user.
    assert state.default_root({}, uid=0, is_tmpfs=_tmpfs_at("/dev/shm")) == Path(
        "/dev/shm/pytest-isolate-0/containers"
    )
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert state.default_root(
        env, uid=1000, is_tmpfs=_tmpfs_at("/run/user/1000", "/dev/shm")
    ) == Path("/run/user/1000/pytest-isolate/containers")
    # A user never shares root's /run.
    assert state.default_root({}, uid=1000, is_tmpfs=_tmpfs_at("/run", "/dev/shm")) == Path(
        "/dev/shm/pytest-isolate-1000/containers"
    )


def test_default_root_without_any_tmpfs_is_the_users_cache() -> None:
    none = _tmpfs_at()
    assert state.default_root({"HOME": "/home/u"}, uid=1000, is_tmpfs=none) == Path(
        "/home/u/.cache/pytest-isolate/containers"
    )
    assert state.default_root(
        {"HOME": "/home/u", "XDG_CACHE_HOME": "/c"}, uid=1000, is_tmpfs=none
    ) == Path("/c/pytest-isolate/containers")
