"""Starting a container: caller -> intermediate -> init, with one control socket.

The sequence (each stage sets ``PR_SET_PDEATHSIG`` and checks that its parent is still there,
so nothing outlives a SIGKILLed caller)::

    caller        fork ──────────────┐
                                     intermediate: [setns(the engine's user ns)]
                                     unshare mnt/uts/ipc/net/cgroup/pid
                                     fork ──────────────┐
                                     send "init" pid    init (PID 1): mounts, pivot_root,
                                     wait, mirror exit  hostname, loopback, user, privileges,
                                                        then: exec | spawn + reap | callable

The intermediate mirrors the init's exit (code, or the same signal), so the caller's
``waitpid`` says exactly how the container ended. The user namespace is made once per engine,
its maps written then (:func:`runtime.idmap.open_user_namespace`). As root without a user
namespace there is no intermediate: the caller forks the init directly into a new pid namespace
(see :func:`_fork_into_new_pid_namespace`), which saves a fork of a possibly large caller; its
namespaces other than pid may have been made ahead (:mod:`runtime.prepare`), and the init then
joins them (``LaunchPlan.joined``) and mounts only ``/proc``. Any
failure in a stage is sent as ``{"t": "error", "stage", "errno", "detail"}`` and the stage
exits: a container never runs its workload half-isolated.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import pickle
import resource
import select
import shutil
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runtime import _sys, control, process, rootfs
from runtime.errors import (
    CallableError,
    ContainerError,
    ExecError,
    IdMapError,
    SetupError,
)
from runtime.idmap import IdMapPlan

FORWARDED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)
SETUP_FAILED = 125
"""Exit code of a stage that failed before the workload ran (docker uses 125 for this too)."""


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the stage processes need, decided by the engine before forking."""

    ns_flags: int
    idmap: IdMapPlan | None
    mounts: tuple[rootfs.Op, ...]
    hostname: str
    argv: tuple[str, ...] | None
    env: dict[str, str]
    cwd: str
    user: str | None
    caps: int
    tty: bool = False
    init: bool = True
    pass_fds: tuple[int, ...] = ()
    close_fds: bool = True
    userns_fd: int | None = None
    """A user namespace with ``idmap`` applied, held by the engine: join it, make none."""
    private_fds: tuple[int, ...] = ()
    """The engine's own descriptors (its helper's socket): closed first thing in the child,
    even when it keeps the caller's others (a callable). A root helper must never be within
    a container's reach."""
    joined: tuple[int, ...] = ()
    """Namespaces set up ahead of time (:mod:`runtime.prepare`): join these instead of making
    new ones (all but the pid namespace); ``mounts`` then holds only what must happen inside
    the new pid namespace (its ``/proc``), and hostname and loopback are already done."""


@dataclass(frozen=True)
class ExitStatus:
    """How a container's process ended: an exit ``code`` or a terminating ``signal``."""

    code: int | None
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        """Docker's single number: the code, or 128 + the signal."""
        return self.code if self.code is not None else 128 + (self.signal or 0)

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.WEXITSTATUS(status))

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with code {self.code}"


class ContainerProcess:
    """A started container: its stage processes, control socket and (with a tty) pty master."""

    def __init__(self, pid: int, sock: socket.socket, alive_w: int | None = None) -> None:
        self.pid = pid
        self._alive_w = alive_w
        self.init_pid: int | None = None
        self.workload_pid: int | None = None
        self.sock = sock
        self.pty_master: int | None = None
        self._status: ExitStatus | None = None
        self._pidfd: int | None = None
        self.early_result: bytes | None = None

    @property
    def returncode(self) -> ExitStatus | None:
        return self._status

    def set_status(self, wait_status: int) -> None:
        """Record an exit already reaped by the caller (``waitpid`` with ``WNOHANG``)."""
        self._status = ExitStatus.from_wait_status(wait_status)
        self.close()

    def _handle(self, msg: dict[str, Any] | bytes | None) -> None:
        if not isinstance(msg, dict):
            return
        t = msg.get("t")
        if t == "init":
            self.init_pid = msg["pid"]
        elif t == "error":
            raise _error_from(msg)

    def wait_ready(self) -> None:
        """Wait until the workload is running; raise the child's setup error (the container
        is then killed and reaped)."""
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            with contextlib.suppress(ChildProcessError):
                self.wait()
            raise

    def _wait_ready(self) -> None:
        while True:
            msg = control.recv(self.sock)
            if msg is None:
                self._fail_early("the container died during setup")
            self._handle(msg)
            if isinstance(msg, dict) and msg.get("t") == "ready":
                self.workload_pid = msg.get("pid")
                if msg.get("pty"):
                    _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
                    self.pty_master = fds[0]
                while self.init_pid is None:
                    # The intermediate's "init" frame is in flight; a callable's result may
                    # overtake it and is kept for callable_result().
                    frame = control.recv(self.sock)
                    if frame is None:
                        break
                    if isinstance(frame, bytes):
                        self.early_result = frame
                    else:
                        self._handle(frame)
                return

    def _fail_early(self, what: str) -> None:
        status = self.wait()
        raise SetupError("start", 0, f"{what} ({status})")

    def fileno_for_wait(self) -> int:
        if self._pidfd is None:
            self._pidfd = os.pidfd_open(self.pid)
        return self._pidfd

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the container to end; ``TimeoutError`` after ``timeout`` seconds."""
        if self._status is not None:
            return self._status
        if timeout is not None:
            ready, _, _ = select.select([self.fileno_for_wait()], [], [], timeout)
            if not ready:
                raise TimeoutError(f"container still running after {timeout} s")
        _, status = _waitpid(self.pid)
        result = ExitStatus.from_wait_status(status)
        # The init reports a workload's death by signal itself: as PID 1 it cannot re-raise it.
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            while True:
                msg = control.recv(self.sock)
                if msg is None:
                    break
                if isinstance(msg, dict) and msg.get("t") == "exit" and msg.get("signal"):
                    result = ExitStatus(None, msg["signal"])
        self._status = result
        self.close()
        return result

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the container. SIGKILL goes to PID 1, which takes the whole pid namespace down."""
        target = self.init_pid if self.init_pid else self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def close(self) -> None:
        self.sock.close()
        for fd in (self._pidfd, self.pty_master, self._alive_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = self.pty_master = self._alive_w = None


def _waitpid(pid: int) -> tuple[int, int]:
    while True:
        try:
            return os.waitpid(pid, 0)
        except InterruptedError:
            continue


def _error_from(msg: dict[str, Any]) -> ContainerError:
    if msg.get("kind") == "exec":
        return ExecError(msg.get("argv0", "?"), msg.get("errno", 0), msg.get("detail", ""))
    if msg.get("kind") == "spec":
        return SetupError(msg["stage"], 0, msg.get("detail", ""))
    cls = IdMapError if msg.get("stage") == "userns" else SetupError
    return cls(msg.get("stage", "?"), msg.get("errno", 0), msg.get("detail", ""))


def start(
    plan: LaunchPlan,
    stdio: Sequence[int | None] = (None, None, None),
    target: Callable[[], Any] | None = None,
    wait: bool = True,
) -> ContainerProcess:
    """Fork the stages of a container and return once its workload runs (or raise why not).

    With ``wait=False`` return right after the fork: the caller goes on while the container
    sets itself up, and calls :meth:`ContainerProcess.wait_ready` before it relies on it
    (a setup error is raised there).
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    direct = plan.idmap is None and os.geteuid() == 0
    caller = os.getpid()
    alive_r, alive_w = os.pipe()  # EOF on alive_r tells a child its caller is gone
    flush_stdio()
    try:
        pid = _fork_into_new_pid_namespace() if direct else os.fork()
    except BaseException:
        os.close(alive_r)
        os.close(alive_w)
        raise
    if pid == 0:  # pragma: no cover - runs in the child
        parent_sock.close()
        os.close(alive_w)
        for fd in plan.private_fds:
            os.close(fd)
        if direct:
            _direct_init(plan, child_sock, stdio, target, alive_r)
        os.close(alive_r)
        _intermediate(plan, child_sock, caller, stdio, target)
    child_sock.close()
    os.close(alive_r)
    proc = ContainerProcess(pid, parent_sock, alive_w)
    if direct:
        proc.init_pid = pid
    if wait:
        proc.wait_ready()
    return proc


def flush_stdio() -> None:
    """Flush Python's ``sys.stdout``/``sys.stderr`` before forking the caller.

    A child inherits what the caller had buffered; a child that flushes those streams (a test
    run by the pytest plugin prints its report lines) would print it a second time. Seen for
    real: a pytest session writing to a pipe printed ``building ...`` twice, rootless.
    ``multiprocessing`` flushes before its forks for the same reason.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, detached or replaced: nothing to keep
            stream.flush()


_own_pid_ns: int | None = None


def _fork_into_new_pid_namespace() -> int:
    """Fork a child that is PID 1 of a new pid namespace, without an intermediate process.

    ``unshare(CLONE_NEWPID)`` only changes where this process's *next* child goes; joining our
    own pid namespace again right after the fork puts it back. Saves a fork of the (possibly
    large) caller, which costs milliseconds. Needs CAP_SYS_ADMIN, so root only.
    """
    global _own_pid_ns
    if _own_pid_ns is None:
        _own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    _sys.unshare(_sys.CLONE_NEWPID)
    try:
        return os.fork()
    finally:
        if os.getpid() != 1:
            _sys.setns(_own_pid_ns, _sys.CLONE_NEWPID)


def _direct_init(
    plan: LaunchPlan,
    sock: socket.socket,
    stdio: Sequence[int | None],
    target: Callable[[], Any] | None,
    alive_r: int,
) -> None:  # pragma: no cover - runs in the child
    stage = _Stage(sock)
    try:
        _set_pdeathsig_or_exit(lambda: _pipe_open(alive_r))
        os.close(alive_r)
        _setup_stdio(stdio)
        stage.name = "namespaces"
        if plan.joined:
            for fd in plan.joined:
                _sys.setns(fd, 0)
                os.close(fd)
        else:
            _sys.unshare(plan.ns_flags & ~_sys.CLONE_NEWPID)
    except BaseException as e:
        stage.fail(e)
    _init(plan, sock, target, parent_alive=lambda: True)


class _Stage:
    """Reports the failing stage and errno on the control socket, then exits."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.name = "start"

    def fail(self, exc: BaseException) -> None:
        msg: dict[str, Any] = {"t": "error", "stage": self.name, "errno": 0, "detail": str(exc)}
        if isinstance(exc, ExecError):
            msg.update(kind="exec", argv0=exc.argv0, errno=exc.errno, detail=exc.detail)
        elif isinstance(exc, OSError):
            msg.update(errno=exc.errno or 0, detail=exc.strerror or str(exc))
        elif isinstance(exc, ValueError):
            msg.update(kind="spec")
        try:
            control.send(self.sock, msg)
        finally:
            os._exit(SETUP_FAILED)


def _set_pdeathsig_or_exit(parent_alive: Callable[[], bool]) -> None:
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
    if not parent_alive():  # the parent died between fork and prctl
        os._exit(SETUP_FAILED)


def _intermediate(
    plan: LaunchPlan,
    sock: socket.socket,
    caller: int,
    stdio: Sequence[int | None],
    target: Callable[[], Any] | None,
) -> None:  # pragma: no cover - runs in the child
    stage = _Stage(sock)
    try:
        _set_pdeathsig_or_exit(lambda: os.getppid() == caller)
        _setup_stdio(stdio)
        if plan.userns_fd is not None:
            stage.name = "userns"
            _sys.setns(plan.userns_fd, _sys.CLONE_NEWUSER)
        stage.name = "namespaces"
        _sys.unshare(plan.ns_flags)
        alive_r, alive_w = os.pipe()
        stage.name = "fork init"
        pid = os.fork()
        if pid == 0:
            os.close(alive_w)
            _init(plan, sock, target, parent_alive=lambda: _pipe_open(alive_r))
        os.close(alive_r)
        control.send(sock, {"t": "init", "pid": pid})
    except BaseException as e:
        stage.fail(e)
    try:
        sock.close()
    finally:
        _mirror_exit(pid)


def _setup_stdio(stdio: Sequence[int | None]) -> None:
    # Duplicate above 2 first, so that a target fd that is itself 0..2 is not clobbered.
    high = [None if fd is None else os.dup(fd) for fd in stdio]
    for i, fd in enumerate(high):
        if fd is not None:
            os.dup2(fd, i)
            os.close(fd)


def _mirror_exit(pid: int) -> None:  # pragma: no cover - runs in the child
    """Exit exactly as ``pid`` did, so the caller's waitpid sees the container's own status."""
    code = SETUP_FAILED
    try:
        _, status = _waitpid(pid)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these have no handler to reset
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else SETUP_FAILED
    finally:
        os._exit(code)


def _init(
    plan: LaunchPlan,
    sock: socket.socket,
    target: Callable[[], Any] | None,
    parent_alive: Callable[[], bool],
) -> None:  # pragma: no cover - runs in the child
    stage = _Stage(sock)
    try:
        _set_pdeathsig_or_exit(parent_alive)
        stage.name = "mounts"
        rootfs.apply(plan.mounts, _sys.RealSyscalls())
        stage.name = "hostname"
        if not plan.joined:
            socket.sethostname(plan.hostname)
        if plan.ns_flags & _sys.CLONE_NEWNET and not plan.joined:
            stage.name = "network"
            _sys.set_loopback_up()
        stage.name = "user"
        if plan.user is None and target is not None:
            user = process.ROOT  # a callable keeps the caller's environment; no HOME to look up
        else:
            user = process.resolve_user(
                plan.user, process.read_text("/etc/passwd"), process.read_text("/etc/group")
            )
        stage.name = "workdir"
        try:
            os.chdir(plan.cwd)
        except FileNotFoundError:  # docker creates a missing working directory
            os.makedirs(plan.cwd)
            os.chdir(plan.cwd)
        master = slave_path = None
        if plan.tty:
            stage.name = "tty"
            master, slave = os.openpty()
            slave_path = os.ttyname(slave)
            os.close(slave)
        stage.name = "close fds"
        keep = {0, 1, 2, sock.fileno(), *plan.pass_fds}
        if master is not None:
            keep.add(master)
        if plan.close_fds:
            _close_fds_except(keep)
        for fd in plan.pass_fds:
            os.set_inheritable(fd, True)
        exe = None
        env: dict[str, str] = {}  # a callable keeps the caller's environment
        if plan.argv is not None:
            env = process.container_env(plan.env, user, plan.hostname, plan.tty)
            stage.name = "exec"
            exe = _find_executable(plan.argv[0], env.get("PATH", ""))
        stage.name = "privileges"
        if slave_path is not None:
            os.chown(slave_path, user.uid, user.gid)
        process.drop_privileges(user, plan.caps)
        if target is not None:
            _run_callable(sock, target)
        if plan.argv is None:
            _idle(sock)
        assert exe is not None and plan.argv is not None
        if plan.init:
            stage.name = "spawn"
            _spawn_and_reap(plan, sock, exe, env, master, slave_path)
        stage.name = "exec"
        if slave_path is not None:
            os.setsid()
            fd = os.open(slave_path, os.O_RDWR)
            for i in range(3):
                os.dup2(fd, i)
            _send_ready(sock, None, master)
        else:
            _send_ready(sock, None, None)
        _reset_signals()
        os.execve(exe, list(plan.argv), env)
    except BaseException as e:
        stage.fail(e)


def _pipe_open(fd: int) -> bool:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) != b""
    except BlockingIOError:
        return True


def _close_fds_except(keep: set[int]) -> None:
    """Close every other fd: a ``close_range`` per gap between the kept ones (CPython's
    ``closerange`` uses it), instead of listing ``/proc/self/fd`` and closing one by one."""
    low = 0
    for fd in sorted(keep):
        if fd > low:  # never an empty range: closerange(0, 0) asks close_range(0, ~0)
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(low + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def _find_executable(argv0: str, path: str) -> str:
    """Resolve ``argv0`` with the container's ``PATH``, as docker does before exec."""
    if "/" in argv0:
        if not os.path.exists(argv0):
            raise ExecError(argv0, errno_mod.ENOENT, "no such file or directory")
        return argv0
    found = shutil.which(argv0, path=path)
    if found is None:
        raise ExecError(argv0, errno_mod.ENOENT, "executable file not found in $PATH")
    return found


def _send_ready(sock: socket.socket, pid: int | None, master: int | None) -> None:
    control.send(sock, {"t": "ready", "pid": pid, "pty": master is not None})
    if master is not None:
        socket.send_fds(sock, [b"m"], [master])
        os.close(master)


def _reset_signals() -> None:
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _spawn_and_reap(
    plan: LaunchPlan,
    sock: socket.socket,
    exe: str,
    env: dict[str, str],
    master: int | None,
    slave_path: str | None,
) -> None:  # pragma: no cover - runs in the child
    """PID 1 as a tiny init: spawn the workload as PID 2, forward signals, reap everything."""
    assert plan.argv is not None
    actions: list[tuple[Any, ...]] = []
    if slave_path is not None:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, slave_path, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
    try:
        child = os.posix_spawn(
            exe,
            list(plan.argv),
            env,
            file_actions=actions,
            setsid=slave_path is not None,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS),
            setsigmask=(),
        )
    except OSError as e:
        raise ExecError(plan.argv[0], e.errno or 0) from e
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda s, _f: _forward(child, s))
    _send_ready(sock, child, master)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        with contextlib.suppress(OSError):
            control.send(sock, {"t": "exit", "signal": os.WTERMSIG(status)})
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def _idle(sock: socket.socket) -> None:  # pragma: no cover - runs in the child
    """PID 1 of a container that waits for ``exec``: reap orphans until SIGTERM or SIGKILL."""
    signal.signal(signal.SIGTERM, lambda _s, _f: os._exit(0))
    signal.signal(signal.SIGINT, lambda _s, _f: os._exit(0))
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # so that pause() returns to reap
    _send_ready(sock, None, None)
    sock.close()
    while True:
        try:
            os.wait()
        except ChildProcessError:
            signal.pause()


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _run_callable(sock: socket.socket, target: Callable[[], Any]) -> None:  # pragma: no cover
    """Run ``target`` as PID 1 and send its result or exception back; never returns."""
    _send_ready(sock, None, None)
    code = 0
    try:
        result = target()
        payload = pickle.dumps(("ok", result))
    except BaseException as e:
        code = 1
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(("raise", e, tb))
        except Exception:
            payload = pickle.dumps(("error", type(e).__qualname__, str(e), tb))
    try:
        control.send_blob(sock, payload)
    except Exception:
        code = SETUP_FAILED
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def callable_result(proc: ContainerProcess, timeout: float | None = None) -> Any:
    """Read what :func:`_run_callable` sent: return the value or raise the exception."""
    if timeout is not None:
        ready, _, _ = select.select([proc.sock], [], [], timeout)
        if not ready:
            raise TimeoutError(f"callable still running after {timeout} s")
    payload = proc.early_result
    while payload is None:
        frame = control.recv(proc.sock)
        if frame is None or isinstance(frame, bytes):
            payload = frame
            break
        proc._handle(frame)  # a late control frame ("init") is not the result
    status = proc.wait()
    if not isinstance(payload, bytes):
        raise ContainerError(f"the container ended without a result ({status})")
    outcome = pickle.loads(payload)
    if outcome[0] == "ok":
        return outcome[1]
    if outcome[0] == "raise":
        exc = outcome[1]
        exc.__notes__ = [*getattr(exc, "__notes__", []), f"Remote traceback:\n{outcome[2]}"]
        raise exc
    raise CallableError(outcome[1], outcome[2], outcome[3])
