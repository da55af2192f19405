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
import functools
import os
import signal
import subprocess
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import _sys, idmap, launch, probe, process, rootfs, state
from runtime.errors import ContainerStateError, UnsupportedHostError
from runtime.launch import ContainerProcess, ExitStatus, LaunchPlan
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


class Engine:
    """Creates containers; holds per-host facts (mount table, id map) computed once."""

    def __init__(self, state_root: Path | None = None) -> None:
        self.state_root = state_root or state.default_root()
        self._swept = False

    @functools.cached_property
    def _host_mount_table(self) -> list[rootfs.HostMount]:
        return rootfs.parse_mountinfo(Path("/proc/self/mountinfo").read_text())

    @functools.cached_property
    def _host_mounts(self) -> list[str]:
        return rootfs.data_mounts(self._host_mount_table)

    @functools.cached_property
    def _host_top(self) -> list[tuple[str, str | None]]:
        return rootfs.skeleton_entries("/")

    @functools.cached_property
    def _ns_flags(self) -> int:
        return _NS_FLAGS | (_sys.CLONE_NEWCGROUP if os.path.exists("/proc/self/ns/cgroup") else 0)

    def check_host(self, userns: bool) -> None:
        """Raise :class:`UnsupportedHostError` with the fix if containers cannot run here."""
        if userns:
            p = probe.user_namespaces()
            if not p:
                raise UnsupportedHostError("user namespaces", p.reason, p.fix)
        p = probe.overlayfs()
        if not p:
            raise UnsupportedHostError("overlayfs", p.reason, p.fix)

    def create(self, spec: ContainerSpec) -> Container:
        """Prepare a container (state directory, plans); :meth:`Container.start` runs it."""
        userns = spec.userns if spec.userns is not None else os.geteuid() != 0
        self.check_host(userns)
        if not self._swept:
            state.sweep(self.state_root)
            self._swept = True
        st = state.create(self.state_root)
        try:
            paths = rootfs.StatePaths(str(st.path))
            overlays = rootfs.plan_overlays(
                spec.rootfs.lowers,
                spec.rootfs.host,
                self._host_mounts,
                [name for name, link in self._host_top if link is None],
                split=userns,
                state=paths,
                host_mount_points=[m.target for m in self._host_mount_table],
            )
            _prepare_state(paths, overlays, spec, self._host_top if userns else [])
            plan = LaunchPlan(
                ns_flags=self._ns_flags,
                idmap=idmap.host_plan() if userns else None,
                mounts=tuple(rootfs.plan_mounts(spec, overlays, paths, rootless=userns)),
                hostname=spec.hostname,
                argv=spec.argv,
                env=dict(spec.env),
                cwd=spec.cwd,
                user=spec.user,
                caps=process.cap_mask(set(process.DEFAULT_CAPS)),
                tty=spec.tty,
                init=spec.init,
                pass_fds=spec.pass_fds,
            )
        except BaseException:
            st.release()
            raise
        return Container(spec, st, plan, overlays)

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
        spec = _no_close(spec)
        with self.create(spec) as c:
            proc = c.start(target=lambda: fn(*args, **kwargs))
            try:
                return launch.callable_result(proc, timeout)
            except TimeoutError:
                c.kill()
                raise


def _no_close(spec: ContainerSpec) -> ContainerSpec:
    return spec


def _prepare_state(
    paths: rootfs.StatePaths,
    overlays: Sequence[rootfs.Overlay],
    spec: ContainerSpec,
    skeleton: Sequence[tuple[str, str | None]],
) -> None:
    os.mkdir(paths.rootfs)
    for ov in overlays:
        os.makedirs(ov.upper)
        os.makedirs(ov.work)
    if skeleton:
        os.mkdir(paths.skeleton)
        for name, link in skeleton:
            if link is None:
                os.mkdir(f"{paths.skeleton}/{name}")
            else:
                os.symlink(link, f"{paths.skeleton}/{name}")
    etc = Path(paths.etc_file(""))
    etc.mkdir()
    (etc / "hostname").write_text(spec.hostname + "\n")
    (etc / "hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{spec.hostname}\n"
    )
    (etc / "resolv.conf").write_text("# network: none\n")


class Container:
    """One container: its spec, state directory and, once started, its processes."""

    def __init__(
        self,
        spec: ContainerSpec,
        st: state.StateDir,
        plan: LaunchPlan,
        overlays: Sequence[rootfs.Overlay],
    ) -> None:
        self.spec = spec
        self.id = st.id
        self._state = st
        self._plan = plan
        self.overlays = tuple(overlays)
        self.process: ContainerProcess | None = None

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def state_dir(self) -> Path:
        return self._state.path

    @property
    def userns(self) -> bool:
        return self._plan.idmap is not None

    def start(
        self,
        stdio: Sequence[int | None] = (None, None, None),
        target: Callable[[], Any] | None = None,
    ) -> ContainerProcess:
        """Launch the container: ``spec.argv``, or ``target`` (a callable), or an idle PID 1."""
        if self.process is not None:
            raise ContainerStateError(f"container {self.id} was already started")
        plan = self._plan
        if target is not None:
            plan = LaunchPlan(**{**plan.__dict__, "argv": None, "close_fds": False})
        self.process = launch.start(plan, stdio, target)
        return self.process

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
        if self.process is not None:
            if self.process.returncode is None:
                self.process.kill()
                with contextlib.suppress(ChildProcessError):
                    self.process.wait()
            self.process.close()
        self._state.release()

    # --- exec and copy, through setns into the running container ---

    def _enter(self) -> None:  # pragma: no cover - runs in a forked child
        """Join the container's namespaces (user first: it grants the rights for the rest)."""
        proc = self._running()
        init = proc.init_pid
        names = ["mnt", "uts", "ipc", "net", "pid", "cgroup"]
        if self.userns:
            names.insert(0, "user")
        fds = []
        for name in names:
            path = f"/proc/{init}/ns/{name}"
            if os.path.exists(path):
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        for fd in fds:
            _sys.setns(fd, 0)
            os.close(fd)

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
        self._running()
        full_env = {**self.spec.env, **(env or {})}
        workdir = cwd or self.spec.cwd
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            code = launch.SETUP_FAILED
            try:
                _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(code)
                launch._setup_stdio(stdio)
                self._enter()
                u = process.resolve_user(
                    user or self.spec.user,
                    process.read_text("/etc/passwd"),
                    process.read_text("/etc/group"),
                )
                e = process.container_env(full_env, u, self.spec.hostname, False)
                os.chdir(workdir)
                exe = launch._find_executable(argv[0], e.get("PATH", ""))
                launch._close_fds_except({0, 1, 2, w})
                process.drop_privileges(u, self._plan.caps)
                child = os.posix_spawn(
                    exe, list(argv), e, setsigmask=(), setsigdef=launch.FORWARDED_SIGNALS
                )
                os.close(w)
                launch._mirror_exit(child)
            except BaseException as exc:
                os.write(w, f"{type(exc).__name__}: {exc}".encode())
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            err = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if err:
            from runtime.errors import ContainerError

            raise ContainerError(f"exec {argv[0]!r} in container {self.id} failed: {err}")
        return ExitStatus.from_wait_status(status)

    def exec_capture(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """``exec`` with stdout and stderr captured as text."""
        import tempfile

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdin_fd = None
            if input is not None:
                rin, win = os.pipe()
                stdin_fd = rin
                # Small inputs fit the pipe buffer; larger ones are written by a helper thread.
                import threading

                def feed() -> None:
                    with os.fdopen(win, "wb") as f, contextlib.suppress(BrokenPipeError):
                        f.write(input)

                t = threading.Thread(target=feed, daemon=True)
                t.start()
            try:
                status = self.exec(
                    argv, env=env, cwd=cwd, user=user, stdio=(stdin_fd, out.fileno(), err.fileno())
                )
            finally:
                if stdin_fd is not None:
                    os.close(stdin_fd)
            out.seek(0)
            err.seek(0)
            return ExecResult(
                status, out.read().decode(errors="replace"), err.read().decode(errors="replace")
            )

    def _in_container(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in a forked child that joined the container's user and mount namespaces."""
        self._running()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
                self._enter()
                fn()
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            from runtime.errors import ContainerError

            raise ContainerError(
                f"copy in container {self.id} failed ({ExitStatus.from_wait_status(status)})"
            )

    def copy_in(self, src: str | os.PathLike[str], dst: str) -> None:
        """Copy a host file or directory to ``dst`` inside the container (like ``docker cp``)."""
        src = os.fspath(src)
        r, w = os.pipe()

        def extract() -> None:
            os.close(w)
            with os.fdopen(r, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                target_dir, name = _cp_target(dst, os.path.isdir(src))
                os.makedirs(target_dir, exist_ok=True)
                for member in tar:
                    member.name = (
                        os.path.normpath(os.path.join(name, member.name.partition("/")[2]))
                        if "/" in member.name
                        else name
                    )
                    tar.extract(member, target_dir, set_attrs=True, **_tar_filter())

        pid_holder: list[int] = []
        import threading

        def produce() -> None:
            with os.fdopen(w, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
                tar.add(src, arcname="x", filter=_as_root)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            self._in_container(extract)
        finally:
            os.close(r)
            t.join()
        del pid_holder

    def copy_out(self, src: str, dst: str | os.PathLike[str]) -> None:
        """Copy ``src`` from inside the container to the host path ``dst``."""
        from runtime.image import layer

        r, w = os.pipe()

        def pack() -> None:
            os.close(r)
            with os.fdopen(w, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
                tar.add(src, arcname=os.path.basename(src.rstrip("/")) or "root")

        import threading

        errors: list[BaseException] = []

        def consume() -> None:
            try:
                with os.fdopen(r, "rb") as f:
                    layer.unpack_tree(f, os.fspath(dst))
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        try:
            self._in_container(pack)
        finally:
            os.close(w)
            t.join()
        if errors:
            raise errors[0]


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _tar_filter() -> dict[str, Any]:
    return {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}


def _cp_target(dst: str, src_is_dir: bool) -> tuple[str, str]:
    if dst.endswith("/") or os.path.isdir(dst):
        return dst, "x"
    return os.path.dirname(dst) or "/", os.path.basename(dst)


def run_subprocess(argv: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, check=False)
