"""Per-container state directories, owned through a lock so the dead can be told from the living.

Each container gets ``<root>/<id>/`` holding its overlay upper and work directories and its
``/etc/hosts``-style files. The creating process holds an exclusive ``flock`` on ``<id>/lock`` for
the container's whole life. The kernel drops that lock when the owner dies, however it dies, so a
later :func:`sweep` can remove exactly the directories whose owner is gone, without guessing from
pids.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def default_root(env: dict[str, str] | None = None, uid: int | None = None) -> Path:
    """Where container state lives: on a tmpfs, because it dies with its container anyway.

    Overlay upper and work directories on tmpfs make a container's start and removal several
    milliseconds cheaper than on a disk filesystem (measured in ``bench/``); what a container
    writes then costs memory, like docker's ``--tmpfs``. ``$PYTEST_ISOLATE_STATE`` moves it.
    """
    e = dict(os.environ) if env is None else env
    uid = os.getuid() if uid is None else uid
    if e.get("PYTEST_ISOLATE_STATE"):
        return Path(e["PYTEST_ISOLATE_STATE"])
    if uid == 0:
        return Path("/run/pytest-isolate/containers")
    if e.get("XDG_RUNTIME_DIR"):
        return Path(e["XDG_RUNTIME_DIR"]) / "pytest-isolate" / "containers"
    return Path(f"/dev/shm/pytest-isolate-{uid}") / "containers"


def _ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) owned by us; refuse one that someone else planted."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    top = path.parent if path.name == "containers" else path
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{top} is not a directory owned by uid {os.getuid()}")


@dataclass
class StateDir:
    """An owned, locked container directory."""

    id: str
    path: Path
    lock_fd: int

    def release(self) -> None:
        """Remove the directory and drop the lock (idempotent)."""
        if self.lock_fd < 0:
            return
        remove_tree(self.path)
        os.close(self.lock_fd)
        self.lock_fd = -1


def new_id() -> str:
    return secrets.token_hex(6)


def create(root: Path, container_id: str | None = None) -> StateDir:
    """Create and lock a fresh state directory under ``root``."""
    _ensure_private_dir(root)
    cid = container_id or new_id()
    path = root / cid
    path.mkdir(mode=0o711)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return StateDir(cid, path, fd)


def _owner_alive(path: Path) -> bool:
    try:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # a directory whose creator died before taking the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def iter_states(root: Path) -> Iterator[tuple[Path, bool]]:
    """Every state directory under ``root`` with whether its owner is alive."""
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            yield entry, _owner_alive(entry)


def sweep(root: Path) -> list[Path]:
    """Remove state directories whose owner died (crash, SIGKILL); return what was removed."""
    removed = []
    for path, alive in iter_states(root):
        if not alive:
            remove_tree(path)
            removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    """``rm -rf`` that copes with read-only directories (overlay's ``work/work`` is mode 000).

    Never follows symlinks. Files owned by ids the caller cannot touch (rootless images with
    several users) are removed from inside a user namespace with the same map.
    """
    if not path.exists() and not path.is_symlink():
        return

    def onerror(func: object, p: str, exc: BaseException) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    _make_writable(path)
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onerror)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: onerror(f, p, info[1]))
    if path.exists() and os.getuid() != 0:
        _remove_in_userns(path)


def _make_writable(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, stat.S_IRWXU)


def _remove_in_userns(path: Path) -> None:
    """Remove files owned by subordinate ids: as root of a user namespace mapping them."""
    from runtime import idmap
    from runtime._sys import CLONE_NEWUSER, unshare

    plan = idmap.host_plan()
    if not plan.multi_id:
        return
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            unshare(CLONE_NEWUSER)
            os.write(ready_w, b"u")
            if os.read(go_r, 1) == b"g":
                _make_writable(path)
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) == b"u":
            idmap.apply_idmap(pid, plan)
            os.write(go_w, b"g")
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)
