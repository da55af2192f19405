"""The one place that wires the parts together: spec -> plans -> state -> launched container.

engine = Engine()
status = engine.run(ContainerSpec(Rootfs(host=True), argv=("echo", "hello world")))
value = engine.call(ContainerSpec(Rootfs(host=True)), compute, 6, 7)

with engine.create(spec) as c:          # a container that waits for exec
    c.start()
    result = c.exec_capture(["cat", "/etc/os-release"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import select
import signal
import socket
import tarfile
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import _sys, control, idmap, launch, probe, process, rootfs, state
from runtime.diff import Change, upper_changes
from runtime.diff import merge as merge_changes
from runtime.errors import (
    ContainerError,
    ContainerStateError,
    ExecError,
    SpecError,
    UnsupportedHostError,
)
from runtime.image import layer
from runtime.launch import ContainerProcess, ExitStatus, LaunchPlan
from runtime.prepare import MAX_BATCH, PrepareError, Preparer, Recipe
from runtime.spec import ContainerSpec

_NS_FLAGS = (
    _sys.CLONE_NEWNS | _sys.CLONE_NEWUTS | _sys.CLONE_NEWIPC | _sys.CLONE_NEWNET | _sys.CLONE_NEWPID
)


@dataclass(frozen=True)
class ExecResult:
    """What :meth:`Container.exec_capture` returns."""

    status: ExitStatus
    stdout: str
    stderr: str

    @property
    def exit_code(self) -> int:
        return self.status.exit_code


_DEFAULT_CAPS = process.cap_mask(set(process.DEFAULT_CAPS))


@dataclass
class _Ahead:
    """How the helper sets containers of one spec up, and how many it still owes
    (:meth:`Engine.prepare`)."""

    spec: ContainerSpec
    recipe: Recipe | None
    """``None`` when the spec's plan does not split (a user's mount on ``/proc``)."""
    plan: LaunchPlan | None
    """What is left for each one's PID 1: ``/proc`` and its masks, and the rest of the launch."""
    request: bytes = b""
    owed: int = 0


MAX_RETIRED = 8
"""Retired containers :meth:`Engine.create` lets wait before it reaps them itself."""


class Engine:
    """Creates containers; holds per-host facts (mount table, id map) computed once."""

    def __init__(self, state_root: Path | None = None) -> None:
        self.state_root = state_root or state.default_root()
        self._swept = False
        self._pending: list[Container] = []
        self._known_roots: dict[tuple[object, ...], rootfs.Known] = {}
        self._userns_fd: int | None = None
        self._userns_closer: weakref.finalize[Any, Engine] | None = None
        self._preparer: Preparer | None = None
        self._ahead: _Ahead | None = None
        self._home: state.StateDir | None = None
        """The host directory over which each prepared container mounts its state."""

    def _collect(self, block: bool) -> None:
        """Reap retired containers (see :meth:`Container.retire`); all of them if ``block``."""
        for c in list(self._pending):
            if block:
                c.remove()
            elif not c._reaped():
                break
        if self._preparer is not None:
            with contextlib.suppress(OSError):
                self._preparer.flush()  # the network namespaces of those reaped, in one write

    def collect(self, batch: int = 1) -> None:
        """Remove retired containers that have ended; cheap, meant for idle moments.

        Does nothing until ``batch`` of them wait. In a process that forks, work done after
        every fork pays a copy-on-write fault for each page it writes, every time; reaping
        in batches touches those pages once per batch.
        """
        if len(self._pending) >= batch:
            self._collect(block=False)

    def close(self) -> None:
        """Wait for every retired container and remove what is left (idempotent)."""
        self._drop_ahead()
        self._collect(block=True)
        self._close_preparer()
        if self._home is not None:
            self._home.release()
            self._home = None
        if self._userns_closer is not None:
            self._userns_closer()
            self._userns_fd = self._userns_closer = None

    @functools.cached_property
    def _idmap(self) -> idmap.IdMapPlan:
        return idmap.host_plan()

    def _user_namespace(self) -> int:
        """The user namespace this engine's containers share, made at the first one.

        Its descriptor is closed by :meth:`close`, or when the engine is garbage (a command
        line that runs one container need not close its engine).
        """
        if self._userns_fd is None:
            self._userns_fd = idmap.open_user_namespace(self._idmap)
            self._userns_closer = weakref.finalize(self, os.close, self._userns_fd)
        return self._userns_fd

    @functools.cached_property
    def _host_mount_table(self) -> list[rootfs.HostMount]:
        return rootfs.parse_mountinfo(Path("/proc/self/mountinfo").read_text())

    @functools.cached_property
    def _host_mounts(self) -> list[str]:
        return rootfs.data_mounts(self._host_mount_table)

    @functools.cached_property
    def _host_top(self) -> list[tuple[str, str, str | None]]:
        return rootfs.list_host_dir("/")

    @functools.cached_property
    def _ns_flags(self) -> int:
        return _NS_FLAGS | (_sys.CLONE_NEWCGROUP if os.path.exists("/proc/self/ns/cgroup") else 0)

    def _known(self, spec: ContainerSpec, overlays: Sequence[rootfs.Overlay]) -> rootfs.Known:
        """What the mount plan needs to know of the root, read once per set of layers.

        Kept for the engine's life (a plan costs ~0.2 ms more without it): layers in the store
        never change, and the host's own root (the host image) changes only by the host's
        hand, never by a container's, whose writes are copy-on-write. A stale answer can only
        come from the host changing its root during a session: a mount then fails, or lands
        where the host's new link leads. A hostile image cannot change its layers.
        """
        key = (spec.rootfs.host, tuple((ov.target, ov.lowers) for ov in overlays))
        known = self._known_roots.get(key)
        if known is None:
            fresh = rootfs.PROVIDED + (rootfs.FRESH_TMPFS_ON_HOST_IMAGE if spec.rootfs.host else ())
            view = rootfs.RootView(overlays, fresh)
            known = rootfs.Known(view.dirs(), rootfs.masked_paths(), view.resolve)
            if len(self._known_roots) >= 64:  # layers of per-container dirs (a split root)
                self._known_roots.clear()
            self._known_roots[key] = known
        return known

    def check_host(self, userns: bool) -> None:
        """Raise :class:`UnsupportedHostError` with the fix if containers cannot run here."""
        if userns:
            p = probe.user_namespaces()
            if not p:
                raise UnsupportedHostError("user namespaces", p.reason, p.fix)
        p = probe.overlayfs()
        if not p:
            raise UnsupportedHostError("overlayfs", p.reason, p.fix)

    def prepare(self, spec: ContainerSpec, count: int = 1) -> None:
        """Set the namespaces of ``count`` containers for ``spec`` up in the background.

        The next ``create(spec, prepared=True)`` calls with an equal spec get them (see
        :mod:`runtime.prepare`): their PID 1 then joins them instead of making them. Nothing
        is done while some are left; preparing for another spec drops them. For a caller that
        knows what comes next: the pytest plugin prepares the next tests' containers while one
        runs, several at once, because a process that forks after each test pays a
        copy-on-write fault for every page it writes, every time: preparing ``count`` together
        writes those pages once (at most :data:`runtime.prepare.MAX_BATCH`). Root only (the
        module says why); elsewhere this does nothing.

        Such a container keeps its writable state in its own mount namespace, so it cannot be
        diffed or committed (:attr:`Container.overlays`); the plan is made once per spec.
        """
        if self._ahead is not None and self._ahead.spec != spec:
            self._drop_ahead()
        if (self._ahead is not None and self._ahead.owed) or spec.userns or os.geteuid() != 0:
            return
        if self._ahead is None:
            self._ahead = self._ahead_for(spec)
        if self._ahead.recipe is None:
            return
        try:
            if self._preparer is None:
                self._preparer = Preparer()
            count = min(count, MAX_BATCH)
            self._preparer.submit(self._ahead.request, count)
        except OSError:  # no helper (it could not start, or died): containers as usual
            self._close_preparer()
            return
        self._ahead.owed = count

    def _ahead_for(self, spec: ContainerSpec) -> _Ahead:
        """The recipe of ``spec``'s prepared containers, made once: they all keep their state
        in the same place (:class:`runtime.prepare.Recipe`)."""
        self._check(userns=False)
        if self._home is None:
            self._home = state.create(self.state_root)
        paths = rootfs.StatePaths(str(self._home.path))
        layout, plan = self._plan(spec, paths, userns=False)
        split = rootfs.split_for_prepare(plan.mounts, paths)
        if split is None or split[0][:1] != [rootfs.MAKE_PRIVATE]:
            return _Ahead(spec, None, None)
        recipe = Recipe(
            flags=plan.ns_flags & ~_sys.CLONE_NEWPID,
            ops=tuple(split[0][1:]),  # the helper makes the mounts private itself, first
            hostname=plan.hostname,
            state=paths,
            layout=layout,
            etc_files=tuple(_etc_files(spec).items()),
        )
        inside = dataclasses.replace(plan, mounts=tuple(split[1]))
        return _Ahead(spec, recipe, inside, recipe.encode())

    def _close_preparer(self) -> None:
        if self._ahead is not None:
            self._ahead.owed = 0  # its answers go with the socket
        if self._preparer is not None:
            self._preparer.close()
            self._preparer = None

    def _take_ahead(self, spec: ContainerSpec) -> Container | None:
        ahead = self._ahead
        if ahead is None or not ahead.owed:
            return None
        if ahead.spec != spec:
            self._drop_ahead()
            return None
        assert self._preparer is not None and self._home is not None
        assert ahead.recipe is not None and ahead.plan is not None
        ahead.owed -= 1
        try:
            joined, net = self._preparer.receive()
        except PrepareError:
            return None  # set up the usual way instead, which reports what is wrong
        container = Container(
            spec,
            state.PrivateState(state.new_id(), self._home.path),
            dataclasses.replace(ahead.plan, joined=joined),
            ahead.recipe.layout.overlays,
        )
        container._engine = self
        container._net = net
        return container

    def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        while ahead is not None and ahead.owed and self._preparer is not None:
            ahead.owed -= 1
            with contextlib.suppress(PrepareError):
                fds, net = self._preparer.receive()
                for fd in fds:
                    os.close(fd)  # the last reference: the namespaces and their mounts go
                if net is not None:
                    self._recycle_net(net)

    def _recycle_net(self, net: int) -> None:
        """Give a network namespace back to the helper: no process is left in it."""
        if self._preparer is not None:
            self._preparer.recycle(net)

    def _check(self, userns: bool) -> None:
        """What every new container needs checked or done first, cheap after the first."""
        self.check_host(userns)
        if not self._swept:
            state.sweep(self.state_root)
            self._swept = True
        if len(self._pending) > MAX_RETIRED:
            self._collect(block=False)
        process.prepare_privileges(_DEFAULT_CAPS)

    def _plan(
        self, spec: ContainerSpec, paths: rootfs.StatePaths, userns: bool
    ) -> tuple[rootfs.Layout, LaunchPlan]:
        """The layout of ``spec``'s root and the whole plan of its launch, state in ``paths``."""
        layout = rootfs.plan_overlays(
            spec.rootfs.lowers,
            spec.rootfs.host,
            self._host_mounts,
            self._host_top,
            split=userns,
            state=paths,
            host_mount_points=[m.target for m in self._host_mount_table],
            host_paths=spec.rootfs.host_paths,
            list_dir=rootfs.list_host_dir,
        )
        overlays = layout.overlays
        ns_flags = self._ns_flags
        if spec.network == "host":
            ns_flags &= ~_sys.CLONE_NEWNET
        plan = LaunchPlan(
            ns_flags=ns_flags,
            idmap=self._idmap if userns else None,
            userns_fd=self._user_namespace() if userns else None,
            mounts=tuple(
                rootfs.plan_mounts(spec, overlays, paths, userns, self._known(spec, overlays))
            ),
            hostname=spec.hostname,
            argv=spec.argv,
            env=dict(spec.env),
            cwd=spec.cwd,
            user=spec.user,
            caps=_DEFAULT_CAPS,
            tty=spec.tty,
            init=spec.init,
            pass_fds=spec.pass_fds,
        )
        return layout, plan

    def create(
        self, spec: ContainerSpec, container_id: str | None = None, prepared: bool = False
    ) -> Container:
        """Prepare a container (state directory, plans); :meth:`Container.start` runs it.

        ``container_id`` names the state directory (default: a fresh random id). With
        ``prepared``, the container :meth:`prepare` set up for an equal spec is used if there
        is one.
        """
        if prepared and container_id is None:
            ahead = self._take_ahead(spec)
            if ahead is not None:
                return ahead
        userns = spec.userns if spec.userns is not None else os.geteuid() != 0
        self._check(userns)
        st = state.create(self.state_root, container_id)
        try:
            paths = rootfs.StatePaths(str(st.path))
            layout, plan = self._plan(spec, paths, userns)
            state.populate(paths, layout, _etc_files(spec))
        except BaseException:
            st.release()
            raise
        container = Container(spec, st, plan, layout.overlays)
        container._engine = self
        return container

    def run(
        self, spec: ContainerSpec, stdio: Sequence[int | None] = (None, None, None)
    ) -> ExitStatus:
        """Run ``spec.argv`` to completion in a fresh container, then remove it."""
        with self.create(spec) as c:
            c.start(stdio)
            return c.wait()

    def call(
        self,
        spec: ContainerSpec,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in a forked child inside a fresh container; return its value.

        The child is a fork of this process, so ``fn`` and its arguments need not be picklable;
        the *result* (or the exception) must be, and is re-raised here with the remote traceback
        as a note.
        """
        with self.create(spec) as c:
            proc = c.start(target=lambda: fn(*args, **kwargs))
            try:
                return launch.callable_result(proc, timeout)
            except TimeoutError:
                c.kill()
                raise


def _etc_files(spec: ContainerSpec) -> dict[str, str]:
    """The container's ``/etc/hostname``, ``hosts`` and ``resolv.conf``."""
    if spec.network == "host":
        hosts = _read_or("/etc/hosts", "127.0.0.1\tlocalhost\n")
        resolv = _read_or("/etc/resolv.conf", "")
    else:
        hosts = (
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{spec.hostname}\n"
        )
        resolv = "# network: none\n"
    return {"hostname": spec.hostname + "\n", "hosts": hosts, "resolv.conf": resolv}


def _read_or(path: str, default: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return default


class Helper:
    """A process forked into a running container (exec, spawn, copy): wait for it or kill it."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._status: ExitStatus | None = None

    def poll(self) -> ExitStatus | None:
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._finish(status)
        return self._status

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the helper; raise the setup or exec error it reported, if any."""
        if self._status is None:
            if timeout is not None:
                fd = os.pidfd_open(self.pid)
                try:
                    ready, _, _ = select.select([fd], [], [], timeout)
                finally:
                    os.close(fd)
                if not ready:
                    raise TimeoutError(f"process {self.pid} still running after {timeout} s")
            self._finish(launch._waitpid(self.pid)[1])
        assert self._status is not None
        return self._status

    def _finish(self, status: int) -> None:
        self._status = ExitStatus.from_wait_status(status)
        self._sock.setblocking(False)
        try:
            msg = control.recv(self._sock)
        except (BlockingIOError, OSError):
            msg = None
        finally:
            self._sock.close()
        if isinstance(msg, dict) and msg.get("t") == "error":
            raise launch._error_from(msg)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the helper; SIGKILL takes its process in the container down with it."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class Container:
    """One container: its spec, state directory and, once started, its processes."""

    def __init__(
        self,
        spec: ContainerSpec,
        st: state.StateDir | state.PrivateState,
        plan: LaunchPlan,
        overlays: Sequence[rootfs.Overlay],
    ) -> None:
        self.spec = spec
        self.id = st.id
        self._state = st
        self._plan = plan
        self._overlays = tuple(overlays)
        self.process: ContainerProcess | None = None
        self._engine: Engine | None = None
        self._net: int | None = None
        """The helper's number for a prepared network namespace, given back at removal."""

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def state_dir(self) -> Path:
        """Its state directory (a prepared container's is a tmpfs inside it, over this path)."""
        return self._state.path

    @property
    def overlays(self) -> tuple[rootfs.Overlay, ...]:
        """Its overlays, whose upper directories hold what it changed (diff, commit)."""
        if isinstance(self._state, state.PrivateState):
            raise ContainerStateError(
                f"container {self.id} was set up ahead (prepared=True): what it changed lives "
                "only inside its own mount namespace, so it cannot be diffed or committed"
            )
        return self._overlays

    @property
    def userns(self) -> bool:
        return self._plan.idmap is not None

    def start(
        self,
        stdio: Sequence[int | None] = (None, None, None),
        target: Callable[[], Any] | None = None,
        wait: bool = True,
    ) -> ContainerProcess:
        """Launch the container: ``spec.argv``, or ``target`` (a callable), or an idle PID 1.

        ``wait=False`` returns before the container has set itself up (see
        :func:`runtime.launch.start`).
        """
        if self.process is not None:
            raise ContainerStateError(f"container {self.id} was already started")
        plan = self._plan
        if target is not None:
            plan = LaunchPlan(**{**plan.__dict__, "argv": None, "close_fds": False})
        if self._engine is not None and self._engine._preparer is not None:
            plan = dataclasses.replace(plan, private_fds=(self._engine._preparer.fileno(),))
        try:
            self.process = launch.start(plan, stdio, target, wait)
        finally:
            self._close_joined()
        return self.process

    def _close_joined(self) -> None:
        """Drop the descriptors of prepared namespaces: the container's PID 1 holds them now
        (or nothing does, and they are freed)."""
        if self._plan.joined:
            for fd in self._plan.joined:
                os.close(fd)
            self._plan = dataclasses.replace(self._plan, joined=())

    def _running(self) -> ContainerProcess:
        if self.process is None or self.process.returncode is not None:
            raise ContainerStateError(f"container {self.id} is not running")
        return self.process

    def wait(self, timeout: float | None = None) -> ExitStatus:
        if self.process is None:
            raise ContainerStateError(f"container {self.id} was never started")
        return self.process.wait(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill(sig)

    def remove(self) -> None:
        """Kill what still runs and delete the state directory (idempotent)."""
        self._engine_pending_discard()
        if self.process is not None:
            if self.process.returncode is None:
                self.process.kill()
                with contextlib.suppress(ChildProcessError):
                    self.process.wait()
            self.process.close()
        self._close_joined()
        if self._net is not None and self._engine is not None:
            # Its PID 1 is reaped: every process of its pid namespace is gone.
            self._engine._recycle_net(self._net)
            self._net = None
        self._state.release()

    def retire(self) -> None:
        """Let a container that is ending by itself finish in the background.

        Its PID 1 is exiting (the kernel is tearing its namespaces down); instead of waiting
        for that here, the engine reaps it and removes its state at its next ``create`` or at
        :meth:`Engine.close`. This takes the teardown off the caller's critical path.
        """
        if self._engine is None or self.process is None or self.process.returncode is not None:
            self.remove()
            return
        self._engine._pending.append(self)

    def _reaped(self) -> bool:
        """Non-blocking: has the retired container ended? Then remove it."""
        assert self.process is not None
        if self.process.returncode is None:
            pid, status = os.waitpid(self.process.pid, os.WNOHANG)
            if not pid:
                return False
            self.process.set_status(status)
        self.remove()
        return True

    def _engine_pending_discard(self) -> None:
        if self._engine is not None and self in self._engine._pending:
            self._engine._pending.remove(self)

    # --- exec and copy: helpers forked from the caller that join the running container ---

    def _fork_inside(
        self,
        body: Callable[[], int],
        keep: Sequence[int] = (),
        stdio: Sequence[int | None] = (None, None, None),
    ) -> tuple[int, socket.socket]:
        """Fork a helper that joins the container's namespaces and runs ``body``; it never returns.

        File descriptors other than stdio and ``keep`` are closed *before* joining: after
        ``setns`` the helper's ``/proc/self`` is not visible in the container's ``/proc``.
        Setup errors come back on the returned socket as structured frames.
        """
        proc = self._running()
        init = proc.init_pid
        names = (["user"] if self.userns else []) + ["mnt", "uts", "ipc", "net", "pid", "cgroup"]
        parent_sock, child_sock = socket.socketpair()
        caller = os.getpid()
        launch.flush_stdio()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            stage = launch._Stage(child_sock)
            code = launch.SETUP_FAILED
            try:
                launch._set_pdeathsig_or_exit(lambda: os.getppid() == caller)
                launch._setup_stdio(stdio)
                stage.name = "join namespaces"
                fds = [
                    os.open(f"/proc/{init}/ns/{n}", os.O_RDONLY | os.O_CLOEXEC)
                    for n in names
                    if os.path.exists(f"/proc/{init}/ns/{n}")
                ]
                launch._close_fds_except({0, 1, 2, child_sock.fileno(), *fds, *keep})
                for fd in fds:
                    _sys.setns(fd, 0)
                    os.close(fd)
                # Joining a pid namespace takes effect for children only: fork once more, so
                # that the body is inside it and sees itself in the container's /proc.
                inner = os.fork()
                if inner != 0:
                    launch._mirror_exit(inner)
                launch._set_pdeathsig_or_exit(lambda: True)
                stage.name = "exec"
                code = body()
            except BaseException as e:
                stage.fail(e)
            finally:
                os._exit(code)
        child_sock.close()
        return pid, parent_sock

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdio: Sequence[int | None] = (None, None, None),
    ) -> Helper:
        """Start ``argv`` inside the running container (like ``docker exec -d``); see :class:`Helper`."""
        if not argv:
            raise SpecError("exec needs a command")
        full_env = {**self.spec.env, **(env or {})}
        workdir = cwd or self.spec.cwd
        caps = self._plan.caps
        hostname = self.spec.hostname
        user = user or self.spec.user

        def body() -> int:  # pragma: no cover - runs in the helper
            u = process.resolve_user(
                user, process.read_text("/etc/passwd"), process.read_text("/etc/group")
            )
            e = process.container_env(full_env, u, hostname, False)
            os.chdir(workdir)
            exe = launch._find_executable(argv[0], e.get("PATH", ""))
            process.drop_privileges(u, caps)
            try:
                child = os.posix_spawn(
                    exe, list(argv), e, setsigmask=(), setsigdef=launch.FORWARDED_SIGNALS
                )
            except OSError as err:
                raise ExecError(argv[0], err.errno or 0) from err
            launch._mirror_exit(child)
            return launch.SETUP_FAILED

        pid, sock = self._fork_inside(body, stdio=stdio)
        return Helper(pid, sock)

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdio: Sequence[int | None] = (None, None, None),
    ) -> ExitStatus:
        """Run ``argv`` inside the running container (like ``docker exec``) and wait for it."""
        return self.spawn(argv, env=env, cwd=cwd, user=user, stdio=stdio).wait()

    def diff(self) -> list[Change]:
        """What the container changed in its filesystem, like ``docker diff`` (A, C, D)."""
        return merge_changes(
            upper_changes(ov.upper, ov.target, ov.lowers, self.userns) for ov in self.overlays
        )

    def exec_capture(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """``exec`` with stdin given as bytes and stdout/stderr captured as text."""
        with (
            tempfile.TemporaryFile() as out,
            tempfile.TemporaryFile() as err,
            tempfile.TemporaryFile() as inp,
        ):
            if input:
                inp.write(input)
                inp.seek(0)
            status = self.exec(
                argv, env=env, cwd=cwd, user=user, stdio=(inp.fileno(), out.fileno(), err.fileno())
            )
            out.seek(0)
            err.seek(0)
            return ExecResult(
                status, out.read().decode(errors="replace"), err.read().decode(errors="replace")
            )

    def copy_in(self, src: str | os.PathLike[str], dst: str) -> None:
        """Copy a host file or directory to ``dst`` in the container (``dst/`` copies into it).

        Entries are owned by the container's root; nothing can land outside the container's
        filesystem (the helper runs inside it), and symlinks resolve as the container sees them.
        """
        src = os.fspath(src)
        into, name = _split_dest(dst, os.path.basename(src.rstrip("/")))
        r, w = os.pipe()

        def body() -> int:  # pragma: no cover - runs in the helper
            os.makedirs(into, exist_ok=True)
            with os.fdopen(r, "rb") as f:
                layer.unpack_tree(f, "/", into=into)
            return 0

        pid, sock = self._fork_inside(body, keep=(r,))
        os.close(r)
        try:
            with (
                os.fdopen(w, "wb") as f,
                tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                tar.add(src, arcname=name, filter=_as_root)
        except BrokenPipeError:
            pass  # the helper failed; its error comes from wait() below
        finally:
            status = Helper(pid, sock).wait()
        if status.exit_code != 0:
            raise ContainerError(f"copy of {src!r} into container {self.id} failed ({status})")

    def copy_out(self, src: str, dst: str | os.PathLike[str]) -> None:
        """Copy ``src`` from the container to the host path ``dst`` (an existing directory: into it).

        Extraction on the host is confined to the destination directory: a hostile container
        cannot plant links that escape it.
        """
        dst = os.fspath(dst)
        name = os.path.basename(src.rstrip("/")) or "root"
        if dst.endswith("/") or os.path.isdir(dst):
            into = dst
        else:
            into, name = os.path.dirname(os.path.abspath(dst)), os.path.basename(dst)
        r, w = os.pipe()

        def body() -> int:  # pragma: no cover - runs in the helper
            with os.fdopen(w, "wb") as f:
                layer.pack_tree("/", f, path=src, arcname=name)
            return 0

        pid, sock = self._fork_inside(body, keep=(w,))
        os.close(w)
        try:
            with os.fdopen(r, "rb") as f:
                layer.unpack_tree(f, into)
        finally:
            status = Helper(pid, sock).wait()
        if status.exit_code != 0:
            raise ContainerError(f"copy of {src!r} out of container {self.id} failed ({status})")


def _split_dest(dst: str, src_name: str) -> tuple[str, str]:
    """``dst/`` means "into dst, keeping the source's name"; else dst is the new path."""
    if dst.endswith("/"):
        return dst.rstrip("/") or "/", src_name
    return os.path.dirname(dst) or "/", os.path.basename(dst)


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """``docker cp`` semantics: what is copied in belongs to the container's root."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
