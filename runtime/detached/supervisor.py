"""The supervisor of a detached container: the process that holds it between commands.

There is no daemon. ``run -d`` starts one supervisor per container (the conmon model)::

    pytest-isolate run -d ──spawn──> python (new session) ──fork──> supervisor ──> container
          reads "ready" <──────────── stdout pipe ─────────────────┘   │ owns the state dir
                                                                       │ logs stdout/stderr
    pytest-isolate stop/exec/... ──── ctl.sock ───────────────────────>│ answers requests

The supervisor is exec'd fresh (``python -m runtime.detached``) rather than forked from the
command, so it carries nothing of its caller (a pytest session, locks, threads) for its whole
life. It forks once more so that it is not a session leader and its starter's ``waitpid``
returns at once;
then it creates the container with the engine, writes the record, reports ``ready`` on its
stdout, points its stdio at ``/dev/null`` and serves ``ctl.sock`` until the container is
removed. A stopped container stays (its upper layer with it), so ``diff`` and ``commit`` work
on it, as in docker.

Nothing outlives the supervisor: the container's processes have ``PR_SET_PDEATHSIG`` tied to it
(a SIGKILLed supervisor takes its container's PID 1, and with it the pid namespace, down), the
container's mounts live in the container's mount namespace, and the state directory is
``flock``-owned by the supervisor, so the next command's :func:`runtime.state.sweep` removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from runtime import control, state
from runtime.detached import logs, protocol
from runtime.detached.record import (
    EXITED,
    LOG,
    RUNNING,
    ContainerRecord,
    generate_name,
    live_records,
    new_id,
    now,
    validate_name,
    write_record,
)
from runtime.engine import Container, Engine, Helper
from runtime.errors import ContainerError, ContainerStateError, IsolateError, SpecError
from runtime.launch import ExitStatus
from runtime.spec import BindMount, ContainerSpec, Rootfs, TmpfsMount

__all__ = ["Launch", "main", "parse_signal", "spawn", "spec_from_dict", "spec_to_dict"]

DRAIN_GRACE = 2.0
"""Seconds the output pipes get to reach end-of-file after the container's PID 1 was reaped."""

REQUEST_TIMEOUT = 10.0
"""Seconds a client gets to send its request after connecting."""


# --- what the starter sends (pure) ----------------------------------------------------------------


def spec_to_dict(spec: ContainerSpec) -> dict[str, Any]:
    """A :class:`ContainerSpec` as JSON data; ``pass_fds`` cannot cross a process boundary."""
    if spec.pass_fds:
        raise SpecError("a detached container cannot be passed file descriptors")
    return {
        "rootfs": {
            "lowers": list(spec.rootfs.lowers),
            "host": spec.rootfs.host,
            "host_paths": list(spec.rootfs.host_paths),
        },
        "argv": None if spec.argv is None else list(spec.argv),
        "env": dict(spec.env),
        "cwd": spec.cwd,
        "user": spec.user,
        "hostname": spec.hostname,
        "binds": [[b.source, b.target, b.readonly] for b in spec.binds],
        "tmpfs": [[t.target, t.options] for t in spec.tmpfs],
        "read_only": spec.read_only,
        "userns": spec.userns,
        "network": spec.network,
        "tty": spec.tty,
        "init": spec.init,
        "name": spec.name,
    }


def spec_from_dict(data: Mapping[str, Any]) -> ContainerSpec:
    """The inverse of :func:`spec_to_dict`; the spec validates itself again."""
    rootfs = data["rootfs"]
    return ContainerSpec(
        rootfs=Rootfs(
            lowers=tuple(rootfs["lowers"]),
            host=bool(rootfs["host"]),
            host_paths=tuple(rootfs["host_paths"]),
        ),
        argv=None if data["argv"] is None else tuple(data["argv"]),
        env=dict(data["env"]),
        cwd=data["cwd"],
        user=data["user"],
        hostname=data["hostname"],
        binds=tuple(BindMount(s, t, bool(ro)) for s, t, ro in data["binds"]),
        tmpfs=tuple(TmpfsMount(t, o) for t, o in data["tmpfs"]),
        read_only=bool(data["read_only"]),
        userns=data["userns"],
        network=data["network"],
        tty=bool(data["tty"]),
        init=bool(data["init"]),
        name=data["name"],
    )


def parse_signal(text: str) -> int:
    """A signal as docker's ``--signal`` and ``STOPSIGNAL`` take it: ``SIGTERM``, ``TERM``,
    ``15``, ``SIGRTMIN+3``. :class:`SpecError` names what was not understood."""
    value = text.strip().upper()
    if value.isdigit():
        number = int(value)
        if 0 < number < signal.NSIG:
            return number
        raise SpecError(f"invalid signal {text!r}: no signal has number {number}")
    name = value if value.startswith("SIG") else f"SIG{value}"
    for base, start, sign in (
        ("SIGRTMIN", signal.SIGRTMIN, 1),
        ("SIGRTMAX", signal.SIGRTMAX, -1),
    ):
        if name == base or name.startswith((base + "+", base + "-")):
            offset = name[len(base) :]
            step = int(offset[1:]) if offset[1:].isdigit() else None
            if offset and (step is None or offset[0] != ("+" if sign > 0 else "-")):
                raise SpecError(f"invalid signal {text!r}")
            number = start + sign * (step or 0)
            if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
                return number
            raise SpecError(f"invalid signal {text!r}: outside SIGRTMIN..SIGRTMAX")
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise SpecError(f"invalid signal {text!r}") from None


@dataclass(frozen=True)
class Launch:
    """Everything a supervisor needs to create and describe its container."""

    spec: ContainerSpec
    state_root: str
    image: str
    image_id: str | None = None
    name: str | None = None
    stop_signal: str | None = None
    auto_remove: bool = False

    def __post_init__(self) -> None:
        if self.spec.argv is None:
            raise SpecError("a detached container needs a command")
        if self.name is not None:
            validate_name(self.name)
        if self.stop_signal is not None:
            parse_signal(self.stop_signal)

    def to_json(self) -> str:
        return json.dumps(
            {
                "spec": spec_to_dict(self.spec),
                "state_root": self.state_root,
                "image": self.image,
                "image_id": self.image_id,
                "name": self.name,
                "stop_signal": self.stop_signal,
                "auto_remove": self.auto_remove,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Launch:
        data = json.loads(text)
        return cls(
            spec=spec_from_dict(data["spec"]),
            state_root=data["state_root"],
            image=data["image"],
            image_id=data["image_id"],
            name=data["name"],
            stop_signal=data["stop_signal"],
            auto_remove=bool(data["auto_remove"]),
        )


# --- the starter's side -------------------------------------------------------------------------


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def spawn(launch: Launch, python: str = sys.executable) -> str:
    """Start a supervisor for ``launch``; return the container's id once its command runs.

    Whatever stopped the container from starting (a name in use, an unknown command, a setup
    failure) is raised here as the engine raised it in the supervisor, which then removed all
    it had made and exited.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_package_root(), env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.Popen(
        [python, "-P", "-m", "runtime.detached"],  # -P: nothing from the cwd shadows runtime
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=env,
        start_new_session=True,
    )
    # Both pipes end when the supervisor reports (and detaches its stdio) or dies.
    out, err = proc.communicate(launch.to_json().encode())
    line = out.decode(errors="replace").strip()
    try:
        reply = json.loads(line) if line else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        detail = (err.decode(errors="replace").strip() or line or "no output")[-4000:]
        raise ContainerError(f"the container's supervisor failed to start: {detail}")
    if not reply.get("ok"):
        raise protocol.decode_error(reply.get("error") or {})
    return str(reply["id"])


# --- the supervisor -----------------------------------------------------------------------------


@dataclass
class _Exec:
    """An ``exec`` in flight: its helper process and the client waiting for its status."""

    helper: Helper
    conn: socket.socket
    pidfd: int


@dataclass
class _Output:
    stream: str
    fd: int


@dataclass
class Supervisor:
    """Creates one container, then serves requests for it until it is removed."""

    launch: Launch
    engine: Engine = field(init=False)
    record: ContainerRecord = field(init=False)
    container: Container | None = None
    _sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    _listener: socket.socket | None = None
    _log: BinaryIO | None = None
    _outputs: list[_Output] = field(default_factory=list)
    _execs: list[_Exec] = field(default_factory=list)
    _waiters: list[socket.socket] = field(default_factory=list)
    _status: ExitStatus | None = None
    _reaped_at: float | None = None
    _kill_at: float | None = None
    """When (monotonic) a ``stop`` escalates to SIGKILL."""
    _done: bool = False

    def __post_init__(self) -> None:
        self.engine = Engine(Path(self.launch.state_root))

    @property
    def root(self) -> Path:
        return Path(self.launch.state_root)

    @property
    def _dir(self) -> Path:
        assert self.container is not None
        return self.container.state_dir

    def _update(self, **changes: Any) -> None:
        self.record = self.record.evolve(**changes)
        write_record(self._dir, self.record)

    # --- create and start ---

    def create(self) -> None:
        """Check the name, create the container and its record under the root lock.

        The lock makes "is the name free?" and "take it" one step against every other
        supervisor of the same state root; a container whose supervisor died does not hold its
        name (the sweep goes first).
        """
        launch = self.launch
        with state.root_lock(self.root):
            state.sweep(self.root)
            others = live_records(self.root)
            if launch.name is not None:
                clash = next((r for r in others if r.name == launch.name), None)
                if clash is not None:
                    raise ContainerError(
                        f'the container name "{launch.name}" is already in use by container '
                        f"{clash.short_id} ({clash.id}); remove it (rm -f {launch.name}) or "
                        "choose another name"
                    )
            name = launch.name or generate_name(r.name for r in others)
            cid = new_id()
            self.container = self.engine.create(launch.spec, container_id=cid)
            self._listener = protocol.bind(self._dir)
            assert launch.spec.argv is not None
            self.record = ContainerRecord(
                id=cid,
                name=name,
                image=launch.image,
                image_id=launch.image_id,
                command=launch.spec.argv,
                created=now(),
                supervisor=os.getpid(),
                stop_signal=launch.stop_signal,
                auto_remove=launch.auto_remove,
            )
            write_record(self._dir, self.record)

    def start(self) -> None:
        """Start the command with its output going to pipes this process drains to the log."""
        assert self.container is not None
        self._log = open(self._dir / LOG, "ab", buffering=0)  # noqa: SIM115 - lives until remove
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._outputs = [_Output(logs.STDOUT, out_r), _Output(logs.STDERR, err_r)]
        try:
            proc = self.container.start((devnull, out_w, err_w))
        finally:
            for fd in (devnull, out_w, err_w):
                os.close(fd)
        self._update(state=RUNNING, pid=proc.init_pid, started_at=now())

    def abort(self) -> None:
        """Undo :meth:`create` / :meth:`start` after a failure (idempotent)."""
        for out in self._outputs:
            with contextlib.suppress(OSError):
                os.close(out.fd)
        self._outputs = []
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.container is not None:
            self.container.remove()

    # --- the loop ---

    def serve(self) -> None:
        """Answer requests until the container is removed (by ``rm``, ``--rm`` or SIGTERM)."""
        assert self.container is not None and self.container.process is not None
        assert self._listener is not None
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _s, _f: None)  # the wakeup fd carries it
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._sel.register(r, selectors.EVENT_READ, self._on_signal)
        self._sel.register(self._listener, selectors.EVENT_READ, self._on_connect)
        self._sel.register(
            self.container.process.fileno_for_wait(), selectors.EVENT_READ, self._on_exit
        )
        for out in self._outputs:
            os.set_blocking(out.fd, False)
            self._sel.register(out.fd, selectors.EVENT_READ, self._on_output)
        while not self._done:
            for key, _ in self._sel.select(self._timeout()):
                if self._done:
                    break
                if not self._current(key):
                    continue  # unregistered by an earlier handler of this round
                handler: Callable[[Any], None] = key.data
                handler(key.fileobj)
            if not self._done:
                self._tick()

    def _current(self, key: selectors.SelectorKey) -> bool:
        try:
            return self._sel.get_key(key.fileobj) is key
        except (KeyError, ValueError):  # ValueError: a socket closed meanwhile (fileno -1)
            return False

    def _timeout(self) -> float | None:
        deadlines = [d for d in (self._kill_at,) if d is not None]
        if self._reaped_at is not None and self._outputs:
            deadlines.append(self._reaped_at + DRAIN_GRACE)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _tick(self) -> None:
        moment = time.monotonic()
        if self._kill_at is not None and moment >= self._kill_at:
            self._kill_at = None
            if self._status is None and self.container is not None:
                self.container.kill(signal.SIGKILL)
        if (
            self._reaped_at is not None
            and self._outputs
            and moment >= self._reaped_at + DRAIN_GRACE
        ):
            for out in list(self._outputs):
                self._close_output(out)
            self._finish()

    def _on_signal(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            data = os.read(fd, 64)
            if any(b in (signal.SIGTERM, signal.SIGINT) for b in data):
                self._remove(force=True)

    def _on_output(self, fd: int) -> None:
        out = next(o for o in self._outputs if o.fd == fd)
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self._close_output(out)
            if self._status is not None and not self._outputs:
                self._finish()
            return
        assert self._log is not None
        self._log.write(logs.encode(out.stream, chunk, now()))

    def _close_output(self, out: _Output) -> None:
        self._sel.unregister(out.fd)
        os.close(out.fd)
        self._outputs.remove(out)

    def _on_exit(self, pidfd: int) -> None:
        assert self.container is not None and self.container.process is not None
        self._sel.unregister(pidfd)
        self._status = self.container.process.wait()  # reaps; closes the pidfd
        self._reaped_at = time.monotonic()
        self._kill_at = None
        if not self._outputs:
            self._finish()

    def _finish(self) -> None:
        """The container ended and its output is all in the log: record it, tell waiters."""
        assert self._status is not None
        if self.record.state == EXITED:
            return
        self._update(state=EXITED, pid=None, exit_code=self._status.exit_code, finished_at=now())
        for conn in self._waiters:
            self._reply(conn, {"ok": True, "exit_code": self._status.exit_code})
        self._waiters.clear()
        if self.record.auto_remove:
            self._remove(force=True)

    # --- requests ---

    def _on_connect(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            request = control.recv(conn)
            if not isinstance(request, dict):
                conn.close()
                return
            op = request.get("op")
            handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise SpecError(f"unknown request {op!r}")
            handler(conn, request)
        except Exception as e:
            self._reply(conn, {"ok": False, "error": protocol.encode_error(e)})

    def _reply(self, conn: socket.socket, message: dict[str, Any], keep: bool = False) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(REQUEST_TIMEOUT)
            control.send(conn, message)
        if not keep:
            conn.close()

    def _require_running(self, what: str) -> Container:
        if self.record.state != RUNNING or self._status is not None:
            raise ContainerStateError(
                f"container {self.record.name} ({self.record.short_id}) is not running: {what} "
                "needs a running container"
            )
        assert self.container is not None
        return self.container

    def _op_wait(self, conn: socket.socket, request: dict[str, Any]) -> None:
        if self.record.state == EXITED:
            self._reply(conn, {"ok": True, "exit_code": self.record.exit_code})
        else:
            self._waiters.append(conn)

    def _op_stop(self, conn: socket.socket, request: dict[str, Any]) -> None:
        """Send the stop signal, SIGKILL after ``timeout`` seconds (``None``: never); the reply
        comes when the container has ended."""
        if self.record.state == EXITED or self._status is not None:
            self._op_wait(conn, request)
            return
        assert self.container is not None
        sig = parse_signal(request.get("signal") or self.record.stop_signal or "SIGTERM")
        timeout = request.get("timeout")
        self.container.kill(sig)
        if sig != signal.SIGKILL and timeout is not None:
            deadline = time.monotonic() + max(0.0, float(timeout))
            self._kill_at = deadline if self._kill_at is None else min(self._kill_at, deadline)
        self._waiters.append(conn)

    def _op_kill(self, conn: socket.socket, request: dict[str, Any]) -> None:
        container = self._require_running("kill")
        container.kill(parse_signal(request.get("signal") or "SIGKILL"))
        self._reply(conn, {"ok": True})

    def _op_exec(self, conn: socket.socket, request: dict[str, Any]) -> None:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        try:
            container = self._require_running("exec")
            if len(fds) != 3:
                raise SpecError("exec needs the caller's stdin, stdout and stderr")
            argv = request.get("argv") or []
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise SpecError("exec needs a command")
            helper = container.spawn(
                argv,
                env=request.get("env") or None,
                cwd=request.get("cwd") or None,
                user=request.get("user") or None,
                stdio=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)
        pidfd = os.pidfd_open(helper.pid)
        job = _Exec(helper, conn, pidfd)
        self._execs.append(job)
        self._sel.register(pidfd, selectors.EVENT_READ, lambda _fd: self._on_exec_done(job))
        conn.setblocking(False)
        self._sel.register(conn, selectors.EVENT_READ, lambda _c: self._on_exec_client(job))

    def _on_exec_client(self, job: _Exec) -> None:
        """The client hung up while its command runs (killed, Ctrl-C): end the command."""
        with contextlib.suppress(OSError):
            if job.conn.recv(1, socket.MSG_PEEK) != b"":
                return
        self._sel.unregister(job.conn)
        # Not the helper itself: its child inside the container would be orphaned, and an
        # orphan whose parent is outside its pid namespace may go to a subreaper that never
        # reaps it, which keeps the container's PID 1 from ever finishing. Killed from the
        # bottom up, the helper reaps its child and exits as it died; its pidfd reports that.
        for pid in reversed(_descendants(job.helper.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _on_exec_done(self, job: _Exec) -> None:
        self._sel.unregister(job.pidfd)
        os.close(job.pidfd)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(job.conn)
        self._execs.remove(job)
        try:
            status = job.helper.wait()
            reply: dict[str, Any] = {"ok": True, "exit_code": status.exit_code}
        except IsolateError as e:
            reply = {"ok": False, "error": protocol.encode_error(e)}
        job.conn.setblocking(True)
        self._reply(job.conn, reply)

    def _op_diff(self, conn: socket.socket, request: dict[str, Any]) -> None:
        from runtime.image.images import container_changes

        assert self.container is not None
        changes = container_changes(self.container)
        self._reply(conn, {"ok": True, "changes": [[ch.kind, ch.path] for ch in changes]})

    def _op_commit(self, conn: socket.socket, request: dict[str, Any]) -> None:
        from runtime.image.images import commit
        from runtime.image.reference import HOST
        from runtime.image.store import Store

        assert self.container is not None
        store = Store(str(request["store"]))
        base = self.record.image_id
        if base is None and self.record.image == HOST:
            base = HOST
        image_id = commit(
            self.container,
            store,
            request.get("ref") or None,
            changes=list(request.get("changes") or ()),
            message=str(request.get("message") or ""),
            base=base,
            author=request.get("author"),
        )
        self._reply(conn, {"ok": True, "image_id": image_id})

    def _op_remove(self, conn: socket.socket, request: dict[str, Any]) -> None:
        if self.record.state == RUNNING and self._status is None and not request.get("force"):
            raise ContainerStateError(
                f"cannot remove container {self.record.name} ({self.record.short_id}): it is "
                "running; stop it first, or force the removal (rm -f)"
            )
        self._remove(force=True)
        # Replied after everything is gone; the connection ends when this process exits.
        self._reply(conn, {"ok": True}, keep=True)

    def _remove(self, force: bool) -> None:
        """Kill what runs, answer everyone waiting, delete the state directory, end the loop."""
        assert self.container is not None and self.container.process is not None
        if self._status is None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.container.process.fileno_for_wait())
            self.container.kill(signal.SIGKILL)
            self._status = self.container.process.wait()
        for job in list(self._execs):
            job.helper.kill()
            self._on_exec_done(job)
        for conn in self._waiters:
            self._reply(conn, {"ok": True, "exit_code": self._status.exit_code})
        self._waiters.clear()
        for out in list(self._outputs):
            self._close_output(out)
        self.abort()
        self._done = True


def _descendants(pid: int, proc: str = "/proc") -> list[int]:
    """The processes below ``pid``, parents before their children (read from ``/proc``)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tasks = sorted(os.listdir(f"{proc}/{parent}/task"), key=int)
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"{proc}/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


def _report(message: dict[str, Any]) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def main() -> None:
    """The supervisor process (see the module): read the launch from stdin, then serve."""
    try:
        launch = Launch.from_json(sys.stdin.read())
    except Exception as e:
        _report({"ok": False, "error": protocol.encode_error(e)})
        os._exit(1)
    if os.fork() != 0:
        os._exit(0)  # the starter reaps this one at once; the supervisor is reparented
    supervisor = Supervisor(launch)
    try:
        supervisor.create()
        supervisor.start()
    except BaseException as e:
        with contextlib.suppress(BaseException):
            supervisor.abort()
        _report({"ok": False, "error": protocol.encode_error(e)})
        os._exit(1)
    _report({"ok": True, "id": supervisor.record.id})
    _detach_stdio()
    code = 0
    try:
        supervisor.serve()
    except BaseException:
        code = 1
        with contextlib.suppress(BaseException):
            supervisor.abort()
    finally:
        os._exit(code)
