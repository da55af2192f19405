"""The ``container`` and ``container_factory`` fixtures: running containers a test drives.

A test that uses them runs in the pytest process (on the host) and drives the container from
outside, as it would drive ``docker exec``/``docker cp``; the ``container`` marker, when present,
gives the fixture its image and options instead of isolating the test itself.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_isolate import options, stash

if TYPE_CHECKING:
    from runtime import Container, ExecResult
    from runtime.diff import Change
    from runtime.engine import Helper

FIXTURES = ("container", "container_factory")


class RunningContainer:
    """A running container for a test: exec, spawn, copy, files, logs and diff."""

    def __init__(self, container: Container) -> None:
        self._c = container
        self._logs = Path(container.state_dir) / "logs"
        self._logs.mkdir(exist_ok=True)
        self._spawned: list[Helper] = []

    @property
    def id(self) -> str:
        return self._c.id

    @property
    def address(self) -> str | None:
        """The container's network address (``None`` with ``network='none'``, the default)."""
        return None

    def exec(
        self,
        argv: Sequence[str] | str,
        *,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command and wait: ``.exit_code``, ``.stdout``, ``.stderr`` (a string runs via ``sh -c``)."""
        args = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        data = input.encode() if isinstance(input, str) else input
        result = self._c.exec_capture(args, input=data, env=env, cwd=workdir, user=user)
        if check and result.exit_code != 0:
            raise AssertionError(
                f"{args!r} exited with {result.status} in container {self.id}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def spawn(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> Helper:
        """Start a background process; its output goes to :meth:`logs`. Returns a handle (wait/kill)."""
        args = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        log = os.open(
            self._logs / "spawned.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            helper = self._c.spawn(args, env=env, cwd=workdir, user=user, stdio=(devnull, log, log))
        finally:
            os.close(log)
            os.close(devnull)
        self._spawned.append(helper)
        return helper

    def logs(self) -> str:
        """Everything the spawned background processes wrote so far (stdout and stderr)."""
        path = self._logs / "spawned.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def copy_in(self, src: str | os.PathLike[str], dst: str) -> None:
        self._c.copy_in(src, dst)

    def copy_out(self, src: str, dst: str | os.PathLike[str]) -> None:
        self._c.copy_out(src, dst)

    def read_file(self, path: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            self._c.copy_out(path, os.path.join(tmp, "f"))
            return Path(tmp, "f").read_bytes()

    def write_file(self, path: str, data: bytes | str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, os.path.basename(path) or "f")
            local.write_bytes(data.encode() if isinstance(data, str) else data)
            self._c.copy_in(local, path)

    def diff(self) -> list[Change]:
        """What the container changed (``docker diff``), without the engine's mount points."""
        from runtime.image.images import container_changes

        return container_changes(self._c)

    def commit(self, ref: str | None = None, changes: Sequence[str] = (), message: str = "") -> str:
        """Save what the container changed as a new image (``docker commit``); returns its id.

        ``changes`` are Dockerfile instructions for the config (``"CMD ['app']"``, ``"ENV A=1"``).
        """
        from runtime.image.images import commit
        from runtime.image.store import Store

        return commit(self._c, Store.open(), ref, changes, message)

    def close(self) -> None:
        for helper in self._spawned:
            helper.kill()
            with contextlib.suppress(Exception):
                helper.wait()
        self._c.remove()


@contextlib.contextmanager
def start_container(
    config: pytest.Config,
    *,
    where: str = "start_container",
    base_dir: Path | None = None,
    **opts: Any,
) -> Iterator[RunningContainer]:
    """A running container with the marker's options, for fixtures of any scope::

    @pytest.fixture(scope="module")
    def db(pytestconfig):
        with start_container(pytestconfig, hostname="db") as c:
            yield c
    """
    from pytest_isolate import session  # the engine's side, imported once a test needs it

    engine = stash.engine(config)
    base_dir = base_dir or config.rootpath
    tc = options.merge(where, {}, [pytest.mark.container(**opts).mark])
    image = session.image_for(config, tc, base_dir)
    c = engine.create(session.container_spec(tc, image, idle=True))
    running = RunningContainer(c)
    try:
        c.start()
        yield running
    finally:
        running.close()


def _marker_options(item: pytest.Item) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers(options.MARKER))):
        if mark.args and isinstance(mark.args[0], str):
            merged["image"] = mark.args[0]
        merged.update(mark.kwargs)
    return merged


@pytest.fixture
def container(request: pytest.FixtureRequest) -> Iterator[RunningContainer]:
    """A running container of the ``container`` marker's image (default: host), removed after the test."""
    opts = _marker_options(request.node)
    base = request.node.path.parent
    with start_container(request.config, where=request.node.nodeid, base_dir=base, **opts) as c:
        yield c


@pytest.fixture
def container_factory(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start several containers: ``container_factory(image=..., **options)``; all removed after the test."""
    stack = contextlib.ExitStack()

    def make(**opts: Any) -> RunningContainer:
        return stack.enter_context(
            start_container(request.config, where=request.node.nodeid, **opts)
        )

    with stack:
        yield make
