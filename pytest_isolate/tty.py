"""``run -it``: connect the caller's terminal to the container's pseudo-terminal.

The container allocates its pty inside its own ``/dev/pts`` (so ``tty`` and job control work
there) and sends the master to us. We put our terminal in raw mode, copy bytes both ways, and
pass window size changes on; keys like Ctrl-C travel as bytes and become signals inside, through
the container's own line discipline.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import sys
import termios
import tty

from runtime.launch import ContainerProcess


def _copy_winsize(src: int, dst: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)


def proxy(master: int, proc: ContainerProcess, interactive: bool) -> None:
    """Copy between our stdin/stdout and ``master`` until the container's side closes."""
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    if is_tty:
        _copy_winsize(stdin, master)
        signal.signal(signal.SIGWINCH, lambda _s, _f: _copy_winsize(stdin, master))
        if interactive:
            tty.setraw(stdin)
    try:
        sources = [master, stdin] if interactive else [master]
        while True:
            ready, _, _ = select.select(sources, [], [])
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave closed
                    data = b""
                if not data:
                    break
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 65536)
                if not data:
                    sources.remove(stdin)
                    os.write(master, b"\x04")  # EOF for the line discipline
                else:
                    os.write(master, data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, signal.SIG_DFL)
