"""The container's process: who it runs as, with which environment and capabilities.

Resolution is pure (it takes the text of the container's ``/etc/passwd`` and ``/etc/group``);
:func:`drop_privileges` applies the result in the child, after ``pivot_root``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass

from runtime import _sys
from runtime.errors import SpecError

CAPS = {
    name: i
    for i, name in enumerate(
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        ]
    )
}

DOCKER_DEFAULT_CAPS = frozenset(
    [
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    ]
)
"""Docker's default set: enough for package managers and servers, no SYS_ADMIN."""

DEFAULT_CAPS = DOCKER_DEFAULT_CAPS - {"MKNOD"}
"""A container's set: docker's without ``MKNOD``.

Docker pairs ``MKNOD`` with a device cgroup that lets a container open only its own few
devices. There is no such cgroup here (yet), so a root container could make a node for any
device of the host on its ``/dev`` and open it (seen: ``/dev/fuse``; on a usual host, the
disk's block device). Without ``MKNOD`` it cannot make one, and the layers are mounted
``nodev``, so a node shipped in an image opens nothing either. FIFOs need no capability.
"""


def cap_mask(names: frozenset[str] | set[str]) -> int:
    mask = 0
    for name in names:
        key = name.upper().removeprefix("CAP_")
        if key not in CAPS:
            raise SpecError(f"unknown capability {name!r}")
        mask |= 1 << CAPS[key]
    return mask


@dataclass(frozen=True)
class User:
    """A resolved user: ids, supplementary groups and home."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    name: str


ROOT = User(0, 0, (), "/root", "root")


def _passwd_entries(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(spec: str | None, passwd: str, group: str) -> User:
    """Resolve docker's ``USER`` forms: ``name``, ``uid``, ``name:group``, ``uid:gid``.

    A numeric uid that ``/etc/passwd`` does not know is allowed (docker allows it) with gid 0
    and home ``/``; an unknown *name* is an error.
    """
    user_part, _, group_part = (spec or "0").partition(":")
    users = _passwd_entries(passwd)
    groups = _passwd_entries(group)
    entry = next(
        (e for e in users if len(e) >= 7 and (e[0] == user_part or e[2] == user_part)), None
    )
    if entry is not None:
        uid, gid, home, name = int(entry[2]), int(entry[3]), entry[5] or "/", entry[0]
    elif user_part.isdigit():
        uid, gid, home, name = int(user_part), 0, "/", user_part
    else:
        raise SpecError(f"unable to find user {user_part!r}: no matching entries in /etc/passwd")
    if group_part:
        g = next(
            (e for e in groups if len(e) >= 3 and (e[0] == group_part or e[2] == group_part)), None
        )
        if g is not None:
            gid = int(g[2])
        elif group_part.isdigit():
            gid = int(group_part)
        else:
            raise SpecError(
                f"unable to find group {group_part!r}: no matching entries in /etc/group"
            )
        extra: tuple[int, ...] = ()
    else:
        extra = tuple(
            sorted(
                {
                    int(e[2])
                    for e in groups
                    if len(e) >= 4
                    and e[2].isdigit()
                    and name in e[3].split(",")
                    and int(e[2]) != gid
                }
            )
        )
    return User(uid, gid, extra, home, name)


def container_env(env: Mapping[str, str], user: User, hostname: str, tty: bool) -> dict[str, str]:
    """The environment the process gets: the spec's, plus what docker always sets."""
    out = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    out["HOSTNAME"] = hostname
    out.update(env)
    out.setdefault("HOME", user.home)
    if tty:
        out.setdefault("TERM", "xterm")
    return out


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


SINGLE_ID_HINT = (
    "cannot switch to user {user} ({uid}:{gid}): this user namespace maps only your own uid. "
    "Images with several users need subordinate ids: install newuidmap/newgidmap (Debian: "
    "apt-get install uidmap) and give your user ranges in /etc/subuid and /etc/subgid "
    "(usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $USER)"
)


def _single_id_map() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            lines = f.read().split("\n")
    except OSError:
        return False
    ranges = [line.split() for line in lines if line.strip()]
    return len(ranges) == 1 and ranges[0][2] == "1"


def prepare_privileges(caps: int) -> None:
    """Compute, before forking, what :func:`drop_privileges` reads: a container's child that
    reads a file or builds ctypes structures pays for it in copy-on-write faults (~0.3 ms)."""
    _sys.last_cap()
    _sys.capset_args(caps, caps, 0)


def drop_privileges(user: User, caps: int) -> None:
    """No new privileges, a reduced bounding set, then the user's ids.

    Order matters: the bounding set needs CAP_SETPCAP, which ``setuid`` to a non-root user
    removes; ``no_new_privs`` makes setuid binaries and file capabilities inert after exec.
    """
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    _sys.drop_bounding_caps(caps)
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        _sys.prctl(_sys.PR_CAP_AMBIENT, _sys.PR_CAP_AMBIENT_CLEAR_ALL)
    try:
        try:
            os.setgroups(list(user.groups))
        except PermissionError:
            # A single-id user namespace denies setgroups; with no groups to set, that is fine.
            if user.groups:
                raise
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EPERM) and _single_id_map():
            raise OSError(
                e.errno, SINGLE_ID_HINT.format(user=user.name, uid=user.uid, gid=user.gid)
            ) from e
        raise
    if user.uid == 0:
        _sys.capset(caps, caps, 0)
