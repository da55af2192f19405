"""Capability probes: what this host can do, each with the reason when it cannot.

Probes are cheap and cached per process. They answer with a :class:`Probe` (``ok`` plus a reason
and a fix) instead of raising, so the same answer can skip a test, fail a run with a clear
message, or pick a code path (for example the user namespace as an unprivileged user).
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Probe:
    """The answer of a probe: ``ok`` and, when not, why and how to fix it."""

    ok: bool
    reason: str = ""
    fix: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


@functools.cache
def user_namespaces() -> Probe:
    """Can this process create a user namespace?"""
    if not os.path.exists("/proc/self/ns/user"):
        return Probe(False, "the kernel has no user namespaces (CONFIG_USER_NS)")
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return Probe(
            False, "user.max_user_namespaces is 0", "sysctl -w user.max_user_namespaces=15000"
        )
    if os.geteuid() != 0:
        if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
            return Probe(
                False,
                "kernel.unprivileged_userns_clone is 0",
                "sysctl -w kernel.unprivileged_userns_clone=1",
            )
        if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
            return Probe(
                False,
                "AppArmor restricts unprivileged user namespaces (Ubuntu 24.04 default)",
                "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or run as root",
            )
    return _try_unshare_user()


def _try_unshare_user() -> Probe:
    # A real attempt in a throwaway child: seccomp filters (Docker's default profile) only show
    # themselves when the syscall is made.
    from runtime._sys import CLONE_NEWUSER, unshare

    pid = os.fork()
    if pid == 0:
        try:
            unshare(CLONE_NEWUSER)
            code = 0
        except OSError as e:
            code = 100 + (e.errno or 0) % 100
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return Probe(True)
    err = code - 100
    return Probe(
        False,
        f"unshare(CLONE_NEWUSER) failed: {os.strerror(err)} "
        "(a seccomp profile, AppArmor or a sysctl forbids it)",
        "allow user namespaces on the host, or run as root",
    )


@functools.cache
def overlayfs() -> Probe:
    """Does the kernel know overlayfs?"""
    fs = _read("/proc/filesystems") or ""
    if "overlay" in fs.split():
        return Probe(True)
    if os.geteuid() == 0 and shutil.which("modprobe"):
        os.system("modprobe overlay >/dev/null 2>&1")
        fs = _read("/proc/filesystems") or ""
        if "overlay" in fs.split():
            return Probe(True)
    return Probe(False, "overlayfs is not in /proc/filesystems", "modprobe overlay")


@functools.cache
def newuidmap() -> Probe:
    """Are the setuid helpers for multi-id user namespace maps installed?"""
    missing = [t for t in ("newuidmap", "newgidmap") if shutil.which(t) is None]
    if missing:
        return Probe(False, f"{' and '.join(missing)} not found", "apt-get install uidmap")
    return Probe(True)


def is_root() -> bool:
    return os.geteuid() == 0
