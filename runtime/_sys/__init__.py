"""The only module that talks to the kernel through ctypes.

Python 3.11 lacks ``unshare``, ``setns``, ``mount``, ``pivot_root``, capabilities and most of
``prctl``; this module wraps exactly those, checks every return value and raises ``OSError``
with the errno and the call's arguments. Everything else in the engine goes through
:class:`Syscalls` (or a recording fake of it in unit tests), so the order and arguments of mounts
can be tested without privileges.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import os
import platform
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any, Protocol

# clone/unshare/setns flags (linux/sched.h)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# prctl options (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_CHILD_SUBREAPER = 36

CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"

_SYSCALL_NUMBERS = {
    "x86_64": {"pivot_root": 155, "setns": 308, "unshare": 272, "capset": 126, "capget": 125},
    "aarch64": {"pivot_root": 41, "setns": 268, "unshare": 97, "capset": 91, "capget": 90},
}
_NR = _SYSCALL_NUMBERS.get(platform.machine())

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: Callable[[], str], path: str | None = None) -> int:
    """``result``, or ``OSError`` naming the call. ``what`` is formatted only on failure: a
    container's start makes ~60 of these calls in a fork, where every line costs."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what()}: {os.strerror(err)}", path)
    return result


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
        lambda: f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})",
        target,
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), lambda: f"umount2({target!r}, {flags})", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), lambda: f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), lambda: f"setns({fd}, {nstype:#x})")


def pivot_root(new_root: str, put_old: str) -> None:
    if _NR is None:
        raise OSError(38, f"pivot_root: unsupported architecture {platform.machine()}")
    _check(
        _libc.syscall(_NR["pivot_root"], _b(new_root), _b(put_old)),
        lambda: f"pivot_root({new_root!r}, {put_old!r})",
        new_root,
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), lambda: f"prctl({option}, {arg2})")


@functools.cache
def last_cap() -> int:
    """The highest capability number this kernel knows (the engine reads it before forking)."""
    try:
        with open(CAP_LAST_CAP_PATH) as f:
            return int(f.read())
    except OSError:
        return 40


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@functools.cache
def capset_args(effective: int, permitted: int, inheritable: int) -> tuple[Any, Any]:
    """capset's header and data for these 64-bit masks, built once (before forking, by the
    engine): a container's child that builds ctypes structures pays ~60 copy-on-write faults."""
    words = [
        (m >> shift) & 0xFFFFFFFF for shift in (0, 32) for m in (effective, permitted, inheritable)
    ]
    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(struct.pack("=6I", *words), 24)
    return header, data


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (64-bit masks)."""
    if _NR is None:
        raise OSError(38, "capset: unsupported architecture")
    header, data = capset_args(effective, permitted, inheritable)
    _check(_libc.syscall(_NR["capset"], header, data), lambda: "capset")


def drop_bounding_caps(keep: int) -> None:
    """Drop every capability not in ``keep`` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last_cap() + 1):
        if not keep & (1 << cap):
            prctl(PR_CAPBSET_DROP, cap)


def set_loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace with one SIOCSIFFLAGS ioctl."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, ifreq))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


class Syscalls(Protocol):
    """The seam between plans and the kernel: the real one below, a recording fake in tests."""

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None: ...
    def umount2(self, target: str, flags: int = 0) -> None: ...
    def pivot_root(self, new_root: str, put_old: str) -> None: ...
    def mkdir(self, path: str, mode: int = 0o755) -> None: ...
    def touch(self, path: str) -> None: ...
    def mknod(self, path: str, mode: int, device: int) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def chdir(self, path: str) -> None: ...


class RealSyscalls:
    """:class:`Syscalls` on the real kernel."""

    mount = staticmethod(mount)
    umount2 = staticmethod(umount2)
    pivot_root = staticmethod(pivot_root)

    # mkdir and touch try the one syscall that usually does it first: a container's start runs
    # about twenty of them, in a fork where every line of Python costs copy-on-write faults.

    @staticmethod
    def mkdir(path: str, mode: int = 0o755) -> None:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
        except FileNotFoundError:
            os.makedirs(path, mode=mode, exist_ok=True)

    @staticmethod
    def touch(path: str) -> None:
        if os.path.lexists(path):  # never open what is there: a device, a file to copy up
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o644)
        os.close(fd)

    @staticmethod
    def mknod(path: str, mode: int, device: int) -> None:
        os.mknod(path, mode, device)
        os.chmod(path, stat.S_IMODE(mode))  # the umask applied to mknod's

    @staticmethod
    def symlink(target: str, path: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.symlink(target, path)

    @staticmethod
    def chdir(path: str) -> None:
        os.chdir(path)
