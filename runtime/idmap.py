"""User namespace id maps: decide (pure) and write them (as the parent, after the child unshared).

An unprivileged user may map only its own uid into a fresh user namespace; images with several
users (``apt`` runs as ``_apt``) need more ids, which the setuid helpers ``newuidmap`` and
``newgidmap`` grant from the ranges in ``/etc/subuid`` and ``/etc/subgid``. Root can write any map
itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.errors import IdMapError

SUBORDINATE_IDS = 65536
"""How many ids a container gets at most (docker's and podman's usual range)."""


@dataclass(frozen=True)
class IdRange:
    """``size`` ids starting at ``inside`` in the container are ``outside`` on the host."""

    inside: int
    outside: int
    size: int


@dataclass(frozen=True)
class IdMapPlan:
    """The uid and gid maps of one user namespace and how to write them."""

    uids: tuple[IdRange, ...]
    gids: tuple[IdRange, ...]
    use_helpers: bool
    """``True``: run newuidmap/newgidmap. ``False``: write ``/proc/PID/*_map`` directly."""

    @property
    def multi_id(self) -> bool:
        return sum(r.size for r in self.uids) > 1


def parse_subid(text: str, user: str, uid: int) -> list[tuple[int, int]]:
    """Ranges ``(start, count)`` that ``/etc/subuid``-style ``text`` gives to ``user``/``uid``."""
    ranges = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            continue
        owner, start, count = parts
        if owner in (user, str(uid)) and start.isdigit() and count.isdigit():
            ranges.append((int(start), int(count)))
    return ranges


def plan_idmap(
    uid: int,
    gid: int,
    user: str,
    subuid_text: str,
    subgid_text: str,
    helpers_available: bool,
) -> IdMapPlan:
    """Map the caller to root inside; add subordinate ids when the host grants them.

    Root maps the container's ids 0..65535 onto root's own subordinate range when it has one,
    else onto the host's same ids (a user namespace then only limits capabilities).
    """
    if uid == 0:
        sub_u = parse_subid(subuid_text, user, uid)
        sub_g = parse_subid(subgid_text, user, uid)
        if sub_u and sub_g:
            return IdMapPlan(
                (IdRange(0, sub_u[0][0], min(sub_u[0][1], SUBORDINATE_IDS)),),
                (IdRange(0, sub_g[0][0], min(sub_g[0][1], SUBORDINATE_IDS)),),
                use_helpers=False,
            )
        return IdMapPlan(
            (IdRange(0, 0, SUBORDINATE_IDS),), (IdRange(0, 0, SUBORDINATE_IDS),), use_helpers=False
        )
    own_u, own_g = IdRange(0, uid, 1), IdRange(0, gid, 1)
    sub_u = parse_subid(subuid_text, user, uid)
    sub_g = parse_subid(subgid_text, user, uid)
    if helpers_available and sub_u and sub_g:
        u_start, u_count = sub_u[0]
        g_start, g_count = sub_g[0]
        return IdMapPlan(
            (own_u, IdRange(1, u_start, min(u_count, SUBORDINATE_IDS - 1))),
            (own_g, IdRange(1, g_start, min(g_count, SUBORDINATE_IDS - 1))),
            use_helpers=True,
        )
    return IdMapPlan((own_u,), (own_g,), use_helpers=False)


def host_plan() -> IdMapPlan:
    """The plan for the calling user on this host."""
    import pwd

    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    helpers = shutil.which("newuidmap") is not None and shutil.which("newgidmap") is not None
    return plan_idmap(uid, gid, user, _read("/etc/subuid"), _read("/etc/subgid"), helpers)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def map_text(ranges: Sequence[IdRange]) -> str:
    return "".join(f"{r.inside} {r.outside} {r.size}\n" for r in ranges)


def apply_idmap(pid: int, plan: IdMapPlan, proc: str = "/proc") -> None:
    """Write the maps of process ``pid``'s user namespace (called by its parent)."""
    if plan.use_helpers:
        for tool, ranges in (("newuidmap", plan.uids), ("newgidmap", plan.gids)):
            args = [tool, str(pid)]
            for r in ranges:
                args += [str(r.inside), str(r.outside), str(r.size)]
            res = subprocess.run(args, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise IdMapError(
                    tool, 0, f"{' '.join(args)} failed: {res.stderr.strip() or res.returncode}"
                )
        return
    try:
        if os.getuid() != 0:
            _write(f"{proc}/{pid}/setgroups", "deny")
        _write(f"{proc}/{pid}/uid_map", map_text(plan.uids))
        _write(f"{proc}/{pid}/gid_map", map_text(plan.gids))
    except OSError as e:
        raise IdMapError("write id map", e.errno or 0, f"{e.filename}: {e.strerror}") from e


def open_user_namespace(plan: IdMapPlan) -> int:
    """A new user namespace with ``plan``'s maps, held open by the returned descriptor.

    Containers join it (``setns``) instead of each making its own: the maps are written once,
    not once per container, which rootless means running the setuid ``newuidmap`` and
    ``newgidmap`` (~2.5 ms each) and a round trip with the child. Rootless podman shares one
    user namespace between a user's containers the same way; each container still gets its own
    mount, pid, network, UTS and IPC namespaces. A forked child makes the namespace and exits
    once the maps are written and the descriptor is open.
    """
    from runtime import _sys

    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a threaded process (xdist has an I/O thread); this
        # child only unshares, writes one byte, waits and _exits.
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            _sys.unshare(_sys.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)  # end of file: the parent holds the namespace (or is gone)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise IdMapError("unshare(CLONE_NEWUSER)", 0, "a child could not make a user namespace")
        apply_idmap(pid, plan)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
